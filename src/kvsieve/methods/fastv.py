"""``fastv``: after layer ``K``, only the tokens the last query attends to most go on through the model.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (ECCV 2024). Attention in deep layers is sparse, so after layer ``K`` a share of the tokens
can be dropped from the sequence: layers ``K+1 ..`` compute on the rest only, and cache only them. Tokens are ranked
by the attention the last token gives them at layer ``K``, averaged over the heads (as the authors' code does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Observation, SequenceMethod


@register
@dataclass
class FastV(SequenceMethod):
    """Keep the ``keep`` share of a prefill pass's tokens after layer ``layer``, ranked by the last query's attention.

    layer: the decoder layer whose attention ranks the tokens (the paper: 2); pruning applies from layer ``layer + 1``.
    keep: share of the pass's tokens that go on (the paper: 50% of the image tokens); the last token always does.
    """

    name = "fastv"
    paper = "Chen et al. 2024, arXiv:2403.06764"
    needs = "attention of the last query at the pruning layer"
    simplifications = (
        "prunes every token of a prefill pass (text or image alike; the paper prunes image tokens only), ranked by "
        "the last query's attention averaged over all heads; padded batches are refused"
    )

    def score(self, obs: Observation) -> torch.Tensor:
        return obs.attention.mean(dim=1)  # (B, n_new)
