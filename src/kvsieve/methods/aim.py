"""``aim``: similar visual tokens merged before the LLM, then progressive pruning by text-to-image attention in it.

Zhong et al., "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning" (ICCV 2025). Before the
LLM, tokens are merged iteratively by embedding similarity (bipartite matching: each token of one half is matched to
its most similar token of the other half, the most similar pairs are averaged); inside the LLM, the visual tokens
are pruned progressively, layer after layer, by the attention the text tokens give them, down to ``keep``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KVSieveError
from ..sequence import Pruner, Stage, StageView
from ..vision import PRE_LLM, VisionChoice, VisionView
from . import register
from .base import hp


def bipartite_merge(features: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``features`` ``(N, D)`` down to ``target`` tokens by repeated bipartite soft matching (cosine; sizes
    weight the averages). Returns (kept indices, sorted; their merged features)."""
    n = features.shape[0]
    alive = torch.arange(n)
    feats = features.float().clone()
    size = torch.ones(n)
    while alive.numel() > target:
        a, b = alive[0::2], alive[1::2]
        if b.numel() == 0:
            break
        r = min(alive.numel() - target, a.numel())
        sim = F.normalize(feats[a], dim=-1) @ F.normalize(feats[b], dim=-1).T
        best, partner = sim.max(dim=-1)
        merged = best.argsort(descending=True, stable=True)[:r]
        src, dst = a[merged], b[partner[merged]]
        for s, d in zip(src.tolist(), dst.tolist(), strict=True):  # sizes weight the means; several may join one
            feats[d] = (feats[d] * size[d] + feats[s] * size[s]) / (size[d] + size[s])
            size[d] += size[s]
        drop = torch.zeros(n, dtype=torch.bool)
        drop[src] = True
        alive = alive[~drop[alive]]
    return alive, feats[alive].to(features.dtype)


@register
@dataclass
class AIM(Pruner):
    """Merge each image's tokens down to ``merge`` of them before the LLM (VLM prompts), then prune the candidates
    linearly from ``merge`` (after ``layer``) down to ``keep`` (after ``end_layer``; None: the second-to-last layer),
    every ``every`` layers, ranked by the instruction's attention. ``merge=1.0``: no merging."""

    merge: float = hp(0.5, gt=0.0, le=1.0)
    end_layer: int | None = hp(None)
    every: int = hp(2, ge=1)

    name = "aim"
    paper = "Zhong et al. 2025, AIM (ICCV)"
    needs = "projected visual features; instruction attention at each pruning layer"
    simplifications = (
        "bipartite matching on the projected features (a merged token sits at its destination's position); the "
        "importance is the instruction's attention recomputed over this pass's tokens; text prompts: no merging, "
        "the context is pruned progressively"
    )

    def validate(self) -> None:
        if self.keep > self.merge:
            raise KVSieveError(
                f"aim: keep ({self.keep}) is the share left after pruning; it cannot exceed merge "
                f"({self.merge}), the share the merging leaves"
            )

    def stages(self, n_layers: int) -> list[Stage]:
        end = self.end_layer if self.end_layer is not None else n_layers - 2
        end = max(self.layer, min(end, n_layers - 2))
        out = [Stage(PRE_LLM, self.merge)] if self.merge < 1.0 else []
        layers = list(range(self.layer, end + 1, self.every))
        if layers[-1] != end:
            layers.append(end)
        start = min(self.merge, 1.0)
        for i, layer in enumerate(layers):
            frac = (i + 1) / len(layers)
            out.append(Stage(layer, start + (self.keep - start) * frac))
        return out

    def encoder_layers(self, n: int) -> list[int]:
        return []

    def select_vision(self, view: VisionView) -> VisionChoice:
        keep, merged = [], []
        for feats in view.features:
            alive, mixed = bipartite_merge(feats, max(1, int(feats.shape[0] * self.merge)))
            keep.append(alive)
            merged.append((alive, mixed))
        return VisionChoice(keep, merged)

    def rank(self, view: StageView) -> torch.Tensor:
        return view.attention("instruction")
