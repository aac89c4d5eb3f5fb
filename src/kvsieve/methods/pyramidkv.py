"""``pyramidkv``: per-layer budgets decreasing linearly with depth, around any scorer.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling" (2024). Lower layers
attend broadly and keep more tokens, upper layers attend to a few and keep fewer: layer ``l`` of ``L`` keeps
``max - l * (max - min) / (L - 1)`` tokens per head with ``min = b / beta`` and ``max = 2 b - min``, so the mean over
layers is the model-wide budget ``b`` (kvpress's ``PyramidKVPress``, ``beta = 20``). Budgets are rounded so that
they sum to exactly ``L x b``. The scorer is the wrapped method (SnapKV in the paper, the default here).

As in kvpress, the largest budget is capped at the tokens seen minus the inner method's observation window (the
smallest raised to keep the mean), and budgets become uniform when that inverts them (low compression).

Simplifications: kvpress's fallback to uniform budgets when the smallest budget is below the window is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register
from .base import LayerContext, Wrapper, hp


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

    beta: float = hp(20.0, ge=1.0)

    name = "pyramidkv"
    family = "budget wrapper"
    paper = "Cai et al. 2024, arXiv:2406.02069"
    needs = "the wrapped method's needs"
    simplifications = (
        "kvpress's fallback to uniform budgets when the smallest budget is below the window is not applied"
    )
    own_kind = "evict"
    default_inner = "snapkv"

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        budget = self._in.layer_budget(budget, ctx)
        window = int(getattr(self._in, "window", 0) or 0)
        return pyramid_budgets(budget, ctx.n_layers, self.beta, ctx.seen, window)[ctx.layer_idx]
