"""``flowcut``: visual tokens pruned progressively by their information flow across the vision encoder's layers.

Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models" (2025,
arXiv:2505.19536; reference code github.com/TungChintao/FlowCut). The [CLS] token relays the information flow, so a
patch's importance at one encoder layer is ``(relation + semantic) x ||v||_1``: ``relation`` the [CLS] row of the
attention (heads averaged), ``semantic`` the softmax of the [CLS] value's dot product with each value (per head,
averaged), each normalised to sum to one over the patches still in, and ``||v||_1`` the L1 norm of the patch's value
(heads averaged). Scores accumulate over layers (``c <- 0.5 c + 0.5 s``), and redundancy is cut progressively: at
every other layer counted back from the feature layer (``remaining`` layers left, even), ``(N - target) /
sqrt(remaining) x (1 - (H / log N)^2)`` tokens go, ``H`` the entropy of the [CLS] attention over the ``N`` tokens in
(concentrated attention prunes more); at the feature layer the rest down to the target go. Encoders without [CLS]
(Qwen2-VL, Idefics3) use the reference code's Qwen2-VL rule: the relay is each head's mean query, and the score is its
attention times ``||v||_1``. On Qwen2.5-VL only the full-attention blocks attend over the whole image, so the flow
runs over those blocks (up to the last one), the windowed blocks between them being skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..vision import VisionChoice, VisionPruner, VisionView
from . import register
from .base import hp


def prune_count(relation: torch.Tensor, remaining: int, target: int) -> int:
    """FlowCut's adaptive number of tokens to drop at a pruning layer with ``remaining`` layers left: ``relation``
    is the relay's attention over the ``N`` tokens still in."""
    n = relation.numel()
    if remaining == 0:
        return n
    prob = relation.float() / relation.float().sum().clamp(min=1e-12)
    entropy = float(-(prob * torch.log(prob.clamp(min=1e-12))).sum())
    ratio = entropy / math.log(n) if n > 1 else 1.0
    return round((n - target) / math.sqrt(remaining) * (1.0 - ratio**2))


def flow_scores(view: VisionView, layer: int, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, relay attention) of unit ``u``'s image tokens at encoder ``layer`` (FlowCut's per-layer criterion,
    before the normalisation over the tokens still in, which :func:`flow_keep` applies)."""
    s = view.encoder(layer)[u]
    norm = s.values.mean(dim=0).abs().sum(dim=-1)  # (P,) L1 norm of the head-averaged value
    if s.cls is not None:
        cls_value = s.values[:, :1, :]  # (H, 1, d)
        semantic = (cls_value @ s.values.transpose(-1, -2)).softmax(dim=-1)[:, 0, :].mean(dim=0)  # (P,)
        return view.pool(torch.stack([s.cls, semantic, norm], dim=-1), u), view.pool(s.cls, u)
    return view.pool(torch.stack([s.mean_query, norm], dim=-1), u), view.pool(s.mean_query, u)


def flow_keep(parts: list[tuple[torch.Tensor, torch.Tensor]], target: int, decay: float) -> torch.Tensor:
    """FlowCut's progressive selection over the layers ``parts`` (first to the feature layer): each ``(score parts
    (N, 2 or 3), relay attention (N,))``; returns the sorted indices of the ``target`` tokens kept."""
    n = parts[0][0].shape[0]
    alive = torch.arange(n)
    cumulative: torch.Tensor | None = None
    last = len(parts) - 1
    for index, (raw, relay) in enumerate(parts):
        if alive.numel() <= target:
            break
        r = raw[alive].float()
        if r.shape[1] == 3:  # [CLS]: (relation + semantic), each normalised over the tokens in, times ||v||_1
            score = (F.normalize(r[:, 0], p=1, dim=0) + F.normalize(r[:, 1], p=1, dim=0)) * r[:, 2]
        else:  # mean-query relay: attention times ||v||_1
            score = r[:, 0] * r[:, 1]
        cumulative = score if cumulative is None else decay * cumulative + (1 - decay) * score
        remaining = last - index
        if remaining % 2:
            continue
        drop = prune_count(relay[alive], remaining, target)
        count = max(alive.numel() - drop, target)
        order = cumulative.argsort(descending=True, stable=True)[:count].sort().values
        alive, cumulative = alive[order], cumulative[order]
    return alive[:target] if alive.numel() > target else alive


@register
@dataclass
class FlowCut(VisionPruner):
    """Keep ``keep`` of each image's tokens, cut progressively by the information flow through the [CLS] relay over
    the encoder's layers up to the feature layer.

    decay: weight of the earlier layers in the cumulative score (the paper: 0.5).
    """

    decay: float = hp(0.5, ge=0.0, lt=1.0)

    name = "flowcut"
    paper = "Tong et al. 2025, FlowCut, arXiv:2505.19536"
    needs = "vision encoder [CLS] (or mean-query) attention and values at every layer up to the feature layer"
    encoder_extras = frozenset({"values", "mean_query"})
    simplifications = (
        "the encoder runs unpruned and the progressive cuts are replayed on its statistics (the paper drops the cut "
        "tokens inside the encoder, so its later layers attend without them); the feature layer is the penultimate "
        "for [CLS] encoders (LLaVA), the last otherwise; scores are pooled onto the LLM's tokens (2x2 merged for "
        "Qwen2-VL/Qwen2.5-VL/Qwen3-VL/Idefics3) before the cuts; on Qwen2.5-VL the flow runs over the full-attention "
        "blocks only (its windowed blocks never attend over the whole image); no in-LLM stage"
    )

    def _feature_layer(self, n: int, has_cls: bool) -> int:
        return n - 2 if has_cls and n > 1 else n - 1

    def encoder_layers(self, n: int) -> list[int]:
        return list(range(n))

    def select_vision(self, view: VisionView) -> VisionChoice:
        last = self._feature_layer(view.n_encoder_layers, view.has_cls)
        keep = []
        for u in range(view.n_units):
            parts = [flow_scores(view, layer, u) for layer in view.source_layers(range(last + 1))]
            keep.append(flow_keep(parts, view.count(u), self.decay))
        return VisionChoice(keep)
