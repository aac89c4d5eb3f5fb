"""``anchor_attention``: difference-aware sparse attention at stripe granularity (Zhang et al. 2025,
"AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity", arXiv:2505.23520).

1. **Pattern-based anchor**: the largest attention logits of a row are almost always on the initial tokens or the
   local window, so the anchor of a query block is computed there: per query, the maximum logit over the first key
   block (the sinks) and its own diagonal block(s), averaged over the query block.
2. **Difference-aware stripe identification**: the mean query of the block is compared with every other visible key;
   a key whose logit is within ``theta`` of the anchor (``anchor - logit <= theta``, i.e. its attention weight is at
   least ``exp(-theta)`` of the near-maximum) is kept for the whole query block: a *stripe* (one key column over the
   block's rows), so sparsity is at token, not block, granularity along the keys.
3. **Fine-grained computation**: the kept keys are gathered (discrete KV positions, not contiguous blocks) and attended
   with the initial and local blocks (:func:`kvsieve.sparse.token_sparse`).

Simplifications: step 3 uses kvsieve's eager gather kernel (gathered keys and one sdpa per query block) instead of
the paper's fused kernel, so on CPU its time follows the gathered keys, not the selected stripes alone; the anchor
comes from one initial and one local block (the paper's default pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sparse
from ..attention import AttentionCall
from . import register
from .base import PrefillMethod, hp


@register
@dataclass
class AnchorAttention(PrefillMethod):
    """Stripes (key columns per query block) whose logit is within ``theta`` of the anchor from sinks and local keys.

    theta: logit gap to the anchor within which a key is kept (larger keeps more). block_size: query rows per stripe
    and the size of the initial/local blocks.
    """

    theta: float = hp(12.0, ge=0.0)
    block_size: int = hp(128, ge=1)

    name = "anchor_attention"
    paper = "Zhang et al. 2025, AnchorAttention (arXiv:2505.23520)"
    needs = "queries and keys"
    simplifications = "eager gather kernel instead of the paper's fused stripe kernel; anchor from one sink block"

    def attend(self, call: AttentionCall) -> torch.Tensor:
        slots, listed = self.stripes(call)
        return sparse.token_sparse(call, slots, listed, self.block_size)

    def stripes(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept key slots per query block ``(B, Hq, nq, K)`` and which of them are real ``(B, Hq, nq, K)``."""
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        b, hq = call.query.shape[:2]
        h = call.keys.shape[1]
        dev = call.query.device
        keys = call.keys.to(torch.float32).repeat_interleave(hq // h, dim=1)  # (B, Hq, T, D)
        query = call.query.to(torch.float32)
        nq = sparse.n_blocks(q, bs)
        first, last = sparse.own_blocks(q, t, bs, dev)
        slot = torch.arange(t, device=dev)
        q_slot = torch.arange(q, device=dev) + (t - q)
        # 1. anchor: per query, max logit over the sink block and its own diagonal block(s); mean over the block
        anchors = torch.empty(b, hq, nq, device=dev)
        for i in range(nq):
            rows = slice(i * bs, min(q, (i + 1) * bs))
            lo, hi = int(first[i]) * bs, min(t, (int(last[i]) + 1) * bs)
            cols = torch.cat([slot[: min(bs, lo)], slot[lo:hi]])
            logits = (query[:, :, rows] @ keys[:, :, cols].transpose(-1, -2)) * call.scaling
            visible = cols[None, :] <= q_slot[rows][:, None]
            anchors[:, :, i] = logits.masked_fill(~visible, float("-inf")).amax(-1).mean(-1)
        # 2. stripes: the block's mean query against every key, kept within theta of the anchor
        pooled = sparse.pool_blocks(query, bs)  # (B, Hq, nq, D)
        scores = (pooled @ keys.transpose(-1, -2)) * call.scaling  # (B, Hq, nq, T)
        keep = scores >= anchors[..., None] - self.theta
        keep &= slot[None, :] < (first * bs)[:, None]  # strictly before the diagonal (which is always computed)
        keep[..., : min(bs, t)] |= slot[: min(bs, t)][None, :] < (first * bs)[:, None]  # the sink block, whole
        count = keep.sum(-1)
        k_max = max(1, int(count.max()))
        slots = keep.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :k_max]
        listed = torch.arange(k_max, device=dev) < count[..., None]
        return slots, listed
