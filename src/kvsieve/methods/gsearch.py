"""``gsearch`` and ``psigmoid``: per-layer token budgets (Zhao et al.), with the greedy search that finds them.

Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction" (2024).
The ranking of
tokens by attention is stable across layers except the first, so the number of tokens a layer needs does not grow
with depth. G-Search finds, from shallow to deep, the fewest tokens each layer can keep without changing the output
(:func:`greedy_schedule`, run on calibration prompts); the method then prunes to that schedule, ranking by the last
query's attention at each step. P-Sigmoid replaces the schedule by a parametric sigmoid over the layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from ..sequence import Pruner, Stage, StageView
from . import register
from .base import hp


@register
@dataclass
class GSearch(Pruner):
    """Prune to a per-layer schedule ``((layer, keep), ...)`` found by :func:`greedy_schedule`.

    schedule: pairs (prune after this layer, share of the candidates left), layers increasing and shares not
    increasing; empty: one stage after ``layer`` keeping ``keep``. Ranking: the last query's attention at each step.
    """

    schedule: tuple = hp(())

    name = "gsearch"
    paper = "Zhao et al. 2024, Searching Optimal Vision Token Reduction"
    needs = "attention of the last query at each pruning layer; a schedule from greedy_schedule()"
    simplifications = (
        "the search criterion is 'the greedy answer on the calibration prompts is unchanged' (the paper: task "
        "accuracy on a calibration set); attention recomputed over this pass's tokens"
    )

    def validate(self) -> None:
        for pair in self.schedule:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and 0.0 <= float(pair[1]) <= 1.0):
                raise KVSieveError(f"gsearch: schedule entries are (layer, keep share in [0, 1]), got {pair!r}")

    def stages(self, n_layers: int) -> list[Stage]:
        if not self.schedule:
            return [Stage(self.layer, self.keep)]
        return [Stage(int(layer), float(keep)) for layer, keep in self.schedule]

    def rank(self, view: StageView) -> torch.Tensor:
        return view.attention("last")


@register
@dataclass
class PSigmoid(Pruner):
    """Keep ``keep + (1 - keep) / (1 + exp(slope x (l - center)))`` of the candidates after each layer ``l`` from
    ``layer`` on (``center``: the layer where half the drop is done; None: the middle of the remaining layers).

    The paper tunes ``slope`` and ``center`` by Bayesian optimisation against a FLOPs budget; here they are given.
    """

    slope: float = hp(0.5, gt=0.0)
    center: float | None = hp(None)
    every: int = hp(1, ge=1)

    name = "psigmoid"
    paper = "Zhao et al. 2024, Searching Optimal Vision Token Reduction"
    needs = "attention of the last query at each pruning layer"
    simplifications = "slope and center are hyperparameters (the paper fits them by Bayesian optimisation)"

    def stages(self, n_layers: int) -> list[Stage]:
        last = n_layers - 2
        center = self.center if self.center is not None else (self.layer + last) / 2
        out = []
        for layer in range(self.layer, last + 1, self.every):
            share = self.keep + (1.0 - self.keep) / (1.0 + math.exp(self.slope * (layer - center)))
            out.append(Stage(layer, share if layer < last else self.keep))
        if out and out[-1].after != last:
            out.append(Stage(last, self.keep))
        return out

    def rank(self, view: StageView) -> torch.Tensor:
        return view.attention("last")


def greedy_schedule(
    answers_unchanged: Callable[[str], bool], layers: list[int], steps: tuple[float, ...] = (0.9, 0.75, 0.5, 0.25, 0.1)
) -> tuple:
    """G-Search: from the shallowest layer to the deepest, the smallest keep share (from ``steps``, not above the
    previous layer's) that leaves the outputs unchanged.

    ``answers_unchanged(spec)`` runs the calibration prompts with the sequence method ``spec`` (a ``gsearch`` spec
    string) and says whether every greedy answer equals the unpruned one. Returns the schedule for ``gsearch``.
    """
    schedule: list[tuple[int, float]] = []
    ceiling = 1.0
    for layer in layers:
        best = ceiling
        for share in (s for s in steps if s < ceiling):
            trial = (*schedule, (layer, share))
            if answers_unchanged(f"gsearch(schedule={trial!r})"):
                best = share
            else:
                break
        if best < ceiling:
            schedule.append((layer, best))
        ceiling = best
    return tuple(schedule)
