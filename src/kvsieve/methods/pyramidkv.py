"""``pyramidkv``: per-layer budgets decreasing linearly with depth, around any scorer.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024). Lower layers
attend broadly and keep more tokens, upper layers attend to a few and keep fewer: layer ``l`` of ``L`` keeps
``max - l * (max - min) / (L - 1)`` tokens per head with ``min = b / beta`` and ``max = 2 b - min``, so the mean over
layers is the model-wide budget ``b`` (kvpress's ``PyramidKVPress``, ``beta = 20``). Budgets are rounded so that
they sum to exactly ``L x b``. The scorer is the wrapped method (SnapKV in the paper, the default here).

Simplifications: the paper (and kvpress) cap the largest budget at the prompt length minus the observation window
and shift the rest to the other layers; ``layer_budget`` does not receive the number of tokens a layer holds, so a
layer whose pyramid budget exceeds what it holds simply keeps everything (at compression below about 0.5 the lower
layers then hold fewer than their share, and the mean is below ``b``).

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
from .base import Method, Observation


@dataclass
class Wrapper(Method):
    """A method around ``inner``: every hook goes to ``inner`` unless the subclass changes it.

    ``default_inner``: the spec built when no inner method is given (None: the wrapper works without one).
    """

    inner: Method | None = None

    default_inner: ClassVar[str | None] = "snapkv"

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
    while method is not None:
        if type(method).pack not in (Method.pack, Wrapper.pack):
            return True
        method = getattr(method, "inner", None)
    return False


def pyramid_budgets(budget: int, n_layers: int, beta: float) -> list[int]:
    """Per-layer budgets, largest first, decreasing linearly, summing to ``budget x n_layers`` (each at least 1)."""
    if n_layers == 1:
        return [budget]
    low = budget / beta
    high = 2 * budget - low
    step = (high - low) / (n_layers - 1)
    exact = [high - i * step for i in range(n_layers)]
    out = [int(x) for x in exact]
    # largest remainders get the leftover tokens, so the total is exact
    for i in sorted(range(n_layers), key=lambda i: exact[i] - out[i], reverse=True)[: budget * n_layers - sum(out)]:
        out[i] += 1
    return [max(1, x) for x in out]


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

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        budget = self._in.layer_budget(budget, layer_idx, n_layers)
        return pyramid_budgets(budget, n_layers, self.beta)[layer_idx]
