"""``think``: query-driven key channel pruning, with the memory really freed.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (2024), as kvpress's ``ThinKPress`` (reviewed by the
paper's first author). Per KV head, channel ``i`` of the keys is scored by ``mean_w(q_i^2) x mean_T(k_i^2)`` (the
squared norms of the window's queries, averaged over the query heads of the group, times the keys'): the product of
the norms ranks channels as the paper's ``|Q_i| |K_i|`` does. The ``ratio`` share of channels with the lowest scores
is pruned. kvpress zeroes them and keeps the tensor's shape; here they are dropped from storage
(:class:`~kvsieve.storage.channels.ChannelPrunedSegment`: the kept channels and their index), so the key bytes of
pruned tokens fall by ``ratio`` (values are not pruned). Attention reads the keys with zeros in the pruned channels.

As a wrapper, ``think:snapkv`` prunes the channels of what SnapKV keeps (kvpress's ``ComposedPress([SnapKVPress(r),
ThinKPress(c)])``): the channel scores use the keys held after eviction; ``think`` alone keeps every token.

When: at each prefill pass (the window is that pass's last ``window`` queries); the channel set of a head is chosen at
the layer's first prefill pass and reused for later chunks; tokens added by decoding steps stay in full width (as in
kvpress, which prunes at the prefill only) until the next prefill pass.

Simplifications: one channel set per head for the whole sequence (chosen on the first prefill pass); decoded tokens
are not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from ..storage import Segment
from ..storage.channels import ChannelPrunedSegment
from . import register
from .base import LayerContext, Method, Observation, Wrapper, hp, overrides

QUERY_NORMS = "think_query_norms"


@register
@dataclass
class ThinK(Wrapper):
    """Key channels scored by query x key squared norms; the lowest ``ratio`` share dropped from storage.

    ratio: share of key channels pruned (kvpress's key_channel_compression_ratio). window: recent queries that score
    the channels (kvpress: 32).
    """

    ratio: float = hp(0.5, ge=0.0, lt=1.0)
    window: int = hp(32, ge=1)

    name = "think"
    family = "channel pruning"
    paper = "Xu et al. 2024, arXiv:2407.21018"
    needs = "queries (window) and keys"
    simplifications = (
        "kvpress's channel score; pruned channels dropped from storage (kvpress zeroes them); one channel set per head "
        "chosen at the first prefill pass; decoded tokens kept in full width"
    )

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        if overrides(inner, "pack"):
            raise KVSieveError(f"think and {inner.spec()} both choose the storage form; use one of them")

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.n_new > 1 and self.ratio > 0:
            b, hq, n, d = obs.queries.shape
            h = obs.keys.shape[1]
            w = min(self.window, n)
            q2 = obs.queries[:, :, -w:].to(torch.float32).pow(2)  # (B, h*g, w, D)
            if obs.valid is None:
                q = q2.mean(dim=2)
            else:  # left padding among the window's queries does not vote (a row gets what it gets alone)
                real = obs.valid[:, :, -w:].repeat_interleave(hq // h, dim=1)[..., None].to(q2.dtype)
                q = (q2 * real).sum(dim=2) / real.sum(dim=2).clamp(min=1.0)
            per_head = q.view(b, h, hq // h, d).mean(dim=2)
            # per KV head: a head-wise policy may split the layer into per-head segments before pack runs
            store = obs.layer_state.setdefault(QUERY_NORMS, {})
            store.update({obs.head_start + j: per_head[:, j] for j in range(h)})

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        segment = super().pack(segment, ctx)
        if self.ratio == 0 or ctx.n_new <= 1:
            return segment
        if isinstance(segment, ChannelPrunedSegment):
            segment.prune()  # this chunk's tokens, on the head's channels
            return segment
        store = ctx.layer_state.get(QUERY_NORMS, {})
        heads = range(segment.head_start, segment.head_start + segment.n_heads)
        if not all(j in store for j in heads):
            return segment
        q = torch.stack([store.pop(j) for j in heads], dim=1)
        return ChannelPrunedSegment(segment, kept_channels(q, segment.keys, segment.valid, self.ratio))


def kept_channels(query_norms: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, ratio: float):
    """Channels ``(B, h, D - int(D x ratio))`` kept per head: the highest ``mean(q^2) x mean(k^2)``.

    query_norms ``(B, h, D)``; keys ``(B, h, T, D)``; padding (``valid`` False) is left out of the key mean.
    """
    k2 = keys.to(torch.float32).pow(2)
    if valid is None:
        key_norms = k2.mean(dim=2)
    else:
        w = valid[..., None].to(k2.dtype)
        key_norms = (k2 * w).sum(dim=2) / w.sum(dim=2).clamp(min=1.0)
    d = keys.shape[-1]
    n_kept = d - int(d * ratio)
    return (query_norms * key_norms).topk(n_kept, dim=-1).indices.sort(dim=-1).values
