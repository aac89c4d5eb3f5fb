"""``fastv``: after layer ``K``, only the tokens the last query attends to most go on through the model.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models" (ECCV 2024). Attention in deep layers is sparse, so after layer ``K`` a share of the image
tokens can be dropped from the sequence: layers ``K+1 ..`` compute on the rest only, and cache only them. Tokens are
ranked by the attention the last token gives them at layer ``K``, averaged over the heads (as the authors' code does).

Two ranking options are kvsieve's, not the paper's (their defaults are the paper): ``queries="instruction"`` ranks by
the attention of the question's tokens (the tokens after the last candidate) instead of the last token's, and
``pool`` averages each token's score over a window of ``pool`` neighbouring tokens, so a kept token keeps its
neighbours and a number or a name stays whole: the ranking SnapKV (Li et al. 2024) uses for the cache, here deciding
which rows go on through the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KVSieveError
from ..sequence import Pruner, StageView
from . import register
from .base import hp


@register
@dataclass
class FastV(Pruner):
    """Keep the ``keep`` share of the candidate tokens after layer ``layer``, ranked by the last query's attention.

    layer: the decoder layer whose attention ranks the tokens; pruning applies from layer ``layer + 1`` (the
    authors' ``K`` is ``layer + 1``: their code ranks with the attention of the layer before the first pruned one).
    keep: share of the candidate tokens that go on (the paper: 50% of the image tokens).
    scope: ``auto`` prunes the image tokens of a VLM prompt (the paper) and every prunable token of a text prompt;
    tokens marked protected (the question, in query-aware mode) and the last token always go on.
    queries: whose attention ranks: ``last`` (the paper) or ``instruction`` (the question's tokens; the last token
    when there is no question). pool: odd window of neighbouring rows each score is averaged over (1: none, the
    paper; SnapKV uses 7).
    """

    queries: str = hp("last", choices=("last", "instruction"))
    pool: int = hp(1, ge=1)

    name = "fastv"
    paper = "Chen et al. 2024, arXiv:2403.06764"
    needs = "attention of the last query (or of the question) at the pruning layer"
    simplifications = (
        "attention recomputed from the layer's input over this pass's tokens only (tokens of earlier passes are "
        "not in the softmax); text prompts: every prunable token is a candidate; padded batches are refused; "
        "`queries='instruction'` and `pool` are kvsieve's SnapKV-style ranking options (defaults: the paper's)"
    )

    def validate(self) -> None:
        super().validate()
        if self.pool % 2 == 0:
            raise KVSieveError(
                f"fastv: pool must be odd (a window centred on each token), got {self.pool}; e.g. pool=7"
            )

    def rank(self, view: StageView) -> torch.Tensor:
        score = view.attention(self.queries)
        # rows of a single stage are the pass's tokens in order: row neighbours are token neighbours
        return pooled(score, view.candidates, self.pool) if self.pool > 1 else score


def pooled(score: torch.Tensor, candidates: torch.Tensor, pool: int) -> torch.Tensor:
    """Each row's ``score`` ``(B, k)`` averaged over the candidates among its ``pool`` neighbouring rows (``pool`` odd):
    non-candidates (the question, whose rows attend to themselves) add nothing to a window."""
    cand = candidates.to(score.device, score.dtype)
    window = (pool, 1, pool // 2)
    total = F.avg_pool1d((score * cand)[:, None], *window)[:, 0]
    return total / F.avg_pool1d(cand[:, None], *window)[:, 0].clamp(min=1e-12)
