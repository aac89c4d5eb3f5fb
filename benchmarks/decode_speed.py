"""Decode speed of the selective-read methods against full attention, after long prefills, in one run.

For every dtype and context length the prompt (a passkey haystack cut to exactly ``context`` tokens) is prefilled once
(:class:`kvsieve.snapshot.PrefillSnapshot`); each configuration (``full`` and every method x read budget) then
decodes ``--steps`` greedy tokens from its own copy of that cache, after ``--warmup`` untimed steps. Configurations
take turns step by step, so bursts of load on a shared machine hit them alike, and the whole is repeated
``--repeats`` times; each step's time is the fastest of its rounds, and a configuration's per-token time is the mean
over its steps (not a median: Recycled Attention's periodic full steps are part of its cost; the default 10 steps
hold one of them). A context at the model's window is shortened by the decoded tokens, so they fit.

Measured per decoding step, all in the same run:

* ``step``: end-to-end time of one token (the model forward pass);
* ``attn``: time inside the registered ``kvsieve`` attention function (``Session.attend``), summed over layers:
  cache append + the method's selection (``reads``) + gather + sdpa;
* ``append``: the part of ``attn`` spent appending the new token to the cache (``SieveLayer.commit``), which
  selection cannot shrink; ``select``: the part spent in the method's ``reads``.

Reported: ratios to ``full`` of the same context and dtype (``step x`` = full step / method step, so > 1 is faster),
the attention share ``s`` of full's step, and the Amdahl bound ``1 / ((1 - s) + s * x)`` for the read fraction
``x = budget / context`` (what the method could reach if its attention took exactly ``x`` of full's), with
``bound'`` the same bound for the share ``s'`` of the step that reading can shrink (``attn - append``). ``of bound``
is how much of that speedup the method gets: ``(step x - 1) / (bound' - 1)``.

    python benchmarks/decode_speed.py --threads 1          # 4k and 8k, budgets 256/512/1024, float32: ~11 min on
                                                           # a 2-core VM shared with other jobs (--repeats 1: ~7)
    python benchmarks/decode_speed.py --contexts 4096 --steps 8 --dtype float32,bfloat16

bfloat16 runs where the machine computes it natively (CUDA, or a CPU with AVX512-BF16/AMX); elsewhere it is skipped
with a note (``--force-dtypes`` runs it anyway, emulated and slow).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

from kvsieve import sieve as sieve_module
from kvsieve.cache import SieveLayer
from kvsieve.methods import build
from kvsieve.models import load_model
from kvsieve.sieve import Sieve
from kvsieve.snapshot import PrefillSnapshot
from prompts import prompt_ids

METHODS = ("tokenselect", "quest", "tidaldecode", "recycled_attention")


class Timers:
    """Accumulated wall time of instrumented calls (synchronising CUDA around each, so times are real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.totals[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


@contextmanager
def instrumented(timers: Timers, methods: list):
    """Time ``Session.attend``, ``SieveLayer.commit`` and each method's ``reads`` while the block runs."""
    attend, commit = sieve_module.Session.attend, SieveLayer.commit
    sieve_module.Session.attend = timers.wrap("attn", attend)
    SieveLayer.commit = timers.wrap("append", commit)
    for method in methods:
        method.reads = timers.wrap("select", method.reads)
    try:
        yield
    finally:
        sieve_module.Session.attend, SieveLayer.commit = attend, commit
        for method in methods:
            del method.reads


def tune_malloc() -> str:
    """Let glibc keep freed buffers instead of returning them to the OS.

    The cache grows by ``torch.cat`` (a fresh copy per layer and step); by default glibc serves such multi-MB buffers
    with mmap and unmaps them on free, so every copy also page-faults its pages in, which on a small shared VM costs
    more than the copy. Full attention and every method append alike; this keeps that cost from drowning the reads.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return "malloc not tuned (no libc found)"
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 30) and libc.mallopt(-2, 64 << 20)
    except (OSError, AttributeError):
        return "malloc not tuned (not glibc)"
    return "glibc malloc tuned: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "malloc tuning refused"


def fast_gather_reads(index, keys, values, valid, bias):
    """Drop-in for ``kvsieve.sieve._gather_reads`` (``--fast-gather``, an experiment for a core change): the same
    tokens in the same order, but gathered with ``index_select`` on rows of the flattened cache (``gather`` with an
    index expanded over the head dimension is several times slower on CPU), and the newest token found by sorting
    instead of by boolean masking."""
    b, h, _ = index.shape
    t, d = keys.shape[2], keys.shape[3]
    index = index.sort(dim=-1).values  # the newest token has the largest index: if listed, it is last
    listed = index[..., -1] == t - 1
    twice = index.shape[-1] > 1 and bool((index[..., -2] == t - 1).any())
    if not bool(listed.any()):
        index = torch.cat([index, index.new_full((b, h, 1), t - 1)], dim=-1)
    elif twice or not bool(listed.all()):  # rows differ, or duplicates: the core's general path
        return sieve_module._core_gather_reads(index, keys, values, valid, bias)
    rows = (index + torch.arange(b * h, device=index.device).view(b, h, 1) * t).reshape(-1)
    keys = keys.reshape(b * h * t, d).index_select(0, rows).view(b, h, -1, d)
    values = values.reshape(b * h * t, values.shape[-1]).index_select(0, rows).view(b, h, -1, values.shape[-1])
    return (keys, values, *sieve_module.gather_valid_and_bias(index, valid, bias))


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def decode_round(model, snapshot: PrefillSnapshot, configs: list, steps: int, warmup: int, timers: Timers):
    """One round: every configuration decodes from its own copy of the prefilled cache, interleaved step by step
    (so a burst of load on a shared machine hits all of them alike).

    Returns, per configuration, ``steps`` rows ``(step, attn, append, select)`` in seconds and the method's stats.
    """
    runs = []
    for spec, budget in configs:
        method = build(spec)
        sieve = Sieve(method) if budget is None else Sieve(method, budget=budget)
        runs.append(
            {
                "method": method,
                "sieve": sieve,
                "cache": snapshot.compress(method, None),
                "logits": snapshot.last_logits,
                "rows": [],
            }
        )
    with instrumented(timers, [r["method"] for r in runs]):
        for i in range(warmup + steps):
            for run in runs:
                token = run["logits"].argmax(-1, keepdim=True)
                with run["sieve"].attach(model):
                    timers.reset()
                    timers.sync()
                    t0 = time.perf_counter()
                    out = model(input_ids=token, past_key_values=run["cache"], use_cache=True, logits_to_keep=1)
                    timers.sync()
                    step = time.perf_counter() - t0
                run["logits"] = out.logits[:, -1]
                if i >= warmup:
                    t = timers.totals
                    run["rows"].append((step, t["attn"], t["append"], t["select"]))
    return [(run["rows"], method_stats(run["cache"])) for run in runs]


def method_stats(cache) -> str:
    """Selection Cache hit rate, Recycled Attention's full-step share, Quest's page rebuilds, from layer state."""
    agg: dict[str, int] = defaultdict(int)
    for layer in cache.layers:
        for state in getattr(layer, "method_state", {}).values():
            if isinstance(state, dict):
                for key in ("hits", "misses", "full_steps", "partial_steps", "rebuilds"):
                    agg[key] += int(state.get(key, 0))
    if agg["hits"] + agg["misses"]:
        return f"cache hits {agg['hits'] / (agg['hits'] + agg['misses']):.0%}"
    if agg["full_steps"] + agg["partial_steps"]:
        return f"full steps {agg['full_steps'] / (agg['full_steps'] + agg['partial_steps']):.0%}"
    if agg["rebuilds"]:
        return f"page builds/layer {agg['rebuilds'] / max(1, sum(1 for _ in cache.layers)):.0f}"
    return ""


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    notes = tune_malloc() if args.tune_malloc else "malloc not tuned (--no-tune-malloc)"
    if args.fast_gather:
        sieve_module._core_gather_reads = sieve_module._gather_reads
        sieve_module._gather_reads = fast_gather_reads
        notes += "; EXPERIMENT: the core's _gather_reads replaced by index_select (--fast-gather)"
    print(f"device {device}, torch threads {torch.get_num_threads()}, model {args.model}; {notes}")
    print(f"steps {args.steps} timed + {args.warmup} warmup per configuration, {args.repeats} round(s)\n")
    results = []
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        if dtype == torch.bfloat16 and not bf16_native(device) and not args.force_dtypes:
            print(f"bfloat16: skipped, {device} has no native bfloat16 (oneDNN reports none); --force-dtypes runs it\n")
            continue
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        for context in contexts:
            window = getattr(model.config.get_text_config(), "max_position_embeddings", None) or context + 10**9
            length = min(context, window - args.warmup - args.steps)
            ids = prompt_ids(tokenizer, length).to(device)
            t0 = time.perf_counter()
            snapshot = PrefillSnapshot(model, ids, [])
            print(f"[{dtype_name} {context}] prefill of {length} tokens: {time.perf_counter() - t0:.1f} s")
            configs = [("full", None)] + [(m, b) for m in methods for b in budgets if b < length]
            rounds: dict[tuple[str, int | None], list] = defaultdict(list)
            stats: dict[tuple[str, int | None], str] = {}
            timers = Timers(device)
            for _ in range(args.repeats):
                for config, (got, stat) in zip(
                    configs, decode_round(model, snapshot, configs, args.steps, args.warmup, timers), strict=True
                ):
                    rounds[config].append(got)
                    stats[config] = stat
            del snapshot
            # per step, the fastest round (load bursts only ever slow a step down); then the mean over steps
            rows = {
                c: [tuple(map(min, zip(*same, strict=True))) for same in zip(*r, strict=True)]
                for c, r in rounds.items()
            }
            results.append((dtype_name, length, configs, rows, stats))
            report(dtype_name, length, configs, rows, stats)
        del model
    if len(results) > 1:
        print("Summary (step x = full / method per token; attn x likewise for attention only):")
        for dtype_name, context, configs, rows, _ in results:
            full = means(rows[("full", None)])
            cells = []
            for spec, budget in configs[1:]:
                med = means(rows[(spec, budget)])
                cells.append(f"{spec}@{budget} {full[0] / med[0]:.2f}/{full[1] / med[1]:.2f}")
            print(f"  {dtype_name} {context}: " + ", ".join(cells))


def means(rows: list) -> tuple[float, ...]:
    return tuple(statistics.fmean(col) for col in zip(*rows, strict=True))


def report(dtype_name: str, context: int, configs, rows, stats) -> None:
    full = means(rows[("full", None)])
    step_f, attn_f, append_f = full[0], full[1], full[2]
    s = attn_f / step_f
    s_read = (attn_f - append_f) / step_f
    print(
        f"  full: step {step_f * 1e3:.1f} ms, attention {attn_f * 1e3:.1f} ms (share s = {s:.2f}; cache append "
        f"{append_f * 1e3:.1f} ms, so the share reading can shrink is s' = {s_read:.2f})"
    )
    header = (
        f"  {'method':<20}{'budget':>7}{'x':>7}{'step ms':>9}{'attn ms':>9}{'sel ms':>8}{'step x':>8}{'attn x':>8}"
        + "  bound".rjust(7)
        + "bound'".rjust(8)
        + "of bound'".rjust(10)
        + "  notes"
    )
    print(header)
    for spec, budget in configs:
        med = means(rows[(spec, budget)])
        x = 1.0 if budget is None else budget / context
        bound = 1.0 / ((1 - s) + s * x)
        bound_read = 1.0 / ((1 - s_read) + s_read * x)
        speed = step_f / med[0]
        share = (speed - 1) / (bound_read - 1) if bound_read > 1.0001 else float("nan")
        note = stats[(spec, budget)]
        print(
            f"  {spec:<20}{budget or context:>7}{x:>7.3f}{med[0] * 1e3:>9.1f}{med[1] * 1e3:>9.1f}{med[3] * 1e3:>8.1f}"
            f"{speed:>8.2f}{attn_f / med[1]:>8.2f}{bound:>7.2f}{bound_read:>8.2f}{share:>10.0%}  {note}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--contexts", default="4096,8192", help="prefill lengths in tokens, comma-separated")
    parser.add_argument("--budgets", default="256,512,1024", help="read budgets in tokens, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help="method specs, comma-separated (no commas)")
    parser.add_argument("--steps", type=int, default=10, help="timed decoding steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decoding steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each step's time is its fastest round")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or both, comma-separated")
    parser.add_argument("--force-dtypes", action="store_true", help="run bfloat16 even where it is emulated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--fast-gather",
        action="store_true",
        help="experiment: gather the selected keys/values with index_select instead of the core's gather",
    )
    parser.add_argument(
        "--no-tune-malloc",
        dest="tune_malloc",
        action="store_false",
        help="keep glibc's default malloc thresholds (see tune_malloc)",
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
