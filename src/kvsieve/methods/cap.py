"""``cap``: log-det capacity scores of the values, weighted by alignment with the expected query (CAPKV).

CAPKV (arXiv:2604.25975); kvpress's ``CapPress``. With ``w_i = exp(tau <k_i, mu_q>)`` (keys and the query anchor
normalised, shifted by the head's maximum) and the capacity matrix ``A = I + sum_i w_i v_i v_i^T`` over the held
values, a token's score is ``w_i v_i^T A^-1 v_i``: its weighted leverage, the marginal gain in ``log det A`` it
brings. The anchor ``mu_q`` is the mean pre-RoPE query (first ``n_sink`` positions left out) rotated by RoPE averaged
over the next ``n_future`` positions (as ``expected_attention``). Scores are averaged over the GQA group; the first
``n_sink`` tokens are always kept.

Simplifications: those of kvpress's press (normalised keys and anchor, max shift, averaged RoPE, ``u_i = v_i``); the
query mean is accumulated over every pass the layer has seen (one prefill: the prompt's mean) with pre-RoPE queries
recovered by undoing RoPE; sinks +inf (kvpress: max + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register
from .base import Method, Observation, hp
from .expected_attention import future_query_statistics, observe_pre_rope_queries


def capacity_scores(anchor: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, include: torch.Tensor,
                    tau: float, eps: float) -> torch.Tensor:  # fmt: skip
    """CAPKV scores ``(B, h, T)``: anchor ``(B, h, g, D)``, keys/values ``(B, h, T, D)``, ``include`` ``(B, h, T)``
    the tokens that enter the capacity matrix and are scored (others 0)."""
    d = values.shape[-1]
    stat = torch.einsum("bhgd,bhtd->bhgt", F.normalize(anchor, dim=-1), F.normalize(keys.float(), dim=-1))
    logits = (tau * stat.clamp(-1.0, 1.0)).masked_fill(~include[:, :, None], float("-inf"))
    weights = torch.nan_to_num((logits - logits.amax(dim=-1, keepdim=True)).exp(), nan=0.0)  # (B, h, g, T)
    v = values.float()[:, :, None] * include[:, :, None, :, None]  # (B, h, 1, T, D)
    scaled = v * (weights + eps).sqrt()[..., None]
    capacity = torch.eye(d, device=v.device) + scaled.transpose(-1, -2) @ scaled  # (B, h, g, D, D)
    solved = torch.linalg.solve(capacity, v.expand_as(scaled).transpose(-1, -2))  # (B, h, g, D, T)
    lev = (v.transpose(-1, -2) * solved).sum(dim=-2)  # (B, h, g, T)
    return (weights * lev).mean(dim=2)


@register
@dataclass
class CAP(Method):
    """Score = ``w_i v_i^T (I + sum_j w_j v_j v_j^T)^-1 v_i`` with ``w_i = exp(tau cos(k_i, mu_q))``; sinks kept.

    tau: sharpness of the query-key alignment weights (5). n_future: future positions RoPE is averaged over (512).
    n_sink: sinks kept and left out of the query mean (4). epsilon: added to the weights (1e-6).
    """

    tau: float = hp(5.0, ge=0.0)
    n_future: int = hp(512, ge=1)
    n_sink: int = hp(4, ge=0)
    epsilon: float = hp(1e-6, ge=0.0)

    name = "cap"
    paper = "CAPKV, arXiv:2604.25975"
    needs = "queries (their mean), keys, values"
    simplifications = (
        "kvpress's CapPress (normalised alignment, max shift, averaged RoPE, u = v); query mean accumulated over the "
        "passes seen, pre-RoPE queries by undoing RoPE; sinks +inf"
    )

    def observe(self, obs: Observation) -> None:
        observe_pre_rope_queries(obs, self.n_sink)

    def score(self, obs: Observation) -> torch.Tensor:
        mu_r, _ = future_query_statistics(obs, self.n_future, second=False)
        b, h, _, d = obs.keys.shape
        sinks = obs.positions < self.n_sink
        include = ~sinks if obs.valid is None else obs.valid & ~sinks
        scores = capacity_scores(mu_r.view(b, h, -1, d), obs.keys, obs.values, include, self.tau, self.epsilon)
        return scores.masked_fill(sinks, float("inf"))
