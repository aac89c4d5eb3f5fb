"""Sparse prefill: end-to-end prefill time against dense sdpa, attention density, the Amdahl bound, perplexity.

For each context length the prompt is natural text (the embedded pydoc haystack, ``kvsieve.tasks.haystack``) cut to
exactly that many tokens. In one run, per length:

1. ``dense`` (kvsieve ``full``, sdpa's causal kernel: the baseline) is timed, and once more with a timer around every
   layer's attention, which gives the **attention share** of prefill ``s`` and the **Amdahl bound** ``1 / (1 - s)``
   (no sparse method can beat it: everything but attention stays) and, per method, the bound at its measured
   density ``d``: ``1 / ((1 - s) + s * d)``;
2. every prefill method is timed (a first untimed prefill compiles the flex kernel for that length bucket), taking
   turns with dense round by round, and its statistics are read from the cache: density overall, per layer (min /
   median / max) and per head (``--json`` writes them all);
3. with ``--perplexity``: the perplexity of the same tokens (every position's next-token loss from one prefill) under
   each method, and its ratio to dense (the target: within 2%).

Printed per length and method: median prefill seconds, speed-up over dense (dense time / method time, higher is
better), measured density, the Amdahl bound at that density, the kernel used, and method statistics. The targets
(issue 10): the best method >= 1.8x at 8,192 tokens and >= 1.4x at 4,096.

    python benchmarks/prefill_speed.py                                    # 2k, 4k, 8k; the default methods
    python benchmarks/prefill_speed.py --lengths 2048 --repeats 1         # a smoke run
    python benchmarks/prefill_speed.py --lengths 8192 --perplexity --json prefill.json
    python benchmarks/prefill_speed.py --kernels --lengths 2048,4096,8192 # the kernel micro-benchmark only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsieve import Sieve, build, cache_kwargs, sparse
from kvsieve.attention import AttentionCall, dense
from kvsieve.methods.base import PrefillMethod
from kvsieve.models import load_model
from kvsieve.tasks.haystack import load_haystack

DEFAULT_METHODS = (
    "flexprefill",
    "xattention",
    "minference",
    "pbs_attention",
    "power_attention",
    "hip",
    "anchor_attention",
)


@dataclass
class _TimedDense(PrefillMethod):
    """Dense attention that adds the seconds spent in attention to ``shared["attention_seconds"]``."""

    name = "timed_dense"
    exact = True

    def attend(self, call: AttentionCall) -> torch.Tensor:
        t0 = time.perf_counter()
        out = dense(call)
        call.shared["attention_seconds"] = call.shared.get("attention_seconds", 0.0) + time.perf_counter() - t0
        return out


def text_ids(tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(load_haystack("pydoc"), return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] < n:
        raise SystemExit(f"the pydoc text has {ids.shape[1]} tokens, fewer than {n}")
    return ids[:, :n]


@torch.no_grad()
def prefill_once(model, ids, prefill) -> tuple[float, dict]:
    with Sieve("full", prefill=prefill).attach(model) as cache:
        t0 = time.perf_counter()
        model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - t0
        stats = dict(cache.stats())
        stats["attention_seconds"] = cache.shared.get("attention_seconds")
    return seconds, stats


@torch.no_grad()
def perplexity(model, ids, prefill) -> float:
    """exp(mean next-token loss) over the prompt, from one prefill (logits computed 1,024 rows at a time)."""
    with Sieve("full", prefill=prefill).attach(model) as cache:
        hidden = model.model(ids, **cache_kwargs(model.model, cache), use_cache=True).last_hidden_state[0]
    total, n = 0.0, 0
    for start in range(0, ids.shape[1] - 1, 1024):
        stop = min(ids.shape[1] - 1, start + 1024)
        logits = model.lm_head(hidden[start:stop]).float()
        total += float(F.cross_entropy(logits, ids[0, start + 1 : stop + 1], reduction="sum"))
        n += stop - start
    return float(torch.exp(torch.tensor(total / n)))


def summarise_layers(values) -> str:
    xs = [v for v in values or [] if v is not None]
    if not xs:
        return "-"
    return f"{min(xs):.2f}/{statistics.median(xs):.2f}/{max(xs):.2f}"


def run_length(model, tokenizer, length: int, methods: list[str], repeats: int, ppl: bool) -> dict:
    ids = text_ids(tokenizer, length)
    specs = [None, *methods]
    for spec in specs:  # warm-up: compiles the flex kernel for this length bucket, loads profiles
        prefill_once(model, ids, spec)
    times: dict = {spec: [] for spec in specs}
    stats: dict = {}
    for _ in range(repeats):  # configurations take turns, so a burst of load hits them alike
        for spec in specs:
            seconds, stats[spec] = prefill_once(model, ids, spec)
            times[spec].append(seconds)
    timed, timed_stats = prefill_once(model, ids, _TimedDense())
    share = timed_stats["attention_seconds"] / timed
    base = statistics.median(times[None])
    result = {"length": length, "dense_seconds": base, "attention_share": share, "amdahl_bound": 1 / (1 - share)}
    print(f"\n== {length} tokens: dense prefill {base:.2f} s; attention {share:.0%} of it; Amdahl bound "
          f"{1 / (1 - share):.2f}x ==")  # fmt: skip
    ppl_dense = perplexity(model, ids, None) if ppl else None
    header = f"{'method':<44} {'prefill s':>9} {'speed-up':>8} {'density':>7} {'bound@d':>7} {'layers min/med/max':>18}"
    print(header + ("  ppl (vs dense)" if ppl else "") + "  kernel / statistics")
    rows = []
    for spec in methods:
        seconds = statistics.median(times[spec])
        st = stats[spec]
        density = st.get("prefill_density")
        bound = 1 / ((1 - share) + share * density) if density is not None else None
        extra = {k: v for k, v in st.items() if k.startswith("prefill_") and not k.startswith("prefill_density")}
        row = {
            "method": build(spec).spec(),
            "seconds": seconds,
            "speedup": base / seconds,
            "density": density,
            "bound_at_density": bound,
            "density_layers": st.get("prefill_density_layers"),
            "density_heads": st.get("prefill_density_heads"),
            **extra,
        }
        line = (
            f"{row['method']:<44} {seconds:>9.2f} {base / seconds:>7.2f}x {density if density is not None else '-':>7} "
            f"{(f'{bound:.2f}x' if bound else '-'):>7} {summarise_layers(st.get('prefill_density_layers')):>18}"
        )
        if ppl:
            p = perplexity(model, ids, spec)
            row.update(perplexity=p, perplexity_dense=ppl_dense, perplexity_ratio=p / ppl_dense)
            line += f"  {p:.3f} ({p / ppl_dense:.3f})"
        print(line + "  " + ", ".join(f"{k}={v}" for k, v in extra.items()))
        rows.append(row)
    if ppl:
        print(f"{'dense perplexity':<44} {ppl_dense:.3f}")
    result["methods"] = rows
    return result


def kernels(lengths: list[int], densities: list[float], repeats: int, block: int) -> list[dict]:
    """The kernel micro-benchmark: sdpa causal vs flex vs gather on random blocks, SmolLM2's attention shapes."""
    out = []
    print(f"{'tokens':>6} {'kernel':<8} {'density':>7} {'seconds':>8} {'vs sdpa':>8}")
    for n in lengths:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 9, n, 64, generator=gen)
        k, v = torch.randn(1, 3, n, 64, generator=gen), torch.randn(1, 3, n, 64, generator=gen)
        module = torch.nn.Module()
        module.num_key_value_groups, module.is_causal = 3, True
        call = AttentionCall(module, q, k, v, None, torch.arange(n).expand(1, 3, n), 64**-0.5)

        def best(fn):
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        base = best(lambda c=call: dense(c))
        print(f"{n:>6} {'sdpa':<8} {1.0:>7.2f} {base:>8.4f} {1.0:>7.2f}x")
        out.append({"tokens": n, "kernel": "sdpa", "density": 1.0, "seconds": base})
        nb = sparse.n_blocks(n, block)
        for d in densities:
            blocks = torch.rand(1, 9, nb, nb, generator=gen) < d
            blocks = (blocks | sparse.diagonal(n, n, block)) & sparse.causal_blocks(n, n, block)
            real = float((blocks.float() * sparse.causal_pairs(n, n, block)).sum() / (9 * n * (n + 1) / 2))
            for name, fn in (("flex", sparse._flex), ("gather", sparse._gather)):
                seconds = best(lambda fn=fn, c=call, m=blocks: fn(c, m, block, None))
                print(f"{n:>6} {name:<8} {real:>7.2f} {seconds:>8.4f} {base / seconds:>7.2f}x")
                out.append({"tokens": n, "kernel": name, "density": real, "seconds": seconds})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192", help="comma-separated prompt lengths in tokens")
    ap.add_argument("--methods", default=";".join(DEFAULT_METHODS), help="semicolon-separated prefill method specs")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (median reported)")
    ap.add_argument("--perplexity", action="store_true", help="also the perplexity of the prompt per method")
    ap.add_argument("--kernels", action="store_true", help="only the kernel micro-benchmark (random tensors)")
    ap.add_argument("--densities", default="1.0,0.5,0.25", help="block densities of the kernel micro-benchmark")
    ap.add_argument("--block", type=int, default=128, help="block size of the kernel micro-benchmark")
    ap.add_argument("--json", default=None, help="write every figure (per-head densities included) to this file")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    if args.kernels:
        results = kernels(lengths, [float(x) for x in args.densities.split(",")], args.repeats, args.block)
    else:
        model, tokenizer = load_model()
        methods = [m.strip() for m in args.methods.split(";") if m.strip()]
        results = [run_length(model, tokenizer, n, methods, args.repeats, args.perplexity) for n in lengths]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
