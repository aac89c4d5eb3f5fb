"""``pyramidkv``: per-layer budgets decreasing linearly with depth, around any scorer.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024). Lower layers
attend broadly and keep more tokens, upper layers attend to a few and keep fewer: layer ``l`` of ``L`` keeps
``max - l * (max - min) / (L - 1)`` tokens per head with ``min = b / beta`` and ``max = 2 b - min``, so the mean over
layers is the model-wide budget ``b`` (kvpress's ``PyramidKVPress``, ``beta = 20``). Budgets are rounded so that
they sum to exactly ``L x b``. The scorer is the wrapped method (SnapKV in the paper, the default here).

As in kvpress, the largest budget is capped at the tokens seen minus the inner method's observation window (the
smallest raised to keep the mean), and budgets become uniform when that inverts them (low compression).

Simplifications: ``layer_budget`` is not given the number of tokens seen, so the method reads it from the observation
of an earlier layer in the same pass; the first compressed layer of each pass, which has none, uses the uncapped
pyramid (where the cap would bind, it keeps everything instead of all but the window). kvpress's fallback to
uniform budgets when the smallest budget is below the window is not applied.

Also home of :class:`Wrapper`, the delegating base the other wrappers (kvcrush, kivi, zipcache, minicache) share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import AttentionRequest
from ..cache import Segment
from ..errors import KVSieveError
from . import build, register
from .base import Method, Observation, overrides


@dataclass
class Wrapper(Method):
    """A method around ``inner``: every hook goes to ``inner`` unless the subclass changes it.

    ``default_inner``: the spec built when no inner method is given (None: the wrapper works without one).
    """

    inner: Method | None = None

    default_inner: ClassVar[str | None] = "snapkv"
    delegates: ClassVar[tuple[str, ...]] = ("select", "reads", "logit_bias", "merge", "pack")

    def __post_init__(self) -> None:
        if self.inner is None and self.default_inner is not None:
            self.inner = build(self.default_inner)
        if self.inner is not None:
            self.rerotate = self.inner.rerotate
            self.selects = self.inner.selects

    @property
    def _in(self) -> Method:
        if self.inner is None:
            raise KVSieveError(f"{self.name} has no inner method to score tokens; write {self.name}:<method>")
        return self.inner

    def check_budget(self, tokens: int) -> None:
        if self.inner is not None:
            self.inner.check_budget(tokens)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        return self.inner.layer_budget(budget, layer_idx, n_layers) if self.inner is not None else budget

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return self.inner.attention_request(evicting) if self.inner is not None else None

    def observe(self, obs: Observation) -> None:
        if self.inner is not None:
            self.inner.observe(obs)

    def score(self, obs: Observation) -> torch.Tensor:
        return self._in.score(obs)

    def select(self, scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
        return self._in.select(scores, budget)

    def reads(self, obs: Observation) -> torch.Tensor | None:
        return self.inner.reads(obs) if self.inner is not None else None

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        return self.inner.logit_bias(obs) if self.inner is not None else None

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.merge(obs, keep) if self.inner is not None else None

    def pack(self, segment: Segment) -> Segment:
        return self.inner.pack(segment) if self.inner is not None else segment


def packs(method: Method | None) -> bool:
    """True if ``method`` or a method it wraps transforms storage in ``pack`` (quantisation, layer sharing)."""
    return overrides(method, "pack")


def pyramid_budgets(budget: int, n_layers: int, beta: float, context: int | None = None, window: int = 0) -> list[int]:
    """Per-layer budgets, largest first, decreasing linearly, summing to ``budget x n_layers`` (each at least 1).

    ``context``: tokens the layers have seen, if known. As in kvpress, the largest budget is then capped at
    ``context - window`` and the smallest raised to keep the mean; if that inverts them, budgets are uniform.
    """
    if n_layers == 1:
        return [budget]
    low = budget / beta
    high = 2 * budget - low
    if context is not None and high > context - window:
        high = context - window
        low = 2 * budget - high
        if low > high:
            return [budget] * n_layers
    step = (high - low) / (n_layers - 1)
    exact = [high - i * step for i in range(n_layers)]
    out = [max(1, int(x)) for x in exact]
    total = budget * n_layers
    # largest remainders get the leftover tokens (or the largest layers give back an excess), so the total is exact
    for i in sorted(range(n_layers), key=lambda i: exact[i] - out[i], reverse=True)[: max(0, total - sum(out))]:
        out[i] += 1
    while sum(out) > total:
        out[out.index(max(out))] -= 1
    return out


@register
@dataclass
class PyramidKV(Wrapper):
    """Wraps ``inner`` (default SnapKV): its scores, with layer budgets decreasing linearly with depth.

    beta: steepness (kvpress: 20); the top layer keeps ``b / beta`` tokens, the bottom one ``2 b - b / beta``.
    """

    beta: float = 20.0

    name = "pyramidkv"
    family = "budget wrapper"
    paper = "Cai et al. 2024, arXiv:2406.02069"
    needs = "the wrapped method's needs"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 1:
            raise KVSieveError(f"beta must be at least 1 (kvpress uses 20), got {self.beta}")
        self._seen: tuple[int, int] | None = None  # (layer, tokens seen) of the last observation

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        self._seen = (obs.layer_idx, int(obs.positions.max()) + 1)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        budget = self._in.layer_budget(budget, layer_idx, n_layers)
        # tokens seen, known once an earlier layer of this pass has been observed (every layer sees the same tokens)
        seen = self._seen[1] if self._seen is not None and self._seen[0] < layer_idx else None
        window = int(getattr(self._in, "window", 0) or 0)
        return pyramid_budgets(budget, n_layers, self.beta, seen, window)[layer_idx]
