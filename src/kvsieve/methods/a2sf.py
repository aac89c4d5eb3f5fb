"""``a2sf`` and ``h2o``: accumulated attention, with and without a forgetting factor.

- H2O: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs" (NeurIPS 2023). A
  token's score is the attention it has received, summed over every query so far; the cache keeps the heavy hitters
  plus a window of recent tokens (half the budget each in the paper).
- A2SF: Jo & Shin, "A2SF: Accumulative Attention Scoring with Forgetting Factor for Token Pruning in Transformer
  Decoder" (2024). Past scores are multiplied by a forgetting factor at every step, ``s <- gamma * s + a_t``, so old
  tokens, which more queries have seen, do not win merely by age. H2O is the case ``gamma = 1``.

Within one forward pass of ``q`` tokens the update is applied row by row, i.e. query ``i`` contributes with weight
``gamma ** (q - 1 - i)``, exactly what ``q`` single-token steps would give. Scores are kept per KV head, averaged
over the query heads of its group (the papers use multi-head models; this is the GQA reading).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from ..errors import KVSieveError
from . import register
from .base import Method, Observation, hp, recent_mask

STATE = "accumulated_attention"


@register
@dataclass
class A2SF(Method):
    """Accumulated attention with forgetting factor ``forgetting`` plus a recent window.

    forgetting: gamma in (0, 1]; 1 is H2O.
    recent: share of the budget reserved for the most recent tokens (H2O: 0.5); the rest goes to top scores.
    """

    forgetting: float = hp(0.9, gt=0.0, le=1.0)
    recent: float = hp(0.5, ge=0.0, lt=1.0)

    name = "a2sf"
    paper = "Jo & Shin 2024, arXiv:2407.20485"
    needs = "attention (all queries, every step)"
    simplifications = (
        "forgetting 0.9 by default; within one forward pass the decay is applied row by row (exactly what single steps "
        "give); per KV head as `h2o`"
    )

    def attention_request(self, evicting: bool) -> AttentionRequest:
        return AttentionRequest(last=None, decay=self.forgetting)

    def observe(self, obs: Observation) -> None:
        acc = obs.state.get(STATE)
        if acc is None:
            acc = torch.zeros(obs.positions.shape, dtype=torch.float32, device=obs.keys.device)
        # old evidence fades by gamma per new query; the decayed sum over this pass's queries is added
        obs.state[STATE] = acc * (self.forgetting**obs.n_new) + obs.attention_per_kv_head()

    def score(self, obs: Observation) -> torch.Tensor:
        scores = obs.state[STATE].clone()
        n_recent = int(obs.budget * self.recent)
        return scores.masked_fill(recent_mask(obs.positions, n_recent), float("inf"))


@register
@dataclass
class H2O(A2SF):
    """H2O: A2SF with no forgetting (``forgetting = 1``); heavy hitters plus a recent window."""

    forgetting: float = hp(1.0, gt=0.0, le=1.0)

    name = "h2o"
    simplifications = (
        "`a2sf` with forgetting 1; half the budget for heavy hitters, half for recent tokens; scores per KV head, the "
        "mean over its query heads (the paper's models are multi-head)"
    )
    paper = "Zhang et al. 2023, arXiv:2306.14048"

    def validate(self) -> None:
        if self.forgetting != 1.0:
            raise KVSieveError("h2o accumulates without forgetting; use a2sf(forgetting=...) for gamma < 1")
