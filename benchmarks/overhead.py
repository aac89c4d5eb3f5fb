"""Prefill and per-token decode time of each method relative to `full`, measured in one run.

Usage: python benchmarks/overhead.py [--context 2048] [--steps 64] [--repeats 3] [--methods ...]

Each method prefills the same random-token prompt (single pass, the method compressing at the end as in kvpress) to a
token budget of ``context x (1 - compression)`` and then decodes ``--steps`` tokens greedily, evicting down to the
budget every ``interval`` steps (the default, 16; ``--interval 1`` evicts at every step). The methods take turns step by
step, so a burst of load hits them alike; the whole is repeated ``--repeats`` times, each step (and each prefill) counts
its fastest round, and a method's decode time is the mean over its steps (``decode_speed.py``'s rounds). Ratios are ours
over `full` from the same run; the target of the core (issue 9) is a decode ratio of at most 1.1 for every method.
"""

from __future__ import annotations

import argparse
import time

import torch

from decode_speed import Config, decode_round, fastest_mean
from kvsieve import Sieve, load_model, prefill

DEFAULT_METHODS = "full,streaming_llm,h2o,a2sf,snapkv,tova,knorm,random,adakv:snapkv"


def prefilled(model, ids: torch.Tensor, spec: str, budget: int, interval: int | None) -> tuple[Config, float]:
    """One method's prompt prefilled into its own cache: the configuration that decodes from it, and the seconds."""
    extra = {} if interval is None else {"interval": interval}
    sieve = Sieve(spec) if spec == "full" else Sieve(spec, budget=budget, **extra)
    with sieve.attach(model) as cache, torch.no_grad():
        t0 = time.perf_counter()
        logits = prefill(model, ids, cache)
        seconds = time.perf_counter() - t0
    return Config(spec, None, cache, sieve, logits), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--compression", type=float, default=0.5, help="budget = context x (1 - compression)")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--interval", type=int, default=None, help="evict every N decoding steps (default: 16)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, args.context), generator=gen)
    budget = int(args.context * (1 - args.compression))
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    decode_round(model, [prefilled(model, ids[:, :256], "full", budget, None)[0]], 0, 1)  # warm-up
    prefills: dict[str, list[float]] = {s: [] for s in specs}
    decodes: dict[str, list[list[float]]] = {s: [] for s in specs}
    for _ in range(args.repeats):
        made = {spec: prefilled(model, ids, spec, budget, args.interval) for spec in specs}
        decode_round(model, [config for config, _ in made.values()], 0, args.steps)
        for spec, (config, seconds) in made.items():
            prefills[spec].append(seconds)
            decodes[spec].append(config.times)
        del made
    decode = fastest_mean(decodes)
    best = {s: (min(prefills[s]), decode[s]) for s in specs}
    base_p, base_d = best["full"] if "full" in best else next(iter(best.values()))
    interval = "default interval (16)" if args.interval is None else f"interval {args.interval}"
    print(
        f"model {args.model}, context {args.context}, budget {budget} tokens (compression {args.compression}), "
        f"{interval}, {args.steps} decode steps interleaved, fastest of {args.repeats} rounds per step, "
        f"{args.threads} threads"
    )
    print(f"{'method':<16}{'prefill s':>11}{'/ full':>9}{'decode ms/tok':>15}{'/ full':>9}")
    for spec, (p, d) in best.items():
        print(f"{spec:<16}{p:>11.3f}{p / base_p:>9.2f}{d * 1000:>15.1f}{d / base_d:>9.2f}")
    worst = max((d / base_d, s) for s, (_, d) in best.items())
    verdict = "met" if worst[0] <= 1.1 else "NOT met"
    print(f"target: every method's decode / full <= 1.1: {verdict} (highest: {worst[1]} {worst[0]:.2f})")


if __name__ == "__main__":
    main()
