"""Decode speed of periodic decode-time compression (evict every 64 steps) against evicting at every step, one run.

kvpress's ``DecodingPress`` compresses every ``compression_interval`` steps down to ``target_size``; kvsieve's token
budget does the same (``Sieve(method, budget=N, interval=k)``: held <= N + k - 1). For each method the prompt is
prefilled once (:class:`kvsieve.snapshot.PrefillSnapshot`), compressed to ``N`` for both configurations, and then the
two decode greedily, taking turns step by step (a burst of load hits both alike); each step counts its fastest of
``--repeats`` rounds. Printed per method: ms/token with ``interval=64`` and with ``interval=1``, their ratio (every
step / periodic: above 1 means periodic is faster), and the most tokens a layer held in each.

    python benchmarks/periodic_decode.py                                  # 4k prompt, budget 1024, 128 steps
    python benchmarks/periodic_decode.py --context 512 --budget 128 --steps 32 --repeats 1 --methods snapkv   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvsieve import Sieve, build, cache_kwargs
from kvsieve.models import load_model
from kvsieve.snapshot import PrefillSnapshot
from prompts import prompt_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--interval", type=int, default=64)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="snapkv,knorm,streaming_llm,tova")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    ids = prompt_ids(tok, args.context)
    methods = [build(spec) for spec in args.methods.split(",")]
    snapshot = PrefillSnapshot(model, ids, methods)
    print(
        f"SmolLM2-135M, {args.context}-token prompt, budget {args.budget}, {args.steps} decoding steps, "
        f"best of {args.repeats} rounds per step; ratio = every-step time / periodic time (>1: periodic faster)"
    )
    print(f"{'method':<16}{'periodic ms/tok':>17}{'every-step ms/tok':>19}{'ratio':>8}{'held max':>14}")
    for method in methods:
        intervals = (args.interval, 1)
        best = {k: [float("inf")] * args.steps for k in intervals}
        peak = dict.fromkeys(intervals, 0)
        for _ in range(args.repeats):
            runs = {}
            for k in intervals:
                sieve = Sieve(method, budget=args.budget, interval=k)
                with sieve.attach(model):
                    runs[k] = (sieve, snapshot.compress(method, sieve.budget), snapshot.last_logits)
            with torch.no_grad():
                for step in range(args.steps):
                    for k in intervals:  # the two configurations take turns, each re-entering its block (not timed)
                        sieve, cache, logits = runs[k]
                        token = logits.argmax(-1, keepdim=True)
                        with sieve.attach(model, cache=cache):
                            t0 = time.perf_counter()
                            out = model(token, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
                            best[k][step] = min(best[k][step], time.perf_counter() - t0)
                        runs[k] = (sieve, cache, out)
                        peak[k] = max(peak[k], max(t if isinstance(t, int) else max(t) for t in cache.kv_tokens()))
        ms = {k: 1000 * statistics.mean(best[k]) for k in intervals}
        held = f"{peak[args.interval]}/{peak[1]}"
        print(f"{method.spec():<16}{ms[args.interval]:>17.2f}{ms[1]:>19.2f}{ms[1] / ms[args.interval]:>8.2f}{held:>14}")


if __name__ == "__main__":
    main()
