"""``snapkv``: attention of an observation window of recent queries, pooled over neighbouring tokens.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024). The last ``window``
queries of the prompt vote for the keys they attend to; the votes are smoothed with a 1D pooling of size ``kernel``
so that a selected token keeps its neighbours; the window itself is always kept. With chunked prefill, each chunk's
last queries vote when that chunk is compressed; during decoding the window is the one new query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from . import register
from .base import Method, Observation, hp, pool_in_stream_order, recent_mask


@register
@dataclass
class SnapKV(Method):
    """Score = pooled attention from the last ``window`` queries (mean over the GQA group); window kept.

    window: observation window (the paper uses 32). kernel: pooling size (5 in kvpress). pooling: "avg" or "max".
    """

    window: int = hp(32, ge=1)
    kernel: int = hp(5, ge=1, odd=True)
    pooling: str = hp("avg", choices=("avg", "max"))

    name = "snapkv"
    paper = "Li et al. 2024, arXiv:2404.14469"
    needs = "attention (observation window)"
    simplifications = (
        "window 32, average pooling 5 over stream neighbours (kvpress's defaults); mean over the GQA group; with "
        "chunked prefill each chunk's last queries vote; at a decoding step that evicts the window is the one new query"
    )

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=self.window) if evicting else None

    def score(self, obs: Observation) -> torch.Tensor:
        votes = obs.attention_per_kv_head()  # (B, h, T)
        scores = pool_in_stream_order(votes, obs.positions, self.kernel, self.pooling, obs.valid)
        window = min(self.window, obs.n_new)
        return scores.masked_fill(recent_mask(obs.positions, window), float("inf"))
