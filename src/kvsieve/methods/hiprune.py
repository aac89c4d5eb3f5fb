"""``hiprune``: anchors from a middle encoder layer, buffers next to them, registers from the output layer.

Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models"
(2025). Middle layers of a ViT attend to the object, deep layers to global context. HiPrune keeps anchor tokens (the
highest attention in an object-centric middle layer), buffer tokens (the grid neighbours of each anchor, for spatial
continuity), together ``alpha`` of the budget, then fills the budget with register tokens (the highest attention at
the encoder's output layer). Attention is what each token receives, so no [CLS] token is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..vision import VisionChoice, VisionPruner, VisionView
from . import register
from .base import hp


def anchors_and_buffers(score: torch.Tensor, grid: tuple[int, int], budget: int) -> list[int]:
    """Anchors by ``score`` (best first), each followed by its 4 grid neighbours, until ``budget`` tokens."""
    rows, cols = grid
    chosen: list[int] = []
    seen: set[int] = set()
    for a in score.argsort(descending=True, stable=True).tolist():
        if len(chosen) >= budget:
            break
        r, c = divmod(a, cols)
        for rr, cc in ((r, c), (r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            t = rr * cols + cc
            if 0 <= rr < rows and 0 <= cc < cols and t not in seen and len(chosen) < budget:
                seen.add(t)
                chosen.append(t)
    return chosen


@register
@dataclass
class HiPrune(VisionPruner):
    """Keep ``keep`` of each image's tokens: anchors + buffers (``alpha`` of them) from the object layer, registers
    from the output layer.

    alpha: share of the kept tokens that are anchors and buffers (the paper: 0.1).
    object_layer: the middle encoder layer (0-based; None: 37.5% of the depth, the paper's layer 9 of CLIP's 24).
    """

    alpha: float = hp(0.1, ge=0.0, le=1.0)
    object_layer: int | None = hp(None)

    name = "hiprune"
    paper = "Liu et al. 2025, HiPrune"
    needs = "vision encoder attention at a middle and at the output layer"
    simplifications = (
        "attention received (averaged over queries and heads) pooled onto the LLM's tokens; buffers are the 4 grid "
        "neighbours of each anchor, taken anchor by anchor; on Qwen2.5-VL each of the two layers is read at the "
        "nearest full-attention encoder block (its windowed blocks never attend over the whole image)"
    )

    def _object(self, n: int) -> int:
        return self.object_layer % n if self.object_layer is not None else max(0, round(0.375 * n) - 1)

    def encoder_layers(self, n: int) -> list[int]:
        return sorted({self._object(n), n - 1})

    def select_vision(self, view: VisionView) -> VisionChoice:
        n = view.n_encoder_layers
        middle = view.attention(self._object(n), "received")
        deep = view.attention(n - 1, "received")
        keep = []
        for u in range(view.n_units):
            count = view.count(u)
            first = anchors_and_buffers(middle[u], view.grid(u), round(self.alpha * count))
            taken = torch.zeros(deep[u].shape[0], dtype=torch.bool)
            taken[first] = True
            registers = deep[u].masked_fill(taken, float("-inf")).argsort(descending=True, stable=True)
            chosen = torch.cat([torch.tensor(first, dtype=torch.long), registers[: count - len(first)]])
            keep.append(chosen.sort().values)
        return VisionChoice(keep)
