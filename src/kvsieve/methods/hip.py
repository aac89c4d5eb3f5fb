"""``hip``: hierarchically pruned attention (Lee et al., ICLR 2025, "HiP Attention: Sparse Sub-Quadratic Attention
with Hierarchical Attention Pruning", arXiv:2406.09827).

For each query block, HiP finds its top ``top_k`` key blocks by a tree search instead of scoring every key: the
visible keys (before the query block's own diagonal) start as ``top_k`` equal branches; at every level each branch
splits in two, each half is scored by the attention logit of its *representative* key (its first token) with the
block's queries (the maximum over the block's rows), and the ``top_k`` best halves survive. After ``log2(T / top_k)``
levels the branches are single key blocks. Scoring ``2 * top_k`` keys per level gives ``O(T log T)`` work for the
whole prefill instead of ``O(T^2)``. Attention then runs on the selected blocks, the first ``sink`` blocks and the
diagonal (:func:`kvsieve.attention.block_sparse`), as HiP keeps sink and sliding-window tokens dense.

Simplifications: the leaves are key blocks of ``block_size`` tokens (the block-sparse kernel's unit; HiP's leaves
are chunks of a few tokens and its kernel reads them individually); the mask is recomputed for every layer (HiP can
reuse masks across decoding steps, not relevant to a prefill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sparse
from ..attention import AttentionCall, block_sparse
from . import register
from .base import PrefillMethod, hp


def hierarchical_top_k(query: torch.Tensor, keys: torch.Tensor, scaling: float, visible: torch.Tensor, k: int,
                       block_size: int) -> torch.Tensor:  # fmt: skip
    """Key blocks ``(B, H, nq, k)`` (-1 where fewer exist) found by HiP's tree search.

    query ``(B, H, q, D)`` (block ``i`` = rows ``[i*bs, (i+1)*bs)``); keys ``(B, H, T, D)``; ``visible`` ``(nq,)``:
    how many leading key blocks each query block may choose from.
    """
    b, h, q, d = query.shape
    nq = visible.numel()
    dev = query.device
    # branches as [start, end) in key blocks: top_k equal slices of each query block's visible range
    n = visible.to(torch.float32)[:, None]
    edges = torch.floor(torch.arange(k + 1, device=dev)[None, :] * n / k).long()  # (nq, k+1)
    start, end = edges[:, :-1].expand(b, h, nq, k), edges[:, 1:].expand(b, h, nq, k)
    rows = torch.nn.functional.pad(query, (0, 0, 0, nq * block_size - q)).view(b, h, nq, block_size, d)
    real_rows = (torch.arange(nq * block_size, device=dev) < q).view(nq, block_size)
    while bool(((end - start) > 1).any()):
        mid = (start + end + 1) // 2
        kids_start = torch.cat([start, mid], -1)
        kids_end = torch.cat([mid, end], -1)
        empty = kids_end <= kids_start
        rep = (kids_start * block_size).clamp(max=keys.shape[2] - 1)  # representative: the child's first key
        rep_keys = keys.gather(2, rep.flatten(2)[..., None].expand(-1, -1, -1, d)).view(b, h, nq, 2 * k, d)
        logits = (rows @ rep_keys.transpose(-1, -2)) * scaling  # (B, H, nq, bs, 2k)
        score = logits.masked_fill(~real_rows[None, None, :, :, None], float("-inf")).amax(3)
        score = score.masked_fill(empty, float("-inf"))
        best = score.topk(k, dim=-1).indices
        start, end = kids_start.gather(-1, best), kids_end.gather(-1, best)
    return torch.where(end > start, start, -1)


@register
@dataclass
class HiP(PrefillMethod):
    """Top ``top_k`` key blocks per query block by hierarchical (tree) search, plus sinks and the diagonal.

    top_k: key blocks chosen per query block (at least the visible ones computes everything). block_size: tokens per
    block. sink: initial key blocks always computed.
    """

    top_k: int = hp(8, ge=1)
    block_size: int = hp(64, ge=1)
    sink: int = hp(1, ge=0)

    name = "hip"
    paper = "Lee et al. 2025, HiP Attention (arXiv:2406.09827)"
    needs = "queries and keys (2 x top_k representatives per level)"
    simplifications = "leaves are key blocks of block_size tokens (HiP's are chunks of a few tokens)"

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return block_sparse(call, self.blocks(call), self.block_size)

    def blocks(self, call: AttentionCall) -> torch.Tensor:
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        b, hq = call.query.shape[:2]
        h = call.keys.shape[1]
        dev = call.query.device
        nq, nk = sparse.n_blocks(q, bs), sparse.n_blocks(t, bs)
        first, _ = sparse.own_blocks(q, t, bs, dev)
        keys = call.keys.to(torch.float32).repeat_interleave(hq // h, dim=1)
        found = hierarchical_top_k(call.query.to(torch.float32), keys, call.scaling, first, self.top_k, bs)
        chosen = torch.zeros(b, hq, nq, nk + 1, dtype=torch.bool, device=dev)
        chosen.scatter_(-1, torch.where(found >= 0, found, nk), True)
        chosen = chosen[..., :nk]
        chosen[..., : self.sink] = True
        return chosen
