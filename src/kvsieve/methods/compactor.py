"""``compactor``: leverage of the keys blended with chunked non-causal attention (query-agnostic).

Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores"
(2025); kvpress's ``CompactorPress``. The first ``n_sink`` and the last ``n_recent`` tokens are always kept; on the
others, score = ``blending x z(leverage_score) + z(non_causal_attention)`` (see those two methods), both computed
over those tokens only. ``blending=None`` uses the compression ratio of the eviction (kvpress's default heuristic),
here ``1 - budget / held``.

Simplifications: those of ``leverage_score`` and ``non_causal_attention`` (pre-RoPE keys by undoing RoPE, seeded
sketch, chunks by stream position, column sums taken per pass, z-scores per batch row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp
from .leverage_score import leverage, pre_rope_keys
from .non_causal_attention import attention_scores, observe_chunk_attention
from .qk_stats import rope_of, zscore


def edges(positions: torch.Tensor, valid: torch.Tensor | None, n_sink: int, n_recent: int) -> torch.Tensor:
    """True for the first ``n_sink`` and the last ``n_recent`` real tokens by position: ``(B, h, T)``."""
    real = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
    rank = positions.masked_fill(~real, -1).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return real & ((positions < n_sink) | (rank < n_recent))


@register
@dataclass
class Compactor(Method):
    """Score = blending x z(leverage) + z(chunked non-causal attention x ``||v||``); sinks and recent kept.

    n_sink, n_recent: tokens kept at the start and end (8, 4). chunk: non-causal chunk (256). sketch: leverage sketch
    dimension (48). blending: weight of the leverage term; None: the eviction's compression ratio. seed: sketch seed.
    """

    n_sink: int = hp(8, ge=0)
    n_recent: int = hp(4, ge=0)
    chunk: int = hp(256, ge=1)
    sketch: int = hp(48, ge=1)
    blending: float | None = None
    seed: int = hp(0, ge=0)

    name = "compactor"
    paper = "Chari & Van Durme 2025, arXiv:2507.08143"
    needs = "keys (pre-RoPE), queries of each pass, values"
    simplifications = (
        "as leverage_score and non_causal_attention (pre-RoPE keys by undoing RoPE, seeded sketch, chunks by stream "
        "position, column sums per pass, z-scores per batch row); blending None = 1 - budget / held"
    )

    def observe(self, obs: Observation) -> None:
        rope_of(obs)
        observe_chunk_attention(obs, self.name, self.chunk)

    def score(self, obs: Observation) -> torch.Tensor:
        kept = edges(obs.positions, obs.valid, self.n_sink, self.n_recent)
        middle = ~kept if obs.valid is None else obs.valid & ~kept
        lev = zscore(leverage(pre_rope_keys(obs), middle, self.sketch, self.seed), middle)
        att = attention_scores(obs, self.name, middle)
        held = obs.keys.shape[2] if obs.valid is None else int(obs.valid[:, 0].sum(dim=-1).max())
        blending = self.blending if self.blending is not None else max(0.0, 1.0 - obs.budget / max(1, held))
        return (blending * lev + att).masked_fill(kept, float("inf"))
