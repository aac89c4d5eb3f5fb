"""``merging``: merge-on-evict around any scorer: evicted values are folded into their most similar kept token.

kvpress's ``MergingPress`` (inspired by Token Merging, Bolya et al. 2023, arXiv:2210.09461, and D2O, Wan et al. 2024,
arXiv:2406.13035). The wrapped method decides what is kept; each evicted token is then matched to the kept token of
the same head whose key is most cosine-similar, and its value is blended into that token's value:

    w_e = max(cos(k_e, k_t), 0) * |v_e| / (|v_e| + |v_t| + eps)
    v_t <- (v_t + sum_e w_e v_e) / (1 + sum_e w_e)          (only for kept tokens that received a contribution)

Merges below ``similarity_threshold`` are skipped; ``merge_fraction < 1`` merges only that share of the evicted tokens
(the most similar ones). Keys are never changed, so positions stay exact.

Departures from kvpress: the merge runs at every eviction, including the decoding steps of a token budget (kvpress
merges once, at the prefill); padding is never merged into anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import Method, Observation, Wrapper, hp, overrides

EPS = 1e-6


@register
@dataclass
class Merging(Wrapper):
    """Wraps ``inner``: what it evicts is merged (values only) into the most key-similar token it keeps.

    similarity_threshold: smallest key cosine similarity that merges (kvpress: 0.0). merge_fraction: share of the
    evicted tokens merged, the most similar first (kvpress: 1.0).
    """

    similarity_threshold: float = hp(0.0, ge=0.0, le=1.0)
    merge_fraction: float = hp(1.0, gt=0.0, le=1.0)

    name = "merging"
    family = "merging"
    paper = "kvpress MergingPress (after Bolya et al. 2023, arXiv:2210.09461; Wan et al. 2024, arXiv:2406.13035)"
    needs = "the wrapped method's needs + keys and values"
    simplifications = (
        "kvpress's formula exactly; merges at every eviction (also decoding steps under a token budget), kvpress "
        "only at the prefill; padding is never merged"
    )
    own_kind = "evict"

    def validate(self) -> None:
        if self.inner is None:
            raise KVSieveError("merging folds what a scorer evicts: write merging:<method>, e.g. merging:snapkv")

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        if overrides(inner, "merge"):
            raise KVSieveError(f"merging and {inner.spec()} both merge evicted tokens; use one of them")

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return merge_values(obs.keys, obs.values, keep, obs.valid, self.similarity_threshold, self.merge_fraction)


def evicted_slots(keep: torch.Tensor, t: int, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots ``(B, h, m)`` of the real tokens not in ``keep`` ``(B, h, k)``, and a flag ``(B, h, m)`` for the entries
    that are real (rows with fewer evicted tokens are filled up with flagged-off slots)."""
    gone = torch.ones((*keep.shape[:2], t), dtype=torch.bool, device=keep.device).scatter_(2, keep, False)
    if valid is not None:
        gone &= valid
    m = int(gone.sum(dim=-1).max()) if gone.numel() else 0
    slots = gone.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :m]
    return slots, gone.gather(2, slots)


def _rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return x.gather(2, slots[..., None].expand(*slots.shape, x.shape[-1]))


def merge_values(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor | None,
    similarity_threshold: float,
    merge_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kvpress's merge: ``(kept keys, merged kept values)`` ``(B, h, k, D)`` for the kept slots ``keep``; None if
    nothing is evicted."""
    ev, real = evicted_slots(keep, keys.shape[2], valid)
    if ev.shape[-1] == 0:
        return None
    kept_k, kept_v = _rows(keys, keep), _rows(values, keep)
    ev_k, ev_v = _rows(keys, ev).float(), _rows(values, ev).float()
    unit_kept = kept_k.float() / kept_k.float().norm(dim=-1, keepdim=True).clamp(min=EPS)
    unit_ev = ev_k / ev_k.norm(dim=-1, keepdim=True).clamp(min=EPS)
    sim = unit_ev @ unit_kept.transpose(-1, -2)  # (B, h, m, k)
    if valid is not None:  # a padded row's kept set is filled up with padding slots: never merge into those
        sim = sim.masked_fill(~valid.gather(2, keep)[:, :, None, :], float("-inf"))
    best, target = sim.max(dim=-1)  # (B, h, m)
    ok = real & (best >= similarity_threshold)
    if merge_fraction < 1.0 and bool(ok.any()):
        cut = best.masked_fill(~ok, float("-inf")).quantile(1.0 - merge_fraction, dim=-1, keepdim=True)
        ok &= best >= cut
    ev_norm = ev_v.norm(dim=-1)
    target_norm = kept_v.float().norm(dim=-1).gather(2, target)
    weights = best.clamp(min=0) * ok.float() * ev_norm / (ev_norm + target_norm + EPS)
    acc_v = torch.zeros(kept_v.shape, dtype=torch.float32, device=keys.device)
    acc_v.scatter_add_(2, target[..., None].expand_as(ev_v), weights[..., None] * ev_v)
    acc_w = torch.zeros(kept_v.shape[:3], dtype=torch.float32, device=keys.device).scatter_add_(2, target, weights)
    merged = ((kept_v.float() + acc_v) / (1.0 + acc_w)[..., None]).to(values.dtype)
    return kept_k, torch.where((acc_w > 0)[..., None], merged, kept_v)
