"""``vflowopt``: visual tokens ranked by attention relevance plus patch entropy; pruned tokens recycled by region.

Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization" (ICCV
2025, arXiv:2508.05211; reference code github.com/sihany077/VFlowOpt). Importance of a visual token at an encoder
layer: the attention it gets from the *global* tokens (those receiving more than ``t`` times the mean attention;
heads averaged), plus ``alpha`` x the softmax over the image of its patch's entropy (grey-level histogram of the
pixels: flat regions carry little information). The most important tokens go on; the others are not thrown away but
recycled: grouped by ``cell`` x ``cell`` regions of the token grid, each group's features averaged with its
importances as weights, the result put in place of the group's most important token, which goes on as an aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vision import VisionChoice, VisionPruner, VisionView
from . import register
from .base import hp


def global_attention(matrix: torch.Tensor, t: float) -> torch.Tensor:
    """Attention ``(P,)`` each token gets from the global tokens: rows of those receiving ``> t x`` the mean
    attention received (all rows when none does), averaged."""
    received = matrix.mean(dim=0)
    rows = (received > t * received.mean()).nonzero().flatten()
    if rows.numel() == 0:
        rows = torch.arange(matrix.shape[0])
    return matrix[rows].mean(dim=0)


def recycle(
    importance: torch.Tensor, grid: tuple[int, int], count: int, cell: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Split ``count`` kept tokens between the most important tokens and one aggregate per occupied ``cell`` region of
    the rest: returns (the kept indices, sorted; the groups, each a tensor of indices whose first is its kept token).

    The top tokens are taken one fewer at a time while the top tokens plus the regions the rest occupy exceed
    ``count``; when even no top token leaves too many regions, the regions of the largest total importance go on and
    the rest are dropped."""
    n = importance.shape[0]
    cols = grid[1]
    region = torch.tensor([(i // cols) // cell * 10_000 + (i % cols) // cell for i in range(n)])
    order = importance.argsort(descending=True, stable=True)
    top = min(count, n)
    occupied: dict[int, int] = {}
    for i in order[top:].tolist():
        occupied[int(region[i])] = occupied.get(int(region[i]), 0) + 1
    while top > 0 and top + len(occupied) > count:
        top -= 1
        r = int(region[order[top]])
        occupied[r] = occupied.get(r, 0) + 1
    rest = order[top:]
    groups: list[torch.Tensor] = []
    for r in dict.fromkeys(region[rest].tolist()):
        members = rest[region[rest] == r]
        members = members[importance[members].argsort(descending=True, stable=True)]
        groups.append(members)
    if top + len(groups) > count:  # more regions than the budget: the most important regions go on
        groups.sort(key=lambda g: -float(importance[g].sum()))
        groups = groups[: count - top]
    kept = torch.cat([order[:top], torch.tensor([int(g[0]) for g in groups], dtype=torch.long)])
    return kept.sort().values, groups


@register
@dataclass
class VFlowOpt(VisionPruner):
    """Keep ``keep`` of each image's tokens: the most important (global-token attention + ``alpha`` x patch-entropy
    softmax) and one recycled aggregate per ``cell`` x ``cell`` region of the pruned ones.

    t: global tokens receive more than ``t`` x the mean attention (the reference code: 7).
    alpha: weight of the patch-entropy term.
    cell: side of the recycling regions, in tokens.
    encoder_layer: encoder layer of the attention (None: the penultimate, the feature layer of LLaVA).
    """

    t: float = hp(7.0, ge=0.0)
    alpha: float = hp(0.5, ge=0.0)
    cell: int = hp(4, ge=1)
    encoder_layer: int | None = hp(None)

    name = "vflowopt"
    paper = "Yang et al. 2025, VFlowOpt, arXiv:2508.05211"
    needs = "vision encoder attention matrix at one layer and the image's pixels"
    encoder_extras = frozenset({"matrix", "entropy"})
    simplifications = (
        "t, alpha and cell are fixed hyperparameters (the paper tunes them per model by its visual-information-flow "
        "optimisation); one pruning step before the LLM (the paper's progressive in-LLM steps are not applied); "
        "patch entropy is taken on the processor-normalised pixels binned over the image's range; attention and "
        "entropy are pooled onto the LLM's tokens (2x2 merged for Qwen2-VL/Qwen2.5-VL/Qwen3-VL/Idefics3) and the "
        "attention renormalised to sum to one; aggregates are merged from the projected features the LLM receives; "
        "on Qwen2.5-VL the attention matrix is read at the nearest full-attention encoder block (its windowed blocks "
        "never attend over the whole image)"
    )

    def _layer(self, n: int) -> int:
        return self.encoder_layer % n if self.encoder_layer is not None else max(0, n - 2)

    def encoder_layers(self, n: int) -> list[int]:
        return [self._layer(n)]

    def select_vision(self, view: VisionView) -> VisionChoice:
        stats = view.encoder(self._layer(view.n_encoder_layers))
        entropy = view.entropy()
        keep, merged = [], []
        for u, feats in enumerate(view.features):
            attention = F.normalize(view.pool(global_attention(stats[u].matrix, self.t), u).float(), p=1, dim=0)
            importance = attention + self.alpha * entropy[u].float().softmax(dim=0)
            kept, groups = recycle(importance, view.grid(u), view.count(u), self.cell)
            keep.append(kept)
            rows = [g for g in groups if g.numel() > 1]
            if not rows:
                merged.append(None)
                continue
            mixed = []
            for g in rows:
                w = importance[g] / importance[g].sum().clamp(min=1e-12)
                mixed.append((w[:, None] * feats[g].float()).sum(dim=0))
            targets = torch.tensor([int(g[0]) for g in rows], dtype=torch.long)
            merged.append((targets, torch.stack(mixed).to(feats.dtype)))
        return VisionChoice(keep, merged)
