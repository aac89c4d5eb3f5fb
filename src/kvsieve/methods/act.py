"""``act``: attention calibration that shrinks hidden attention sinks and gives their attention to the other tokens.

Yu et al., "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training
through Attention Calibration" (ICML 2024). Sinks also appear after the first token, and some hurt accuracy. On the
fly, for each forward pass and selected head, ACT marks as sinks the keys beyond position 0 whose mean attention over
the queries that see them exceeds ``threshold`` (the authors' code: 0.1); it multiplies the attention they receive by
``beta`` (0.4) and hands the removed mass to the other tokens in proportion to their attention.

For a query row whose sink mass is ``P``, that is: sink probabilities ``beta p``, others ``p (1 - beta P) / (1 - P)``.
It equals adding ``log(beta (1 - P) / (1 - beta P))`` to the sinks' logits (per row), which is how it is applied
here (:meth:`Method.logit_bias`), so it composes with any evicting method (``act:snapkv``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import STATS_CHUNK, AttentionRequest, causal_allowed, column_sums
from . import register
from .base import Observation, hp
from .families import Calibration


@register
@dataclass
class ACT(Calibration):
    """Hidden sinks (mean attention > ``threshold``, beyond position 0) scaled by ``beta``, mass redistributed.

    beta: in (0, 1]; 1 changes nothing. threshold: the sink rule (mean attention a key receives from this pass's
    queries that see it). heads: ``"all"`` or layers / query heads (see :class:`~kvsieve.methods.zerotuning.
    Calibration`).

    Simplifications: the paper chooses the heads to calibrate by a search on a small calibration set (keeping a head
    only if calibrating it helps); here the heads are given (default all), and ``benchmarks/calibration.py`` reports
    what that does on the bench tasks. Sinks are found per forward pass, as in the authors' code: during decoding
    (one query) a key is a sink when that query's attention on it exceeds ``threshold``.
    """

    beta: float = hp(0.4, gt=0.0, le=1.0)
    threshold: float = hp(0.1, gt=0.0, lt=1.0)

    name = "act"
    paper = "Yu et al. 2024, arXiv:2406.15765"
    needs = "queries and keys (attention per pass)"
    simplifications = (
        "heads are given (default all) rather than chosen by the paper's search on a calibration set; sinks are found "
        "per forward pass as in the authors' code"
    )

    @torch.no_grad()
    def calibration_bias(self, obs: Observation) -> torch.Tensor | None:
        if self.beta == 1.0:
            return None
        chosen = self.selected_heads(obs)
        if not bool(chosen.any()):
            return None
        q, keys, valid = obs.queries, obs.keys, obs.valid
        b, hq, n, d = q.shape
        h, t = keys.shape[1], keys.shape[2]
        g = hq // h
        col = column_sums(q, keys, obs.scaling, valid, AttentionRequest())  # (B, Hq, T)
        kj = torch.arange(t, device=q.device)
        seen = (n - (kj - (t - n)).clamp(min=0)).to(torch.float32)  # this pass's queries that see key j
        sinks = (col / seen) > self.threshold
        sinks &= (obs.positions != 0).repeat_interleave(g, dim=1)
        if valid is not None:
            sinks &= valid.repeat_interleave(g, dim=1)
        sinks &= chosen[None, :, None]
        if not bool(sinks.any()):
            return None
        # per-row sink mass P, chunk by chunk, then the per-row logit offset that gives the sinks beta * p
        mass = torch.empty(b, hq, n, dtype=torch.float32, device=q.device)
        k_t = keys.to(torch.float32).transpose(-1, -2)
        sink_view = sinks.view(b, h, g, 1, t)
        for start in range(0, n, STATS_CHUNK):
            stop = min(start + STATS_CHUNK, n)
            r = stop - start
            q_blk = q[:, :, start:stop].to(torch.float32).reshape(b, h, g * r, d)
            logits = (q_blk @ k_t).view(b, h, g, r, t) * obs.scaling
            allowed = causal_allowed(n, t, valid, slice(start, stop), device=q.device)
            probs = logits.masked_fill(~allowed[:, :, None], float("-inf")).softmax(dim=-1)
            mass[:, :, start:stop] = (probs * sink_view).sum(-1).reshape(b, hq, r)
        mass = mass.clamp(max=1.0 - 1e-6)
        offset = math.log(self.beta) + torch.log1p(-mass) - torch.log1p(-self.beta * mass)  # (B, Hq, n)
        return torch.where(sinks[:, :, None, :], offset[..., None], torch.zeros((), device=q.device))
