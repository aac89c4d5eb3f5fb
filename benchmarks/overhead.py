"""Prefill and per-token decode time of each method relative to `full`, measured in one run.

Usage: python benchmarks/overhead.py [--context 2048] [--steps 16] [--repeats 3] [--methods ...]

Each method prefills the same random-token prompt (single pass, the method compressing at the end as in kvpress)
and then decodes ``--steps`` tokens greedily while evicting at every step (token budget = the compressed size).
Methods are interleaved round-robin over ``--repeats`` rounds and the median is reported, so load on the machine
affects every method alike. Ratios are ours / full from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvsieve import Sieve, load_model, prefill
from kvsieve.compat import cache_kwargs

DEFAULT_METHODS = "full,streaming_llm,h2o,a2sf,snapkv,tova,knorm,random,adakv:snapkv"


def measure(model, ids: torch.Tensor, spec: str, budget: int, steps: int) -> tuple[float, float]:
    sieve = Sieve(spec) if spec == "full" else Sieve(spec, budget=budget)
    with sieve.attach(model) as cache, torch.no_grad():
        t0 = time.perf_counter()
        logits = prefill(model, ids, cache)
        t_prefill = time.perf_counter() - t0
        token = logits.argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(steps):
            token = (
                model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
                .logits[:, -1]
                .argmax(-1, True)
            )
        t_decode = (time.perf_counter() - t1) / steps
    return t_prefill, t_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--compression", type=float, default=0.5, help="budget = context x (1 - compression)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.context), generator=gen)
    budget = int(args.context * (1 - args.compression))
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    measure(model, ids[:, :256], "full", budget, 2)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in specs}
    for _ in range(args.repeats):
        for spec in specs:
            times[spec].append(measure(model, ids, spec, budget, args.steps))
    med = {s: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for s, v in times.items()}
    base_p, base_d = med["full"] if "full" in med else next(iter(med.values()))
    print(
        f"model {args.model}, context {args.context}, budget {budget} tokens (compression {args.compression}), "
        f"{args.steps} decode steps, median of {args.repeats}, {args.threads} threads"
    )
    print(f"{'method':<16}{'prefill s':>11}{'/ full':>9}{'decode ms/tok':>15}{'/ full':>9}")
    for spec, (p, d) in med.items():
        print(f"{spec:<16}{p:>11.3f}{p / base_p:>9.2f}{d * 1000:>15.1f}{d / base_d:>9.2f}")


if __name__ == "__main__":
    main()
