"""``snapkv``: attention of an observation window of recent queries, pooled over neighbouring tokens.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024). The last ``window``
queries of the prompt vote for the keys they attend to; the votes are smoothed with a 1D pooling of size ``kernel``
so that a selected token keeps its neighbours; the window itself is always kept. With chunked prefill, each chunk's
last queries vote when that chunk is compressed; during decoding the window is the one new query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionRequest
from . import register
from .base import Method, Observation, recent_mask


@register
@dataclass
class SnapKV(Method):
    """Score = pooled attention from the last ``window`` queries (mean over the GQA group); window kept.

    window: observation window (the paper uses 32). kernel: pooling size (5 in kvpress). pooling: "avg" or "max".
    """

    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    name = "snapkv"
    paper = "Li et al. 2024, arXiv:2404.14469"
    needs = "attention (observation window)"

    def __post_init__(self) -> None:
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.kernel % 2 != 1:
            raise ValueError("kernel must be odd so pooling stays centred")

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=self.window) if evicting else None

    def score(self, obs: Observation) -> torch.Tensor:
        votes = obs.attention_per_kv_head()  # (B, h, T)
        b, h, t = votes.shape
        flat = votes.reshape(b * h, 1, t)
        pad = self.kernel // 2
        if self.pooling == "avg":
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=pad, count_include_pad=False)
        else:
            pooled = F.max_pool1d(flat, self.kernel, stride=1, padding=pad)
        scores = pooled.reshape(b, h, t)
        window = min(self.window, obs.n_new)
        return scores.masked_fill(recent_mask(obs.positions, window), float("inf"))
