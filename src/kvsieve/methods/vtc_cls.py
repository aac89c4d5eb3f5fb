"""``vtc_cls``: the vision encoder's [CLS] attention, ensembled over several layers, ranks the visual tokens.

Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (VTC-CLS, 2024). The [CLS] token
of the vision encoder knows which patches matter: its attention on each visual token is the importance, averaged over
several encoder layers (each layer's scores normalised to sum to one), and the top tokens go on in their order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..vision import VisionChoice, VisionPruner, VisionView, top_sorted
from . import register
from .base import hp


@register
@dataclass
class VTCCLS(VisionPruner):
    """Keep ``keep`` of each image's tokens by [CLS] attention averaged over the last ``layers`` encoder layers
    before the output (the penultimate one, which the LLM gets, and the ones before it)."""

    layers: int = hp(4, ge=1)

    name = "vtc_cls"
    paper = "Wang et al. 2024, VTC-CLS"
    needs = "vision encoder [CLS] attention at several layers"
    simplifications = "the ensemble is the mean of per-layer normalised [CLS] attention; needs a [CLS] token (CLIP)"

    def encoder_layers(self, n: int) -> list[int]:
        return [max(0, n - 2 - i) for i in range(min(self.layers, n - 1))]

    def select_vision(self, view: VisionView) -> VisionChoice:
        layers = self.encoder_layers(view.n_encoder_layers)
        per_layer = [view.attention(layer, "cls") for layer in layers]
        keep = []
        for u in range(view.n_units):
            score = torch.stack([s[u] / s[u].sum().clamp(min=1e-12) for s in per_layer]).mean(dim=0)
            keep.append(top_sorted(score, view.count(u)))
        return VisionChoice(keep)
