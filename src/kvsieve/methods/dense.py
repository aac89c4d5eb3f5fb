"""``dense``: the reference attention compute, dense sdpa over every held token (what kvsieve does by default)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionCall
from ..attention import dense as dense_attention
from . import register
from .base import PrefillMethod


@register
@dataclass
class Dense(PrefillMethod):
    """Dense causal attention through sdpa: bitwise what transformers computes (the default prefill)."""

    name = "dense"
    family = "baseline"
    paper = "-"
    needs = "nothing"
    simplifications = "none: the reference (transformers' own sdpa path)"
    exact = True

    def attend(self, call: AttentionCall) -> torch.Tensor:
        return dense_attention(call)
