"""``keydiff``: keep the keys least similar to the average key.

Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
Environments" (2025); kvpress's ``KeyDiffPress``. The anchor is the mean of the held keys normalised to unit length;
a token's score is minus the cosine similarity of its key to the anchor, so distinctive keys are kept. Needs no
attention, so it works with any attention kernel.

Simplifications: none in the score (kvpress's). The paper evicts block by block while the prompt streams in; here
that is a chunked prefill (``kvsieve.prefill(..., chunk_size=N)``), each chunk compressed with the held tokens, as
kvpress's ``BlockPress(KeyDiffPress)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register
from .base import Method, Observation


@register
@dataclass
class KeyDiff(Method):
    """Score = -cos(k, mean of the unit-normalised held keys), per head (padding left out of the mean)."""

    name = "keydiff"
    paper = "Park et al. 2025, arXiv:2504.15364"
    needs = "keys"
    simplifications = (
        "none in the score (kvpress's); the paper's block-wise eviction is a chunked prefill (kvsieve.prefill "
        "chunk_size), as kvpress's BlockPress"
    )

    def score(self, obs: Observation) -> torch.Tensor:
        keys = obs.keys.to(torch.float32)
        unit = F.normalize(keys, p=2, dim=-1)
        if obs.valid is None:
            anchor = unit.mean(dim=2, keepdim=True)
        else:
            real = obs.valid[..., None].to(unit.dtype)
            anchor = (unit * real).sum(dim=2, keepdim=True) / real.sum(dim=2, keepdim=True).clamp(min=1.0)
        return -F.cosine_similarity(keys, anchor, dim=-1)
