"""``kvcrush``: representatives of evicted tokens, grouped by binary head-behaviour signatures, as an add-on.

Jha et al., "KVCrush: Key Value Cache size-reduction using similarity in head-behaviour" (2025). Each token gets a
binary signature with one bit per head: whether that head would keep it. Tokens with similar signatures behave alike
across heads, so one of them can stand for the rest. The inner method keeps its top ``1 - share`` of the budget; the
remaining ``share`` goes to representatives of the tokens it evicted: those are ordered by the Hamming distance of
their signature to an anchor signature (then by the signature itself, so identical signatures sit together), cut
into as many equal groups as there are slots, and the highest-scoring token of each group is kept.

Signatures here are the inner method's keep decisions per KV head of a storage segment: bit ``j`` of token ``t`` is
1 if ``t`` is in KV head ``j``'s top ``(1 - share) x budget`` under the inner scores. Anchors: ``"alternate"``
(0101...), ``"mean"`` (the majority bit of each head) or ``"random"`` (seeded).

Simplifications: bits are per KV head, not per query head; a segment with one KV head (MQA, or heads split by a
head-wise policy) has 1-bit signatures, and the groups then cover the evicted tokens in slot order (stream order
after a prefill; the policy sees scores, not positions); the representative is the token the inner method scores
highest in its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import LayerContext, Wrapper, hp, top_slots


@register
@dataclass
class KVCrush(Wrapper):
    """Wraps ``inner`` (default SnapKV): ``share`` of the budget goes to one representative per signature group.

    share: fraction of each head's budget for representatives (our default; the paper varies it). anchor:
    "alternate", "mean" or "random". seed: for the random anchor.
    """

    share: float = hp(0.2, ge=0.0, lt=1.0)
    anchor: str = hp("alternate", choices=("alternate", "mean", "random"))
    seed: int = 0

    name = "kvcrush"
    family = "eviction add-on"
    paper = "Jha et al. 2025, arXiv:2503.00022"
    needs = "the wrapped method's scores"
    simplifications = (
        "signature bits are per KV head (the inner method's per-head keep decisions), not per query head; with one "
        "KV head per segment the groups cover evicted tokens in slot order; the representative is the inner "
        "method's best-scored token of its group"
    )
    own_kind = "evict"
    default_inner = "snapkv"

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        return [self._select_segment(s, budget) for s in scores]

    def _select_segment(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        b, h, t = scores.shape
        k = min(budget, t)
        n_crush = int(self.share * k)
        main = top_slots(scores, k - n_crush)
        kept = torch.zeros(b, h, t, dtype=torch.bool, device=scores.device)
        kept.scatter_(2, main, True)
        if n_crush == 0:
            return main
        signatures = kept.permute(0, 2, 1)  # (B, T, h)
        out = []
        for bi in range(b):
            anchor = self.anchor_signature(signatures[bi])
            rows = []
            for hi in range(h):
                candidates = ~kept[bi, hi] & torch.isfinite(scores[bi, hi])
                groups = group_tokens(signatures[bi], candidates, n_crush, anchor)
                reps = representatives(groups, scores[bi, hi], n_crush)
                if reps.numel() < n_crush:  # fewer candidates than slots: the inner method's next best tokens
                    extra = scores[bi, hi].masked_fill(kept[bi, hi], float("-inf"))
                    extra[reps] = float("-inf")
                    reps = torch.cat([reps, top_slots(extra, n_crush - reps.numel())])
                rows.append(torch.cat([main[bi, hi], reps]))
            out.append(torch.stack(rows))
        return torch.stack(out)

    def anchor_signature(self, signatures: torch.Tensor) -> torch.Tensor:
        """The anchor ``(h,)`` bool for signatures ``(T, h)``."""
        h = signatures.shape[-1]
        if self.anchor == "alternate":
            return torch.arange(h, device=signatures.device) % 2 == 1
        if self.anchor == "mean":
            return signatures.float().mean(dim=0) >= 0.5
        gen = torch.Generator().manual_seed(self.seed)
        return (torch.rand(h, generator=gen) < 0.5).to(signatures.device)


def group_tokens(
    signatures: torch.Tensor, candidates: torch.Tensor, n_groups: int, anchor: torch.Tensor
) -> torch.Tensor:
    """Group index per token ``(T,)`` (-1 for non-candidates): candidates ordered by (Hamming distance of their
    signature ``(T, h)`` to ``anchor``, signature, position) and cut into ``n_groups`` equal consecutive groups."""
    t, h = signatures.shape
    distance = (signatures != anchor).sum(dim=-1)
    code = (signatures.long() << torch.arange(h, device=signatures.device)).sum(dim=-1)
    key = (distance * (1 << h) + code) * (t + 1) + torch.arange(t, device=signatures.device)
    key = key.masked_fill(~candidates, torch.iinfo(torch.int64).max)
    order = key.argsort()
    n = int(candidates.sum())
    groups = torch.full((t,), -1, dtype=torch.long, device=signatures.device)
    if n:
        rank = torch.arange(n, device=signatures.device)
        groups[order[:n]] = rank * min(n_groups, n) // n
    return groups


def representatives(groups: torch.Tensor, scores: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Index of the highest-scoring token of each non-empty group (ties: the earliest), in group order."""
    member = (groups >= 0).nonzero().flatten()
    if member.numel() == 0:
        return member
    g, s = groups[member], scores[member].to(torch.float32)
    best = torch.full((n_groups,), float("-inf"), device=scores.device).scatter_reduce(0, g, s, "amax")
    winners = member[s == best[g]]
    first = torch.full((n_groups,), scores.shape[0], device=scores.device, dtype=torch.long)
    first = first.scatter_reduce(0, groups[winners], winners, "amin")
    return first[first < scores.shape[0]]
