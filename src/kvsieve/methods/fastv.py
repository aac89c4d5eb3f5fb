"""``fastv``: after layer ``K``, only the tokens the last query attends to most go on through the model.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (ECCV 2024). Attention in deep layers is sparse, so after layer ``K`` a share of the image
tokens can be dropped from the sequence: layers ``K+1 ..`` compute on the rest only, and cache only them. Tokens are
ranked by the attention the last token gives them at layer ``K``, averaged over the heads (as the authors' code does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sequence import Pruner, StageView
from . import register


@register
@dataclass
class FastV(Pruner):
    """Keep the ``keep`` share of the candidate tokens after layer ``layer``, ranked by the last query's attention.

    layer: the decoder layer whose attention ranks the tokens; pruning applies from layer ``layer + 1`` (the
    authors' ``K`` is ``layer + 1``: their code ranks with the attention of the layer before the first pruned one).
    keep: share of the candidate tokens that go on (the paper: 50% of the image tokens).
    scope: ``auto`` prunes the image tokens of a VLM prompt (the paper) and every prunable token of a text prompt;
    tokens marked protected (the question, in query-aware mode) and the last token always go on.
    """

    name = "fastv"
    paper = "Chen et al. 2024, arXiv:2403.06764"
    needs = "attention of the last query at the pruning layer"
    simplifications = (
        "attention recomputed from the layer's input over this pass's tokens only (tokens of earlier passes are "
        "not in the softmax); text prompts: every prunable token is a candidate; padded batches are refused"
    )

    def rank(self, view: StageView) -> torch.Tensor:
        return view.attention("last")
