"""``oracle_topk``: block-sparse prefill choosing blocks by the true attention mass (an accuracy bound, not faster).

For each query block and head, the attention probabilities are computed in full (one block of query rows at a time)
and summed per key block; the ``density`` share of the causal key blocks with the most mass is computed (the
diagonal block always), and attention runs on those blocks only (:func:`kvsieve.attention.block_sparse`). It shows
the best accuracy any block selector could reach at that density: a sparse prefill method is as good as its
selection is close to this one. Picking the blocks costs a full attention pass, so it is never faster than dense.
With ``density=1`` every causal block is computed and the output equals dense attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import AttentionCall, block_sparse, causal_allowed
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
        query, keys = call.query, call.keys
        b, hq, q, d = query.shape
        h, t = keys.shape[1], keys.shape[2]
        g, bs = hq // h, self.block_size
        nq, nk = -(-q // bs), -(-t // bs)
        k_t = keys.to(torch.float32).transpose(-1, -2)
        chosen = torch.zeros(b, hq, nq, nk, dtype=torch.bool, device=query.device)
        for i in range(nq):
            rows = slice(i * bs, min(q, (i + 1) * bs))
            r = rows.stop - rows.start
            logits = (query[:, :, rows].to(torch.float32).reshape(b, h, g * r, d) @ k_t).view(b, hq, r, t)
            allowed = causal_allowed(q, t, call.valid, rows=rows, device=query.device)
            allowed = allowed.repeat_interleave(g, dim=1) if allowed.shape[1] > 1 else allowed
            probs = (logits * call.scaling).masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            pad = nk * bs - t
            mass = torch.nn.functional.pad(probs.sum(dim=2), (0, pad)).view(b, hq, nk, bs).sum(-1)
            last = (t - q + rows.stop - 1) // bs  # the last key block any row of this block can see
            n = max(1, math.ceil(self.density * (last + 1)))
            top = mass[..., : last + 1].topk(n, dim=-1).indices
            chosen[:, :, i].scatter_(-1, top, True)
        return chosen
