"""KV bytes held and process memory on the embedded SmolLM2-135M: what compression saves, measured.

Two parts, both on a passkey haystack cut to exactly the context length:

**Part 1 (peak memory).** At each context (default 4096 and 8192 tokens, minus the decoded tokens so the stream fits
the model's 8192-token window), ``full`` and a 25% budget (``snapkv`` with ``budget = context / 4``, and the
head-wise ``adakv:snapkv`` with the same budget) prefill in chunks of 512 tokens (``kvsieve.prefill(...,
chunk_size=512)``), then greedily decode ``--decode`` tokens. Each variant runs in a fresh subprocess, so peaks do not
mix; a background thread samples the process's RSS (psutil) every 2 ms. Reported: KV bytes held at the end, checked
against ``budget x layers x kv_heads x head_dim x 2 x 4 bytes`` (fp32) for the budgeted variants, and the peak RSS
during prefill and during decoding, absolute and above the RSS before the prompt (model and runtime loaded), each as
a ratio to ``full`` of the same context and run. The bytes *reserved* (held plus the buffers' spare room, see
:mod:`kvsieve.storage`) are checked against their bound, 1.25 x held + 32 slots per segment.

**Part 2 (bytes per method).** Every method of the eviction/merging/quantisation family (issue 5) prefills one
``--methods-context``-token prompt (single pass) at compression ``--compression`` (quantisers and minicache keep every
token); the bytes the cache holds, summed from its tensors (``cache.kv_bytes()``), are printed next to what the method
promises, computed from its hyperparameters and the token counts: ``tokens x layers x kv_heads x head_dim x 2 x 4``
for eviction; codes, scales and residual for ``kivi``; 4-bit on the salient half, 2-bit on the rest, scales and
normalisers for ``zipcache``; one shared direction per merged (token, head) plus per-layer magnitudes for
``minicache``. A mismatch is an error.

    python benchmarks/memory.py                          # both parts: 4k and 8k, methods at 2048 tokens
    python benchmarks/memory.py --contexts 4096          # shorter: the 8k full prefill dominates the run
    python benchmarks/memory.py --skip-peak              # part 2 only

On the shared 2-core development machine under heavy load (load average ~11) the default run took 55 minutes, part 2
about 12 of them; ``--threads`` sets torch's threads (the default, 2, matches the CI machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from kvsieve import Sieve, build, cache_kwargs, prefill
from kvsieve.methods.kivi import kivi_nbytes
from kvsieve.methods.pyramidkv import pyramid_budgets
from kvsieve.methods.zipcache import zipcache_nbytes
from kvsieve.models import load_model
from prompts import prompt_ids

LAYERS, KV_HEADS, HEAD_DIM, ELT = 30, 3, 64, 4  # SmolLM2-135M, fp32
WINDOW = 8192
PEAK_VARIANTS = ("full", "snapkv", "adakv:snapkv")
METHODS = (
    "keyformer",
    "ems",
    "kvcrush",
    "pyramidkv",
    "compresskv",
    "kivi",
    "kivi(bits=4)",
    "kivi:snapkv",
    "zipcache",
    "zipcache:snapkv",
    "minicache",
)


class PeakRSS:
    """Samples the process's resident set size in a background thread; ``peak`` is the largest sample."""

    def __init__(self, interval: float = 0.002):
        self.process, self.interval = psutil.Process(), interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


