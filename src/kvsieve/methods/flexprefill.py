"""``flexprefill``: context-aware sparse prefill, per head and per input (Lai et al., ICLR 2025, arXiv:2502.20766).

Per head, from the last query block :math:`\\hat Q` of the pass:

1. **Pattern choice** (query-aware sparse pattern determination): the true block distribution
   :math:`\\bar a` (the last block's softmax attention summed per key block) is compared with the pooled estimate
   ``softmax(pool(Q_last) pool(K)^T / sqrt(d))``; if the square root of their Jensen-Shannon divergence is below
   ``tau`` the pooled estimate is trusted and the head is **query-aware**, else it uses the **vertical-slash**
   pattern.
2. **Cumulative-attention index selection**: query-aware heads take, per query block, the fewest key blocks of the
   pooled block attention whose mass reaches ``gamma``; vertical-slash heads take the fewest vertical lines (key
   columns) and the fewest slash lines (diagonals) of the last block's attention whose normalised mass reaches
   ``gamma`` each.
3. Block-sparse attention over the selected blocks (the diagonal always; :func:`kvsieve.attention.block_sparse`).

Simplifications: vertical and slash lines are computed as the key blocks they cross (the paper's kernel also works on
blocks of ``block_size``); the paper's ``min_budget``/``max_budget`` clamps are not implemented (the budget is set by
``gamma`` alone); query heads sharing a KV head choose independently, as in the paper. Statistics:
``prefill_query_aware`` (share of heads choosing query-aware) and the densities of :mod:`kvsieve.sparse`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sparse
from ..attention import AttentionCall, block_sparse
from . import register
from .base import PrefillMethod, hp


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Square root of the Jensen-Shannon divergence (natural log) between distributions on the last dim."""
    m = 0.5 * (p + q)

    def kl(a):
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - m.clamp(min=1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0.0).sqrt()


@register
@dataclass
class FlexPrefill(PrefillMethod):
    """Per head: query-aware or vertical-slash by Jensen-Shannon distance, blocks until ``gamma`` of the attention.

    gamma: cumulative attention each head's selection must reach (1.0 computes every block). tau: Jensen-Shannon
    distance below which a head is query-aware. block_size: tokens per query/key block (and the last queries used).
    """

    gamma: float = hp(0.9, gt=0.0, le=1.0)
    tau: float = hp(0.1, ge=0.0, le=1.0)
    block_size: int = hp(128, ge=1)

    name = "flexprefill"
    paper = "Lai et al. 2025, FlexPrefill (arXiv:2502.20766)"
    needs = "queries and keys (last query block)"
    simplifications = (
        "vertical/slash lines computed as the key blocks they cross; no min/max budget clamps (gamma alone sets it)"
    )

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return block_sparse(call, self.blocks(call), self.block_size)

    def blocks(self, call: AttentionCall) -> torch.Tensor:
        """``(B, Hq, nq, nk)`` bool: each head's selected key blocks per query block."""
        bs, q, t = self.block_size, call.n_new, call.keys.shape[2]
        causal = sparse.causal_blocks(q, t, bs, call.query.device)
        if self.gamma >= 1.0:
            return causal.expand(*call.query.shape[:2], *causal.shape)
        probs = sparse.last_queries_probs(call, bs)  # (B, Hq, n, T)
        true = sparse.pool_blocks(probs.sum(2), bs, dim=2, reduce="sum")
        true = true / true.sum(-1, keepdim=True)
        pooled = sparse.pooled_block_probs(call, bs)  # (B, Hq, nq, nk)
        estimate = self._last_block_estimate(call, bs)
        query_aware = js_distance(true, estimate) < self.tau  # (B, Hq)
        aware = sparse.cumulative_select(pooled, self.gamma, causal)
        vertical = probs.sum(2)
        vertical = vertical / vertical.sum(-1, keepdim=True)
        slash = sparse.slash_sums(probs, q)
        slash = slash / slash.sum(-1, keepdim=True)
        ones = torch.ones(1, dtype=torch.bool, device=probs.device)
        vs = sparse.vertical_slash_blocks(
            sparse.cumulative_select(vertical, self.gamma, ones),
            sparse.cumulative_select(slash, self.gamma, ones),
            q,
            bs,
        )
        sparse.add_stat(call, "prefill_query_aware", float(query_aware.float().mean()), query_aware.numel())
        return torch.where(query_aware[..., None, None], aware, vs)

    @staticmethod
    def _last_block_estimate(call: AttentionCall, bs: int) -> torch.Tensor:
        """Pooled estimate ``(B, Hq, nk)`` for the last query block: its mean query against mean-pooled keys."""
        q = call.n_new
        hq, h = call.query.shape[1], call.keys.shape[1]
        last_q = call.query[:, :, max(0, q - bs) :].to(torch.float32).mean(2, keepdim=True)
        pk = sparse.pool_blocks(call.keys.to(torch.float32), bs).repeat_interleave(hq // h, dim=1)
        logits = (last_q @ pk.transpose(-1, -2)).squeeze(2) * call.scaling
        return logits.softmax(-1)  # every key block is in the last query's past
