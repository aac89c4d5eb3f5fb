"""``keyformer``: key tokens by a Gumbel-regularised softmax of attention logits, accumulated over steps, plus a
recent window.

Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient Generative Inference"
(MLSys 2024). Dropping tokens makes the remaining attention probabilities grow, which biases plain accumulated
attention (H2O); Keyformer scores tokens with ``softmax((z + zeta) / tau)`` instead, where ``z`` are the attention
logits, ``zeta`` Gumbel noise and ``tau`` a temperature that grows with every decoding step (``tau_init + step x
tau_delta``; the prompt uses ``tau_init``). The scores are summed over the queries of each pass and accumulated over
passes; the cache keeps the ``recent`` share of the budget as a window of recent tokens and the highest-scoring
tokens for the rest (the paper's key tokens).

The logits are computed here from the pass's queries and the held keys, ``CHUNK`` query rows at a time (memory
``O(CHUNK x T)`` per head). Noise is drawn from a generator seeded by ``seed``, the layer and the position, so the same
inputs give the same cache; ``noise = 0`` gives the deterministic score ``softmax(z / tau)`` (H2O's accumulated
attention when ``tau = 1``).

Simplifications: scores are per KV head, averaged over the query heads of its group (the paper's models are
multi-head); with chunked prefill every chunk uses ``tau_init``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp, recent_mask

STATE = "keyformer_score"
STEPS = "keyformer_steps"
CHUNK = 256


@register
@dataclass
class Keyformer(Method):
    """Accumulated Gumbel-softmax score of the logits, plus a window of recent tokens.

    recent: share of the budget kept as recent tokens (the paper: 20-30%). tau_init, tau_delta: temperature at the
    prompt and its increase per decoding step (the paper's code: 1.0 and 0.01). noise: scale of the Gumbel noise
    (1 is the paper; 0 is deterministic). seed: noise seed.
    """

    recent: float = hp(0.3, ge=0.0, lt=1.0)
    tau_init: float = hp(1.0, gt=0.0)
    tau_delta: float = hp(0.01, ge=0.0)
    noise: float = hp(1.0, ge=0.0)
    seed: int = 0

    name = "keyformer"
    paper = "Adnan et al. 2024, arXiv:2403.09054"
    needs = "queries and keys (logits, every step)"
    simplifications = (
        "scores per KV head, averaged over the query heads of its group; with chunked prefill every chunk uses "
        "`tau_init`; logits computed from the pass's queries, 256 rows at a time; seeded Gumbel noise (`noise=0` is the"
        " deterministic score); refuses left-padded batches (noise is drawn per slot)"
    )
    batch = "unpadded"  # its Gumbel noise is drawn per slot, so a padded row would draw other noise than alone

    def temperature(self, obs: Observation) -> float:
        """``tau_init`` for prompt passes, ``tau_init + step x tau_delta`` for the ``step``-th decoding step."""
        if obs.n_new > 1:
            return self.tau_init
        steps = obs.layer_state.get((STEPS, obs.head_start), 0)
        obs.layer_state[(STEPS, obs.head_start)] = steps + 1
        return self.tau_init + steps * self.tau_delta

    def observe(self, obs: Observation) -> None:
        tau = self.temperature(obs)
        scores = gumbel_scores(obs, tau, self.noise, self.seed)
        acc = obs.state.get(STATE)
        obs.state[STATE] = scores if acc is None else acc + scores

    def score(self, obs: Observation) -> torch.Tensor:
        scores = obs.state[STATE].clone()
        return scores.masked_fill(recent_mask(obs.positions, int(obs.budget * self.recent)), float("inf"))


def gumbel_scores(obs: Observation, tau: float, noise: float, seed: int) -> torch.Tensor:
    """``sum_i softmax((z_i + noise * g_i) / tau)`` over the pass's queries ``i``: ``(B, h, T)``, mean over the group.

    ``z_i`` are query ``i``'s logits over the held keys (causal and padding masks applied), ``g_i`` standard Gumbel
    noise from a generator seeded by ``seed``, the layer, the head range and the first new position.
    """
    queries, keys = obs.queries, obs.keys
    b, hq, q, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    gen = None
    if noise > 0:
        first = int(obs.positions[0, 0, -q]) if q else 0
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + obs.layer_idx * 10_007 + obs.head_start * 101 + first) % (2**63)
        )
    k_t = keys.to(torch.float32).transpose(-1, -2)
    total = torch.zeros(b, h, g, t, dtype=torch.float32, device=queries.device)
    kj = torch.arange(t, device=queries.device)
    for start in range(0, q, CHUNK):
        stop = min(start + CHUNK, q)
        r = stop - start
        q_blk = queries[:, :, start:stop].to(torch.float32).reshape(b, h, g * r, d)
        logits = (q_blk @ k_t).view(b, h, g, r, t) * obs.scaling
        rows = torch.arange(start, stop, device=queries.device)
        allowed = (kj[None, :] <= (t - q + rows)[:, None])[None, None, None]
        if obs.valid is not None:
            own = kj[None, :] == (t - q + rows)[:, None]
            allowed = allowed & (obs.valid[:, :, None, None, :] | own[None, None, None])
        if gen is not None:
            uniform = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1.0 - 1e-7).to(logits.device)
            logits = logits + noise * -torch.log(-torch.log(uniform))
        probs = (logits / tau).masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        total += probs.sum(dim=3)
    return total.mean(dim=2)