@torch.no_grad()
def child(variant: str, context: int, decode: int, chunk: int, threads: int) -> dict:
    """One variant in this (fresh) process: chunked prefill, then decoding, with RSS peaks of each phase."""
    torch.set_num_threads(threads)
    model, tokenizer = load_model("smollm2-135m")
    ids = prompt_ids(tokenizer, context)
    budget = context // 4
    sieve = Sieve("full") if variant == "full" else Sieve(variant, budget=budget)
    with Sieve("full").attach(model) as warm:  # touch every weight page (safetensors are memory-mapped) first
        model(input_ids=ids[:, :8], **cache_kwargs(model, warm), use_cache=True, logits_to_keep=1)
    del warm
    with sieve.attach(model) as cache:
        baseline = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        with PeakRSS() as during_prefill:
            logits = prefill(model, ids, cache, chunk_size=chunk)
        t1 = time.perf_counter()
        with PeakRSS() as during_decode:
            for _ in range(decode):
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits[
                    :, -1
                ]
        t2 = time.perf_counter()
        tokens = cache.kv_tokens()
        per_layer = [sum(t) if isinstance(t, list) else t * KV_HEADS for t in tokens]
        return {
            "variant": variant,
            "context": context,
            "budget": None if variant == "full" else budget,
            "kv_bytes": cache.kv_bytes(),
            "reserved_bytes": cache.reserved_kv_bytes(),
            "kv_token_heads": sum(per_layer),
            "baseline_rss": baseline,
            "peak_prefill": during_prefill.peak,
            "peak_decode": during_decode.peak,
            "prefill_s": t1 - t0,
            "decode_s": t2 - t1,
        }


