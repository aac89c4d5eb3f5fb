"""``random``: the control. Keeps a uniformly random subset of tokens; any method must beat it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation


@register
@dataclass
class Random(Method):
    """Uniformly random scores from a generator seeded per layer and step, so runs repeat exactly.

    seed: base seed (a whole number); the generator for a layer's eviction is seeded with ``(seed, layer, newest
    position)``, per batch row, so a row of a batch gets the scores it would get alone.
    """

    seed: int = 0

    name = "random"
    family = "control"
    paper = "-"
    needs = "nothing"
    simplifications = (
        "none (a control): one draw per stream position from a generator seeded by (seed, layer, newest position), so "
        "runs repeat and a batch row gets the scores it gets alone"
    )

    def score(self, obs: Observation) -> torch.Tensor:
        rows = []
        h = obs.positions.shape[1]
        for b in range(obs.positions.shape[0]):
            step = int(obs.positions[b].max())
            # hashes of int tuples are the same in every process (unlike strings'): runs repeat across processes
            gen = torch.Generator(device="cpu").manual_seed(hash((self.seed, obs.layer_idx, step)) & 0x7FFFFFFF)
            # one draw per stream position, so a token's score does not depend on its slot or on padding
            table = torch.rand(h, step + 1, generator=gen).to(obs.keys.device)
            rows.append(table.gather(1, obs.positions[b].clamp(min=0)))
        return torch.stack(rows)
