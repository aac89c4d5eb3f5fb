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

    seed: base seed; the generator for a layer's eviction is seeded with ``(seed, layer, tokens seen)``.
    """

    seed: int = 0

    name = "random"
    family = "control"
    paper = "-"
    needs = "nothing"

    def score(self, obs: Observation) -> torch.Tensor:
        step = int(obs.positions.max())
        gen = torch.Generator(device="cpu").manual_seed(hash((self.seed, obs.layer_idx, step)) & 0x7FFFFFFF)
        return torch.rand(obs.positions.shape, generator=gen).to(obs.keys.device)
