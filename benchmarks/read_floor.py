"""What the selective-read path costs with no selection at all, against plain transformers holding as many tokens.

A read method's decoding step gathers the chosen slots of every layer by row index and attends to them only. This
benchmark reads a *fixed* set of ``N`` slots per layer (the first ``N - 16`` and the last 16: no scoring, no top-k),
so its time over ``plain@N`` (a ``DynamicCache`` of only ``N`` tokens) is the floor of any selective-read method
that selects per layer on this machine; ``quest(dense_layers=0)`` adds Quest's page selection on top, and ``quest``
its two dense layers. Configurations take turns step by step, each step counts its fastest round (as in
``decode_speed.py``).

    python benchmarks/read_floor.py                     # an 8,100-token prompt, reading 256
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass

import torch

from decode_speed import Config, decode_round, fastest_mean, plain_cache
from kvsieve import Sieve
from kvsieve.methods.base import Observation
from kvsieve.methods.families import SelectiveMethod
from kvsieve.models import load_model
from kvsieve.snapshot import PrefillSnapshot
from prompts import prompt_ids


@dataclass
class FixedReads(SelectiveMethod):
    """Reads the first ``budget - 16`` held slots and the last 16 at every layer and step: the read path alone."""

    name = "fixed_reads"
    paper = "(benchmark only)"

    def reads(self, obs: Observation) -> torch.Tensor | None:
        b, h, t, _ = obs.keys.shape
        budget = obs.read_budget
        if budget >= t:
            return None
        slots = torch.cat([torch.arange(budget - 16), torch.arange(t - 16, t)]).to(obs.keys.device)
        return slots.expand(b, h, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=8100)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    ids = prompt_ids(tokenizer, args.context)
    n = args.budget
    rounds: dict[str, list[list[float]]] = defaultdict(list)
    for _ in range(args.repeats):
        snapshot = PrefillSnapshot(model, ids, [])
        configs = [Config(f"plain@{n}", n, plain_cache(model, snapshot, n), None, snapshot.last_logits)]
        for label, sieve in [
            ("fixed reads (no selection)", Sieve(FixedReads(), budget=n)),
            ("quest(dense_layers=0)", Sieve("quest(dense_layers=0)", budget=n)),
            ("quest", Sieve("quest", budget=n)),
        ]:
            with sieve.attach(model):
                cache = snapshot.compress(sieve.method, None)
            configs.append(Config(label, n, cache, sieve, snapshot.last_logits))
        del snapshot
        decode_round(model, configs, 3, args.steps)
        for config in configs:
            rounds[config.label].append(config.times)
    per_token = fastest_mean(rounds)
    base = per_token[f"plain@{n}"]
    print(f"{args.context}-token prompt, reading {n}; {args.steps} steps interleaved, fastest of {args.repeats} rounds")
    print(f"  {'configuration':<30}{'ms/token':>10}{'/ plain@N':>11}")
    for label, seconds in per_token.items():
        print(f"  {label:<30}{seconds * 1e3:>10.1f}{seconds / base:>11.2f}")


if __name__ == "__main__":
    main()
