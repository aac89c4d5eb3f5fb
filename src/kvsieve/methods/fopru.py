"""``fopru``: Focal Pruning, visual tokens ranked by the vision encoder's attention, as a global rank or by rows.

Jiang et al., "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (2024). A token's significance is
the attention it receives in the vision encoder (the layer whose output the LLM gets). The ``rank`` strategy keeps
the most significant tokens of the whole image; the ``row`` strategy keeps whole rows of the token grid, the most
significant rows first, to preserve continuous regions. Kept tokens go on in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..vision import VisionChoice, VisionPruner, VisionView, top_sorted
from . import register
from .base import hp


def row_keep(significance: torch.Tensor, grid: tuple[int, int], count: int) -> torch.Tensor:
    """Whole grid rows by mean significance (best first) until ``count`` tokens; the last row partly, by token."""
    rows, cols = grid
    per_row = significance[: rows * cols].view(rows, cols)
    order = per_row.mean(dim=1).argsort(descending=True, stable=True)
    chosen: list[torch.Tensor] = []
    left = count
    for r in order.tolist():
        if left <= 0:
            break
        take = min(cols, left)
        cols_kept = top_sorted(per_row[r], take)
        chosen.append(r * cols + cols_kept)
        left -= take
    return torch.cat(chosen).sort().values


@register
@dataclass
class FoPru(VisionPruner):
    """Keep ``keep`` of each image's tokens by encoder attention: ``strategy="rank"`` (global top) or ``"row"``
    (the most significant rows of the token grid)."""

    strategy: str = hp("rank", choices=("rank", "row"))

    name = "fopru"
    paper = "Jiang et al. 2024, FoPru: Focal Pruning"
    needs = "vision encoder attention at the penultimate layer"
    simplifications = (
        "significance is the attention each token receives at the penultimate encoder layer, averaged over heads "
        "and queries and pooled onto the tokens the LLM receives (2x2 merged tokens for Qwen2-VL/Qwen2.5-VL/"
        "Qwen3-VL/Idefics3); on Qwen2.5-VL the attention is read at the full-attention encoder block nearest the "
        "penultimate layer (its windowed blocks never attend over the whole image)"
    )

    def select_vision(self, view: VisionView) -> VisionChoice:
        sig = view.attention(view.n_encoder_layers - 2, "received")
        keep = []
        for u in range(view.n_units):
            count = view.count(u)
            if self.strategy == "rank":
                keep.append(top_sorted(sig[u], count))
            else:
                keep.append(row_keep(sig[u], view.grid(u), count))
        return VisionChoice(keep)
