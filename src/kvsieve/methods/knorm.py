"""``knorm``: keep the tokens whose keys have the *lowest* L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP 2024): keys with a
low norm receive high attention, so their KV pairs are kept. Needs only the keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation


@register
@dataclass
class KNorm(Method):
    """Score = -||k||_2 per head, computed in fp32 (bf16 norms tie too often to rank)."""

    name = "knorm"
    paper = "Devoto et al. 2024, arXiv:2406.11430"
    needs = "keys"
    simplifications = "none: lowest key L2 norm kept (fp32 norms)"

    def score(self, obs: Observation) -> torch.Tensor:
        return -obs.keys.to(torch.float32).norm(dim=-1)
