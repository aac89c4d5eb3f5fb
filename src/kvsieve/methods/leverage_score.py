"""``leverage_score``: approximate statistical leverage of the pre-RoPE keys (Compactor's geometric half).

Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores"
(2025); kvpress's ``LeverageScorePress``. The held pre-RoPE keys of a head, centred over the sequence, are sketched on
the right by a Gaussian matrix ``Phi`` (``D x sketch``, scaled by ``1/sqrt(sketch)``); the leverage of row ``i`` is
``x_i (X^T X)^-1 x_i^T``, computed with a Cholesky solve (adaptive jitter); the scores are z-normalised. Outliers in
key space score high and are kept; no attention is needed.

Simplifications: pre-RoPE keys are recovered by undoing RoPE (kvpress recomputes them from hidden states); the sketch
is seeded (``seed``), one per head and shared by batch rows (kvpress draws it from the global generator); the z-score
runs per batch row (kvpress: over the whole batch); padding is left out of the centring and the Gram matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp
from .qk_stats import rope_of, unrotate, zscore


def cholesky_with_jitter(gram: torch.Tensor, jitter: float = 1e-2, tries: int = 5) -> torch.Tensor:
    """Lower Cholesky factors of ``gram + jitter I`` ``(..., k, k)``; the jitter of each matrix whose factorisation
    fails is raised tenfold (kvpress raises it for the whole batch; per matrix, a batch row gets what it gets alone)."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    cur = torch.full(gram.shape[:-2], float(jitter), dtype=gram.dtype, device=gram.device)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + cur[..., None, None] * eye)
        failed = info != 0
        if not bool(failed.any()):
            return factor
        cur = torch.where(failed, torch.where(cur == 0, 1e-2, 10.0 * cur).clamp(min=1e-8), cur)
    raise torch.linalg.LinAlgError(f"Cholesky failed after {tries} tries")


def leverage(keys: torch.Tensor, mask: torch.Tensor | None, sketch: int, seed: int) -> torch.Tensor:
    """Approximate leverage ``(B, h, T)`` of the rows of ``keys`` ``(B, h, T, D)`` where ``mask`` (others 0)."""
    b, h, t, d = keys.shape
    gen = torch.Generator().manual_seed(seed)
    phi = (torch.randn(h, d, sketch, generator=gen) / math.sqrt(sketch)).to(keys.device)
    x = keys.to(torch.float32)
    m = torch.ones(b, h, t, 1, device=keys.device) if mask is None else mask[..., None].to(torch.float32)
    mean = (x * m).sum(dim=2, keepdim=True) / m.sum(dim=2, keepdim=True).clamp(min=1.0)
    x = ((x - mean) * m) @ phi[None]  # (B, h, T, k)
    xt = x.transpose(-2, -1)
    gram = xt @ x
    factor = cholesky_with_jitter(0.5 * (gram + gram.transpose(-2, -1)))
    solved = torch.cholesky_solve(xt, factor)  # (X^T X)^-1 X^T
    return (x * solved.transpose(-2, -1)).sum(dim=-1).clamp(min=0.0)


def pre_rope_keys(obs: Observation) -> torch.Tensor:
    """The held keys before RoPE, fp32 ``(B, h, T, D)``."""
    return unrotate(obs.keys, obs.positions, rope_of(obs))


@register
@dataclass
class LeverageScore(Method):
    """Score = z-scored approximate leverage of the centred, Gaussian-sketched pre-RoPE keys.

    sketch: sketch dimension (48). seed: seed of the sketch.
    """

    sketch: int = hp(48, ge=1)
    seed: int = hp(0, ge=0)

    name = "leverage_score"
    paper = "Chari & Van Durme 2025, arXiv:2507.08143"
    needs = "keys (pre-RoPE)"
    simplifications = (
        "pre-RoPE keys by undoing RoPE; seeded sketch per head; z-score per batch row; scores the held keys at every "
        "eviction (kvpress: prefill only)"
    )

    def observe(self, obs: Observation) -> None:
        rope_of(obs)  # cache the RoPE frequencies while the module is at hand (the shared-prefill replay has none)

    def score(self, obs: Observation) -> torch.Tensor:
        keys = pre_rope_keys(obs)
        rows = [  # one batch row at a time: the same shapes as the row alone, so the same rounding
            leverage(keys[b : b + 1], None if obs.valid is None else obs.valid[b : b + 1], self.sketch, self.seed)
            for b in range(keys.shape[0])
        ]
        return zscore(torch.cat(rows), obs.valid)
