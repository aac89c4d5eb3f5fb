"""``xattention``: block importance from strided antidiagonal sums (Xu et al., ICML 2025, arXiv:2503.16428).

Within each ``block_size`` x ``block_size`` block of the attention matrix, XAttention sums the entries on every
``stride``-th antidiagonal: every row and every column of the block meets one such entry per ``stride`` tile, so
vertical and slash patterns are both seen at ``1/stride`` of the cost. The sums come from one product of reshaped
matrices: queries ``Q[(stride-1-k)::stride]`` and keys ``K[k::stride]`` concatenated over ``k`` along the feature
axis, scaled by ``1 / (sqrt(d) * stride)``, softmax over the (strided, causal) keys, summed per block. Per query
block the fewest key blocks whose antidiagonal mass reaches ``threshold`` of the row are kept (the diagonal block
and the first (sink) block always), and attention runs on them (:func:`kvsieve.attention.block_sparse`).

Simplifications: none in the selection (the paper's threshold search per head, "dynamic programming" for thresholds,
is an optional add-on and not implemented: one threshold for every head, as in its main results).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import sparse
from ..attention import AttentionCall, block_sparse
from ..errors import KVSieveError
from . import register
from .base import PrefillMethod, hp


def antidiagonal_scores(call: AttentionCall, block_size: int, stride: int) -> torch.Tensor:
    """Block scores ``(B, Hq, nq, nk)``: strided antidiagonal attention mass of each (query block, key block)."""
    query, keys = call.query.to(torch.float32), call.keys.to(torch.float32)
    b, hq, q, _ = query.shape
    h, t = keys.shape[1], keys.shape[2]
    offset = t - q
    # align both axes to the strided grid: pad the front of the queries so query slots line up with key slots
    lead = offset % stride
    q_pad = F.pad(query, (0, 0, lead, (-(q + lead)) % stride))
    k_pad = F.pad(keys, (0, 0, 0, (-t) % stride))
    qr = torch.cat([q_pad[:, :, stride - 1 - k :: stride] for k in range(stride)], dim=-1)  # (B, Hq, q', S*D)
    kr = torch.cat([k_pad[:, :, k::stride] for k in range(stride)], dim=-1).repeat_interleave(hq // h, dim=1)
    logits = (qr @ kr.transpose(-1, -2)) * (call.scaling / stride)
    rows = torch.arange(qr.shape[2], device=query.device) + (offset - lead) // stride  # strided query slot
    cols = torch.arange(kr.shape[2], device=query.device)
    logits = logits.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    probs = logits.softmax(-1)
    # back to blocks: strided rows/cols of each block (block_size a multiple of stride). After a chunk whose length
    # is not a multiple of stride, strided rows straddle query blocks by fewer than stride rows (scoring only).
    per = block_size // stride
    nq, nk = sparse.n_blocks(q, block_size), sparse.n_blocks(t, block_size)
    probs = F.pad(probs, (0, nk * per - probs.shape[-1], 0, max(0, nq * per - probs.shape[2])))
    probs = probs[:, :, : nq * per]
    return probs.reshape(b, hq, nq, per, nk, per).sum((3, 5))


@register
@dataclass
class XAttention(PrefillMethod):
    """Key blocks per query block by strided antidiagonal mass, kept until ``threshold`` of it.

    threshold: cumulative antidiagonal mass kept per query block (1.0 computes every block). stride: antidiagonal
    stride (``block_size`` must be a multiple). block_size: tokens per query/key block.
    """

    threshold: float = hp(0.9, gt=0.0, le=1.0)
    stride: int = hp(8, ge=1)
    block_size: int = hp(128, ge=1)

    name = "xattention"
    paper = "Xu et al. 2025, XAttention (arXiv:2503.16428)"
    needs = "queries and keys (strided)"
    simplifications = "none in the selection; one threshold for every head (no per-head threshold search)"

    def validate(self) -> None:
        if self.block_size % self.stride:
            raise KVSieveError(
                f"xattention: block_size ({self.block_size}) must be a multiple of stride ({self.stride}); "
                f"e.g. xattention(block_size={self.stride * max(1, self.block_size // self.stride)}, "
                f"stride={self.stride})"
            )

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return block_sparse(call, self.blocks(call), self.block_size)

    def blocks(self, call: AttentionCall) -> torch.Tensor:
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        causal = sparse.causal_blocks(q, t, bs, call.query.device)
        if self.threshold >= 1.0:
            return causal.expand(*call.query.shape[:2], *causal.shape)
        chosen = sparse.cumulative_select(antidiagonal_scores(call, bs, self.stride), self.threshold, causal)
        chosen[..., 0] = True  # the sink block
        return chosen
