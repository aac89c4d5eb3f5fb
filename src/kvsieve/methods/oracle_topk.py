"""``oracle_topk``: block-sparse prefill choosing blocks by the true attention mass (a reference, not faster).

For each query block and head, the attention probabilities are computed in full (one block of query rows at a time)
and summed per key block; the ``density`` share of the causal key blocks with the most mass is computed (the
diagonal block always), and attention runs on those blocks only (:func:`kvsieve.attention.block_sparse`). It keeps
the most attention mass a selector of whole blocks can keep at that density *spread evenly* over query blocks and
heads: the reference a block selector is compared with. It is not a bound on every method: a selector that spends
its density unevenly across heads and query blocks, or at token granularity (MInference's vertical and slash
lines), can keep more mass, and keeping the most mass is not the same as losing the least perplexity. Measured at
8k tokens on SmolLM2-135M (README, "At equal density"): ``minference`` loses less perplexity at density 0.12 than
this oracle at 0.10 (1.126 against 1.291 x dense), and at 0.22 than the oracle at 0.20 (1.070 against 1.106).
Picking the blocks costs a full attention pass, so it is never faster than dense.
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
    paper = "- (a reference for block selectors)"
    needs = "full attention (to choose blocks)"
    simplifications = (
        "the most attention mass of whole blocks at an even density, a reference rather than a bound (uneven or "
        "token-level selectors can beat it); not a speed-up: choosing blocks costs full attention"
    )

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