def run_child(variant: str, context: int, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--context", str(context)]
    cmd += ["--decode", str(args.decode), "--chunk", str(args.chunk), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} at {context} tokens failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_peak(args) -> None:
    print(
        f"Part 1: KV bytes and peak process memory: chunked prefill (chunks of {args.chunk}), then {args.decode} "
        "decoded tokens; each variant in a fresh process; 'above base' = peak minus the RSS before the prompt"
    )
    for requested in args.contexts:
        context = min(requested, WINDOW - args.decode)
        rows = [run_child(v, context, args) for v in PEAK_VARIANTS]
        full = rows[0]
        print(f"\ncontext {context} tokens (budget {context // 4} = 25%):")
        print(
            f"  {'variant':14s} {'KV MB':>8s} {'x full':>7s} {'prefill peak MB':>16s} {'x full':>7s} "
            f"{'(above base)':>13s} {'x full':>7s} {'decode peak MB':>15s} {'x full':>7s} {'prefill s':>9s}"
        )
        for r in rows:
            if r["budget"] is not None:
                expected = r["budget"] * LAYERS * KV_HEADS * HEAD_DIM * 2 * ELT
                status = "==" if r["kv_bytes"] == expected else "!="
                if r["kv_bytes"] != expected:
                    raise SystemExit(f"{r['variant']}: {r['kv_bytes']} bytes held, budget promises {expected}")
                note = f"  {status} budget x layers x heads x dim x 2 x 4 = {expected}"
            else:
                note = f"  ({context} tokens held)"
            # spare room of the buffers: at most a quarter of what is held, or 32 slots, per segment (kvsieve.storage)
            allowed = 1.25 * r["kv_bytes"] + 32 * LAYERS * KV_HEADS * HEAD_DIM * 2 * ELT
            if r["reserved_bytes"] > allowed:
                raise SystemExit(f"{r['variant']}: {r['reserved_bytes']} bytes reserved, more than {allowed:.0f}")
            note += f"; reserved {r['reserved_bytes'] / 2**20:.1f} MB (<= 1.25 x held + 32 slots)"
            grow, grow_full = r["peak_prefill"] - r["baseline_rss"], full["peak_prefill"] - full["baseline_rss"]
            print(
                f"  {r['variant']:14s} {r['kv_bytes'] / 2**20:8.1f} {r['kv_bytes'] / full['kv_bytes']:7.3f} "
                f"{r['peak_prefill'] / 2**20:16.1f} {r['peak_prefill'] / full['peak_prefill']:7.3f} "
                f"{grow / 2**20:13.1f} {grow / grow_full:7.3f} "
                f"{r['peak_decode'] / 2**20:15.1f} {r['peak_decode'] / full['peak_decode']:7.3f} "
                f"{r['prefill_s']:9.1f}{note}"
            )


def promised_bytes(spec: str, cache, n: int, compression: float) -> int:
    """What ``spec`` promises to hold after a single-pass prefill of ``n`` tokens (see the module docstring)."""
    kept = int(n * (1 - compression))
    dense = KV_HEADS * HEAD_DIM * 2 * ELT  # bytes per token per layer, full precision
    method = build(spec)
    if spec == "pyramidkv":
        budgets = pyramid_budgets(kept, LAYERS, method.beta, n, method.inner.window)
        return sum(min(b, n) for b in budgets) * dense
    if spec.startswith("kivi"):
        tokens = kept if method.evicts else n
        return LAYERS * kivi_nbytes(tokens, KV_HEADS, HEAD_DIM, method.bits, method.group, method.residual, ELT)
    if spec.startswith("zipcache"):
        tokens = kept if method.evicts else n
        high = round(tokens * method.salient)
        per = zipcache_nbytes(
            0, KV_HEADS * high, KV_HEADS * (tokens - high), HEAD_DIM, method.high_bits, method.low_bits, ELT, KV_HEADS
        )
        return LAYERS * per
    if spec == "minicache":
        total, rows = 0, KV_HEADS * n
        for layer in cache.sieve_layers():
            seg = layer.segments[0]
            if getattr(seg, "pair", None) is None:
                total += n * dense
                continue
            merged = int(seg.pair.mask_k.sum()) + int(seg.pair.mask_v.sum())
            total += merged * ELT + (2 * rows - merged) * HEAD_DIM * ELT  # own magnitudes and retained vectors
            if seg.owner:
                total += merged * HEAD_DIM * ELT + 2 * rows  # shared directions and flags, once per pair
        return total
    return LAYERS * kept * dense  # eviction with a uniform budget


def part_methods(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m")
    n = args.methods_context
    ids = prompt_ids(tokenizer, n)
    full_bytes = LAYERS * n * KV_HEADS * HEAD_DIM * 2 * ELT
    print(
        f"\nPart 2: bytes held per method, {n}-token prompt, single-pass prefill, compression {args.compression} "
        f"for evicting methods; full cache = {full_bytes / 2**20:.2f} MB"
    )
    print(f"  {'method':18s} {'held MB':>9s} {'promised MB':>12s} {'held/promised':>14s} {'x full':>7s} {'tokens':>8s}")
    for spec in args.methods:
        method = build(spec)
        sieve = Sieve(spec, compression=args.compression) if method.evicts else Sieve(spec)
        with sieve.attach(model) as cache, torch.no_grad():
            prefill(model, ids, cache)
        held = cache.kv_bytes()
        promised = promised_bytes(spec, cache, n, args.compression)
        tokens = cache.kv_tokens()
        mean = sum(sum(t) / KV_HEADS if isinstance(t, list) else t for t in tokens) / len(tokens)
        print(
            f"  {spec:18s} {held / 2**20:9.3f} {promised / 2**20:12.3f} {held / promised:14.4f} "
            f"{held / full_bytes:7.3f} {mean:8.0f}"
        )
        if held != promised:
            raise SystemExit(f"{spec}: holds {held} bytes, promises {promised}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192])
    parser.add_argument("--decode", type=int, default=16, help="tokens decoded after the prefill")
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods-context", type=int, default=2048)
    parser.add_argument("--compression", type=float, default=0.5)
    parser.add_argument(
        "--methods", type=lambda s: s.split(";"), default=list(METHODS), help="method specs separated by ';'"
    )
    parser.add_argument("--skip-peak", action="store_true", help="part 2 only")
    parser.add_argument("--skip-methods", action="store_true", help="part 1 only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.context, args.decode, args.chunk, args.threads)))
        return
    if not args.skip_peak:
        part_peak(args)
    if not args.skip_methods:
        part_methods(args)


if __name__ == "__main__":
    main()
