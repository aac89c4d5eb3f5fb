"""``tova``: Token Omission Via Attention.

Oren et al., "Transformers are Multi-State RNNs" (2024). At each step, drop the token that the *current* query
attends to least, with attention averaged over all heads of the layer, so every head of a layer keeps the same
tokens. Applied to a prompt, the current query is the prompt's last token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from . import register
from .base import Method, Observation


@register
@dataclass
class TOVA(Method):
    """Score = attention from the last query, averaged over all query heads of the layer."""

    name = "tova"
    paper = "Oren et al. 2024, arXiv:2401.06104"
    needs = "attention (last query)"
    simplifications = "none: attention of the last query averaged over all heads of the layer"

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=1) if evicting else None

    def score(self, obs: Observation) -> torch.Tensor:
        assert obs.attention is not None
        layer_mean = obs.attention.mean(dim=1, keepdim=True)  # (B, 1, T)
        return layer_mean.expand(-1, obs.keys.shape[1], -1)
