"""``expected_attention``: the attention future queries are expected to pay, in closed form.

Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future Queries Distribution"
(2025); kvpress's ``ExpectedAttentionPress``. Future queries are modelled as Gaussian: the mean ``mu`` and covariance
``S`` of the layer's pre-RoPE queries (the first ``n_sink`` positions left out, they are outliers). RoPE is averaged
over the next ``n_future`` positions into one matrix ``R`` (applied to ``mu`` and ``S``). For a Gaussian query,
``E[exp(s q.k)] = exp(s k.(R mu) + s^2 k^T (R S R^T) k / 2)``; the softmax of that over the held keys (sinks left
out), averaged over the GQA group and multiplied by ``||v||``, is the score. The sinks are always kept.

Simplifications: the query statistics are computed here from the queries the layer has seen (every pass so far,
accumulated; a single prefill gives exactly kvpress's statistics of the prompt), in fp64, with pre-RoPE queries
recovered by undoing the rotation (not recomputed from hidden states); the logit scale is the model's attention
scaling ``s`` (kvpress: ``1/sqrt(d)``, the same for standard models); sinks get ``+inf`` (kvpress: max + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp
from .qk_stats import (
    accumulate_moments,
    mean_and_covariance,
    mean_rotation,
    moments,
    new_query_positions,
    real_new_queries,
    rope_of,
    unrotate,
)

STATS = "expected_attention_queries"


def observe_pre_rope_queries(obs: Observation, n_sink: int) -> None:
    """Accumulate the moments of this pass's pre-RoPE queries (shared by ``expected_attention`` and ``cap``)."""
    rope = rope_of(obs)
    pre = unrotate(obs.queries, new_query_positions(obs), rope)
    accumulate_moments(obs, STATS, pre, real_new_queries(obs, n_sink))


def future_query_statistics(
    obs: Observation, n_future: int, second: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``R mu`` ``(B, Hq, D)`` and ``R S R^T`` ``(B, Hq, D, D)`` (None unless ``second``): the expected future query
    of each head, RoPE averaged over the ``n_future`` positions after the last held one."""
    b, hq, _, d = obs.queries.shape
    mu, cov = mean_and_covariance(moments(obs, STATS), (b, hq, d))
    mu, cov = mu.to(obs.keys.device), cov.to(obs.keys.device)
    start = obs.positions.flatten(1).amax(dim=1) + 1
    rot = mean_rotation(rope_of(obs), start, n_future)  # (B, D, D)
    mu_r = torch.einsum("bij,bhj->bhi", rot, mu)
    cov_r = rot[:, None] @ cov @ rot[:, None].transpose(-1, -2) if second else None
    return mu_r, cov_r


@register
@dataclass
class ExpectedAttention(Method):
    """Closed-form expected attention of future queries (Gaussian, RoPE averaged), times ``||v||``; sinks kept.

    n_future: future positions RoPE is averaged over (512). n_sink: first positions always kept and left out of the
    query statistics (4). use_covariance: include the covariance term. use_vnorm: multiply by ``||v||``.
    epsilon: added to the expected attention before the value norm (0).
    """

    n_future: int = hp(512, ge=1)
    n_sink: int = hp(4, ge=0)
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = hp(0.0, ge=0.0)

    name = "expected_attention"
    paper = "Devoto et al. 2025, arXiv:2510.00636"
    needs = "queries (their statistics), keys, values"
    simplifications = (
        "query mean/covariance accumulated over every pass the layer has seen (one prefill: kvpress's statistics of "
        "the prompt), pre-RoPE queries recovered by undoing RoPE, fp64 moments; logit scale is the model's attention "
        "scaling; sinks +inf"
    )

    def observe(self, obs: Observation) -> None:
        observe_pre_rope_queries(obs, self.n_sink)

    def score(self, obs: Observation) -> torch.Tensor:
        mu_r, cov_r = future_query_statistics(obs, self.n_future, self.use_covariance)
        b, h, _, d = obs.keys.shape
        g = obs.group_size
        keys = obs.keys.to(torch.float32)
        s = obs.scaling
        logits = torch.einsum("bhgd,bhtd->bhgt", mu_r.view(b, h, g, d), keys) * s
        if cov_r is not None:
            quad = ((keys[:, :, None] @ cov_r.view(b, h, g, d, d)) * keys[:, :, None]).sum(dim=-1)
            logits = logits + quad * (s * s / 2)
        sinks = obs.positions < self.n_sink
        hidden = sinks if obs.valid is None else sinks | ~obs.valid
        logits = logits.masked_fill(hidden[:, :, None], float("-inf"))
        probs = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0).mean(dim=2)  # (B, h, T)
        scores = (probs + self.epsilon) * obs.values.to(torch.float32).norm(dim=-1) if self.use_vnorm else probs
        return scores.masked_fill(sinks, float("inf"))
