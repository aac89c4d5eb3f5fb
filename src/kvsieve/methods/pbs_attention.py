"""``pbs_attention``: permuted block-sparse attention (Wang et al. 2025, "Sparser Block-Sparse Attention via Token
Permutation", arXiv:2510.21270).

Important keys are scattered, so block-sparse attention computes many blocks for a few keys each. PBS-Attn permutes
the keys *within segments* of ``segment_size`` tokens so that keys important to the queries cluster into few blocks:

1. **Permutation**: keys of each complete segment are sorted by the attention they receive from the last query block
   (softmax of the last ``block_size`` queries, averaged over those queries and, here, over the query heads sharing a
   KV head); the values move with their keys. Queries are not permuted, so the output needs no un-permutation, and a
   permutation of keys and values together leaves attention unchanged: only which keys share a block changes.
2. **Block selection**: softmax of mean-pooled query blocks against mean-pooled permuted key blocks over the causal
   blocks of *earlier* segments; per query block the fewest blocks reaching ``threshold`` of that mass, plus the
   block holding the first token (the sink).
3. **Attention**: the selected blocks plus the query block's whole own segment (computed as in dense attention,
   causal by each key's original slot), in one block-sparse pass with ``key_order``
   (:func:`kvsieve.attention.block_sparse`).

Simplifications: one permutation per KV head (the paper's reference code permutes per query head after repeating the
KV heads): the sort score is averaged over the query heads of a group, so grouped-query models keep one copy of the
keys; the permuted-FlashAttention kernel is replaced by kvsieve's block-sparse kernel with a key order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sparse
from ..attention import AttentionCall, block_sparse
from ..errors import KVSieveError
from . import register
from .base import PrefillMethod, hp


def segment_permutation(call: AttentionCall, block_size: int, segment_size: int) -> torch.Tensor:
    """Key order ``(B, h, T)``: within each complete segment, slots sorted by the last query block's attention."""
    b, hq = call.query.shape[:2]
    h, t = call.keys.shape[1], call.keys.shape[2]
    order = torch.arange(t, device=call.query.device).expand(b, h, t).clone()
    n_seg = t // segment_size
    if n_seg == 0:
        return order
    probs = sparse.last_queries_probs(call, block_size).mean(2)  # (B, Hq, T)
    score = probs.view(b, h, hq // h, t).mean(2)[..., : n_seg * segment_size].view(b, h, n_seg, segment_size)
    ranked = score.argsort(dim=-1, descending=True, stable=True)
    start = (torch.arange(n_seg, device=order.device) * segment_size)[:, None]
    order[..., : n_seg * segment_size] = (ranked + start).flatten(-2)
    return order


@register
@dataclass
class PBSAttention(PrefillMethod):
    """Keys permuted within segments by the last queries' attention, then block-sparse attention.

    threshold: cumulative pooled mass kept per query block among earlier segments' blocks (1.0 computes every block).
    block_size: tokens per block. segment_size: permutation segment (a multiple of block_size).
    """

    threshold: float = hp(0.9, gt=0.0, le=1.0)
    block_size: int = hp(128, ge=1)
    segment_size: int = hp(512, ge=1)

    name = "pbs_attention"
    paper = "Wang et al. 2025, PBS-Attn (arXiv:2510.21270)"
    needs = "queries and keys (last query block, pooled blocks)"
    simplifications = (
        "one key permutation per KV head (sort score averaged over its query heads); kvsieve's block-sparse kernel "
        "with a key order instead of the permuted-FlashAttention kernel"
    )

    def validate(self) -> None:
        if self.segment_size % self.block_size:
            raise KVSieveError(
                f"pbs_attention: segment_size ({self.segment_size}) must be a multiple of block_size "
                f"({self.block_size}), e.g. pbs_attention(block_size={self.block_size}, "
                f"segment_size={self.block_size * max(1, self.segment_size // self.block_size)})"
            )

    def attend(self, call: AttentionCall) -> torch.Tensor:
        blocks, order = self.plan(call)
        return block_sparse(call, blocks, self.block_size, key_order=order)

    def plan(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """The block mask over the permuted keys ``(B, Hq, nq, nk)`` and the key order ``(B, h, T)``."""
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        b, hq = call.query.shape[:2]
        h = call.keys.shape[1]
        dev = call.query.device
        nq, nk = sparse.n_blocks(q, bs), sparse.n_blocks(t, bs)
        order = segment_permutation(call, bs, self.segment_size)
        per_seg = self.segment_size // bs
        # query block i's segment (by slot) and each key block's segment
        first, last = sparse.own_blocks(q, t, bs, dev)
        q_seg_first = (first * bs // self.segment_size) * per_seg  # first key block of the query's own segment
        kb = torch.arange(nk, device=dev)[None, :]
        own_segment = (kb >= q_seg_first[:, None]) & (kb <= last[:, None])  # (nq, nk), computed whole
        earlier = kb < q_seg_first[:, None]
        if self.threshold >= 1.0:
            chosen = (earlier | own_segment).expand(b, hq, nq, nk).clone()
        else:
            permuted = call.keys.gather(2, order[..., None].expand_as(call.keys))
            pooled_call = AttentionCall(call.module, call.query, permuted, permuted, None, call.positions, call.scaling)
            scores = sparse.pooled_block_probs(pooled_call, bs).masked_fill(~earlier, 0.0)
            chosen = sparse.cumulative_select(scores, self.threshold, earlier) | own_segment
        sink = (order == 0).view(b, h, -1)  # the block holding slot 0 (first token), in permuted order
        sink_block = sparse.pool_blocks(sink.float(), bs, dim=2, reduce="sum") > 0  # (B, h, nk)
        chosen |= sink_block.repeat_interleave(hq // h, dim=1)[:, :, None, :] & earlier
        return chosen, order
