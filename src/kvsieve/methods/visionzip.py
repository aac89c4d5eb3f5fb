"""``visionzip``: dominant tokens by encoder attention plus contextual tokens merged from the rest, before the LLM.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025, arXiv:2412.04467).
Dominant tokens: those the [CLS] token attends to most at the encoder's penultimate layer. Contextual tokens: from
the remaining ones, targets picked at a uniform stride; every other remaining token joins the target whose key
(penultimate layer, averaged over heads) is most similar, and each target becomes the mean of its group. The field's
common baseline; 54 dominant + 10 contextual of 576 in the paper's 64-token LLaVA-1.5 setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vision import VisionChoice, VisionPruner, VisionView, top_sorted
from . import register
from .base import hp


def contextual_merge(features: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, n_ctx: int):
    """VisionZip's contextual tokens: targets at a uniform stride over ``rest`` (indices), every other rest token
    merged into its most similar target (cosine of ``keys``); returns (target indices, merged features)."""
    if n_ctx <= 0 or rest.numel() == 0:
        return rest[:0], features[:0]
    step = max(1, rest.numel() // n_ctx)
    pick = torch.arange(0, rest.numel(), step)[:n_ctx]
    targets = rest[pick]
    others = rest[torch.ones(rest.numel(), dtype=torch.bool).index_fill_(0, pick, False)]
    merged = features[targets].float().clone()
    count = torch.ones(targets.numel(), 1)
    if others.numel():
        k = F.normalize(keys.float(), dim=-1)
        owner = (k[others] @ k[targets].T).argmax(dim=-1)
        merged.index_add_(0, owner, features[others].float())
        count.index_add_(0, owner, torch.ones(others.numel(), 1))
    return targets, (merged / count).to(features.dtype)


@register
@dataclass
class VisionZip(VisionPruner):
    """Keep ``keep`` of each image's tokens: ``dominant`` of them by [CLS] attention, the rest as merged contextual
    tokens (each at the place of its target token).

    dominant: share of the kept tokens that are dominant (the paper: 54/64).
    """

    dominant: float = hp(54 / 64, gt=0.0, le=1.0)

    name = "visionzip"
    paper = "Yang et al. 2025, arXiv:2412.04467"
    needs = "vision encoder attention ([CLS] row) and keys at the penultimate layer"
    simplifications = (
        "contextual tokens are merged from the projected features the LLM receives (the paper merges encoder "
        "outputs before the projector) and sit at their target token's position; encoders without [CLS] (Qwen2-VL, "
        "Qwen2.5-VL, Qwen3-VL, Idefics3) rank dominant tokens by the attention they receive; on Qwen2.5-VL attention "
        "and keys are read at the full-attention encoder block nearest the penultimate layer (its windowed blocks "
        "never attend over the whole image)"
    )

    def select_vision(self, view: VisionView) -> VisionChoice:
        layer = view.n_encoder_layers - 2
        scores = view.attention(layer, "cls" if view.has_cls else "received")
        keys = view.keys(layer)
        keep, merged = [], []
        for u, feats in enumerate(view.features):
            count = view.count(u)
            n_dom = max(1, min(count, round(count * self.dominant)))
            dom = top_sorted(scores[u], n_dom)
            rest = torch.ones(feats.shape[0], dtype=torch.bool)
            rest[dom] = False
            targets, mixed = contextual_merge(feats, keys[u], rest.nonzero().flatten(), count - n_dom)
            keep.append(torch.cat([dom, targets]).sort().values)
            merged.append((targets, mixed) if targets.numel() else None)
        return VisionChoice(keep, merged)
