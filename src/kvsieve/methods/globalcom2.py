"""``globalcom2``: AnyRes crops compressed under the thumbnail's guidance (LLaVA-NeXT).

Liu et al., "Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration" (GlobalCom²,
2025; reference code github.com/xuyang-liu16/GlobalCom2). A high-resolution image reaches LLaVA-NeXT as a thumbnail
plus crops; the thumbnail is the "commander":

- the thumbnail keeps its ``keep`` share of tokens with the highest [CLS] attention;
- each crop's retention ratio comes from how much of the thumbnail's [CLS] attention falls on the crop's region:
  ``keep x (1 + p_i - mean(p))`` with ``p = softmax(region sums / 10)``, at most 1;
- within a crop (after the model's unpadding), tokens are ranked by the crop's own [CLS] attention plus the
  thumbnail's attention bilinearly resized onto the crops' token grid (each L2-normalised), and the top
  ``ratio x tokens`` go on. Row-end newline tokens always go on.

[CLS] attention is the head-averaged [CLS] row of the attention logits at the encoder's last layer, as the reference
code reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vision import ImageLayout, VisionChoice, VisionPruner, VisionView, top_sorted
from . import register
from .base import hp


def crop_scales(thumbnail: torch.Tensor, crop_grid: tuple[int, int], keep: float, temperature: float) -> torch.Tensor:
    """Retention ratio of each crop (row-major over ``crop_grid``) from the thumbnail's scores ``(side x side,)``."""
    rows, cols = crop_grid
    side = round(thumbnail.numel() ** 0.5)
    step_r, step_c = max(side // rows, 1), max(side // cols, 1)
    i = torch.arange(side * side) // side
    j = torch.arange(side * side) % side
    region = (i // step_r).clamp(max=rows - 1) * cols + (j // step_c).clamp(max=cols - 1)
    sums = torch.zeros(rows * cols, dtype=torch.float64).index_add_(0, region, thumbnail.double()[: side * side])
    p = ((sums - sums.max()) / temperature).softmax(dim=0)
    return (keep * (1 + p - p.mean())).clamp(max=1.0)


def crop_keep(
    layout: ImageLayout, scores: list[torch.Tensor], n: int, keep: float, temperature: float
) -> dict[int, torch.Tensor]:
    """Kept token indices of the thumbnail and of every crop of one AnyRes image (``scores[u]``: unit ``u``'s [CLS]
    scores over its ``n`` tokens)."""
    thumb = scores[layout.base]
    out = {layout.base: top_sorted(thumb, max(1, int(thumb.numel() * keep)))}
    scales = crop_scales(thumb, layout.crop_grid, keep, temperature)
    side = round(thumb.numel() ** 0.5)
    height, width = layout.grid.shape
    guide = F.interpolate(thumb.float().view(1, 1, side, side), size=(height, width), mode="bilinear",
                          align_corners=False)[0, 0]  # fmt: skip
    for k, unit in enumerate(layout.crops):
        where = layout.grid // n == unit
        index = layout.grid[where] % n  # the crop's unpadded tokens, row-major
        if index.numel() == 0:
            out[unit] = index
            continue
        combined = F.normalize(scores[unit][index].float(), dim=0) + F.normalize(guide[where], dim=0)
        count = int(index.numel() * float(scales[min(k, scales.numel() - 1)]))
        out[unit] = index[top_sorted(combined, count)].sort().values
    return out


@register
@dataclass
class GlobalCom2(VisionPruner):
    """Keep ``keep`` of each AnyRes image's tokens on average: the thumbnail at ``keep``, each crop at a ratio the
    thumbnail's [CLS] attention sets, within a crop by its own and the thumbnail's attention.

    temperature: of the softmax over the crops' thumbnail-attention sums (the reference code: 10).
    """

    temperature: float = hp(10.0, gt=0.0)

    name = "globalcom2"
    paper = "Liu et al. 2025, GlobalCom2 (Compression with Global Guidance)"
    needs = "vision encoder [CLS] attention logits at the last layer (thumbnail and crops)"
    encoder_extras = frozenset({"cls_logits"})
    simplifications = (
        "for models without AnyRes crops (LLaVA-1.5, Qwen2-VL, Idefics3) and single-crop LLaVA-NeXT images each image "
        "is compressed as a thumbnail alone (top [CLS] logits, or attention received where there is no [CLS]); the "
        "reference leaves single-crop images uncompressed; on Qwen2.5-VL the attention is read at the "
        "full-attention encoder block nearest the last layer"
    )

    def encoder_layers(self, n: int) -> list[int]:
        return [n - 1]

    def select_vision(self, view: VisionView) -> VisionChoice:
        last = view.n_encoder_layers - 1
        if view.has_cls:
            scores = [view.pool(s.cls_logits, u) for u, s in enumerate(view.encoder(last))]
        else:
            scores = view.attention(last, "received")
        keep: dict[int, torch.Tensor] = {}
        for layout in view.layouts or []:
            if layout.crops:
                n = view.features[layout.base].shape[0]
                keep.update(crop_keep(layout, scores, n, view.keep, self.temperature))
        for u in range(view.n_units):
            if u not in keep:  # a thumbnail alone
                keep[u] = top_sorted(scores[u], view.count(u))
        return VisionChoice([keep[u] for u in range(view.n_units)])
