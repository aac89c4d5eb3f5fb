"""``criticalkv``: two-stage selection, the second weighted by the output projection of the values.

Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective" (2025); kvpress's
``CriticalKVPress``. The perturbation of the attention output when a KV pair goes is bounded by its attention weight
times ``||v W_o||`` (the value as the output projection writes it into the residual stream). Stage 1 keeps the top
``first_stage x budget`` tokens of the wrapped scorer outright; stage 2 ranks the rest by
``(score + epsilon) x ||v W_o||_1`` (per query head, averaged over the GQA group).

``||v W_o||_1`` is computed once per token when it arrives (``observe``, from ``obs.module.o_proj``) and kept with the
token. Simplifications: none in the score (kvpress's, L1 norm as kvpress); the wrapped scorer's own scores are used
as they are (kvpress warns to turn off ``expected_attention``'s value norm: pass
``criticalkv:expected_attention(use_vnorm=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import Observation, Wrapper, hp

STATE = "criticalkv_wov"
ROWS = 1024  # tokens per block when projecting values: memory O(ROWS x hidden) per query head


def projected_value_norm(values: torch.Tensor, o_proj: torch.Tensor, head_start: int, group: int) -> torch.Tensor:
    """``||v W_o||_1`` per KV head, averaged over its ``group`` query heads: ``(B, h, n)`` for values
    ``(B, h, n, D)`` of KV heads ``head_start ..``; ``o_proj``: the output projection's weight ``(hidden, Hq * D)``."""
    b, h, n, d = values.shape
    w = o_proj.view(o_proj.shape[0], -1, d)[:, head_start * group : (head_start + h) * group]  # (hidden, h*g, D)
    w = w.reshape(o_proj.shape[0], h, group, d).to(torch.float32)
    out = torch.empty(b, h, n, dtype=torch.float32, device=values.device)
    for start in range(0, n, ROWS):
        v = values[:, :, start : start + ROWS].to(torch.float32)
        projected = torch.einsum("bhtd,jhgd->bhgtj", v, w)  # (B, h, g, r, hidden)
        out[:, :, start : start + ROWS] = projected.abs().sum(dim=-1).mean(dim=2)
    return out


def observe_projected_norms(obs: Observation, key: str = STATE) -> None:
    """Store ``||v W_o||_1`` of this pass's tokens in ``obs.state[key]`` (held tokens keep theirs)."""
    if obs.module is None or not hasattr(obs.module, "o_proj"):
        raise KVSieveError("this method reads the layer's output projection (o_proj), which this model lacks")
    b, h, t, _ = obs.keys.shape
    state = obs.state.get(key)
    state = torch.zeros(b, h, t, dtype=torch.float32, device=obs.keys.device) if state is None else state.clone()
    new = obs.values[:, :, t - obs.n_new :]
    state[:, :, t - obs.n_new :] = projected_value_norm(new, obs.module.o_proj.weight, obs.head_start, obs.group_size)
    obs.state[key] = state


@register
@dataclass
class CriticalKV(Wrapper):
    """Wraps a scorer: its top ``first_stage x budget`` kept, the rest ranked by ``(score + eps) x ||v W_o||_1``.

    first_stage: share of the budget chosen by the wrapped scores alone (0.5). epsilon: added to the scores (1e-4).
    """

    first_stage: float = hp(0.5, ge=0.0, le=1.0)
    epsilon: float = hp(1e-4, ge=0.0)

    name = "criticalkv"
    family = "eviction"
    paper = "Feng et al. 2025, arXiv:2502.03805"
    needs = "the wrapped scorer's needs, values, W_o"
    simplifications = "none: kvpress's two stages (L1 norm of v W_o per query head, mean over the GQA group)"
    default_inner = "snapkv"

    def validate(self) -> None:
        if self.inner is not None and not self.inner.evicts:
            raise KVSieveError(f"criticalkv re-weights a scorer's scores; {self.inner.spec()} scores none")

    def observe(self, obs: Observation) -> None:
        observe_projected_norms(obs)
        super().observe(obs)

    def score(self, obs: Observation) -> torch.Tensor:
        scores = self._in.score(obs).to(torch.float32)
        if obs.valid is not None:
            scores = scores.masked_fill(~obs.valid, float("-inf"))
        first = min(int(obs.budget * self.first_stage), scores.shape[-1])
        reweighted = (scores + self.epsilon) * obs.state[STATE]
        if first > 0:
            top = scores.topk(first, dim=-1).indices
            reweighted = reweighted.scatter(-1, top, float("inf"))
        return reweighted
