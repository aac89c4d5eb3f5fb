"""``oracle_topk``: block-sparse prefill choosing blocks by the true attention mass (an accuracy bound, not faster).

For each query block and head, the attention probabilities are computed in full (one block of query rows at a time)
and summed per key block; the ``density`` share of the causal key blocks with the most mass is computed (the
diagonal block always), and attention runs on those blocks only (:func:`kvsieve.attention.block_sparse`). It shows
the best accuracy any block selector could reach at that density: a sparse prefill method is as good as its
selection is close to this one. Picking the blocks costs a full attention pass, so it is never faster than dense.
With ``density=1`` every causal block is computed and the output equals dense attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sparse
from ..attention import AttentionCall, block_sparse
from . import register
from .base import PrefillMethod, hp


@register
@dataclass
class OracleTopK(PrefillMethod):
    """Top ``density`` share of causal key blocks per query block and head, by exact attention mass.

    block_size: tokens per block (query and key). density: share of each query block's causal key blocks computed.
    """

    block_size: int = hp(64, ge=1)
    density: float = hp(0.5, gt=0.0, le=1.0)

    name = "oracle_topk"
    family = "sparse prefill (oracle)"
    paper = "- (an upper bound for block selectors)"
    needs = "full attention (to choose blocks)"
    simplifications = "an upper bound for block selectors, not a speed-up: choosing blocks costs full attention"

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return block_sparse(call, self.blocks(call), self.block_size)

    def blocks(self, call: AttentionCall) -> torch.Tensor:
        """``(B, Hq, nq, nk)`` bool: the chosen key blocks of each query block and head."""
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        mass = sparse.block_mass(call, bs)
        _, last = sparse.own_blocks(q, t, bs, call.query.device)
        visible = last + 1  # causal key blocks of each query block
        n = torch.clamp(torch.ceil(self.density * visible.to(torch.float32)), min=1).long()  # (nq,)
        causal = sparse.causal_blocks(q, t, bs, call.query.device)
        ranked = mass.masked_fill(~causal, -1.0).argsort(dim=-1, descending=True, stable=True)
        keep = torch.arange(mass.shape[-1], device=mass.device)[None, :] < n[:, None]  # (nq, nk) in rank order
        return torch.zeros_like(causal.expand_as(mass)).scatter(-1, ranked, keep.expand_as(mass)) & causal
