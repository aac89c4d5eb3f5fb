"""``adakv``: adaptive budget allocation across the heads of a layer, around any scorer.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference" (2024).
The layer's budget (``budget x heads`` tokens) goes to the highest-scoring tokens across *all* its heads, so heads
with concentrated attention keep few tokens and diffuse heads keep many. A safeguard keeps at least
``alpha_safeguard x budget`` tokens in every head (as in kvpress). Heads then hold tensors of different lengths, and
the memory saved is real: a head keeping 40 tokens holds 40 tokens' tensors.

Limits: batch size 1 (a per-head allocation shared across a batch would not be the paper's); inner methods must keep
original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from ..cache import Segment
from ..errors import KVSieveError
from . import register
from .base import Method, Observation, overrides


@register
@dataclass
class AdaKV(Method):
    """Wraps ``inner``: its scores, compared across heads; the top ``budget x heads`` tokens of the layer kept.

    alpha_safeguard: fraction of the per-head budget every head keeps whatever its scores (kvpress: 0.2).
    """

    inner: Method | None = None
    alpha_safeguard: float = 0.2

    name = "adakv"
    family = "budget wrapper"
    paper = "Feng et al. 2024, arXiv:2407.11550"
    needs = "the wrapped method's needs"
    delegates = ("logit_bias", "merge", "pack")

    def __post_init__(self) -> None:
        if self.inner is None:
            raise KVSieveError("adakv wraps a scorer: write adakv:<method>, e.g. adakv:snapkv")
        if self.inner.rerotate:
            raise KVSieveError(
                "adakv gives heads different lengths, which position re-rotation cannot index; "
                "wrap a method that keeps original positions, e.g. adakv:streaming_llm(rerotate=False)"
            )
        if overrides(self.inner, "reads"):
            raise KVSieveError(
                f"adakv allocates what an evicting method keeps; {self.inner.spec()} selects reads instead. Compose "
                f"the other way round, e.g. quest(read_budget=256):adakv:snapkv"
            )
        if not (0.0 <= self.alpha_safeguard <= 1.0):
            raise KVSieveError(f"alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")

    def check_budget(self, tokens: int) -> None:
        self.inner.check_budget(tokens)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        return self.inner.layer_budget(budget, layer_idx, n_layers)

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return self.inner.attention_request(evicting)

    def observe(self, obs: Observation) -> None:
        self.inner.observe(obs)

    def score(self, obs: Observation) -> torch.Tensor:
        return self.inner.score(obs)

    # merging, storage and attention bias stay the inner method's (merge runs per head after the head-wise split)
    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        return self.inner.logit_bias(obs)

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.merge(obs, keep)

    def pack(self, segment: Segment) -> Segment:
        return self.inner.pack(segment)

    def select(self, scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
        """One ``(1, 1, k_h)`` index tensor per KV head, the ``k_h`` summing to ``budget x heads``."""
        if scores[0].shape[0] != 1:
            raise KVSieveError("adakv allocates budgets per head for one sequence at a time; use batch size 1")
        per_head = [s[:, h].to(torch.float32) for s in scores for h in range(s.shape[1])]  # each (1, T_h)
        guaranteed = max(1, int(self.alpha_safeguard * budget))
        boosted = []
        for s in per_head:
            s = s.clone()
            top = s.topk(min(guaranteed, s.shape[-1]), dim=-1).indices
            # a finite boost above every real score: guaranteed tokens win, and keep their order among themselves
            s.scatter_(-1, top, s.gather(-1, top) + _boost(s))
            boosted.append(s)
        flat = torch.cat(boosted, dim=-1)
        chosen = flat.topk(min(budget * len(per_head), flat.shape[-1]), dim=-1).indices[0]
        bounds = torch.tensor([0] + [s.shape[-1] for s in per_head]).cumsum(0)
        out = []
        for h in range(len(per_head)):
            mine = chosen[(chosen >= bounds[h]) & (chosen < bounds[h + 1])] - bounds[h]
            out.append(mine.view(1, 1, -1))
        return out


def _boost(s: torch.Tensor) -> torch.Tensor:
    finite = s[torch.isfinite(s)]
    span = (finite.max() - finite.min()).abs() + 1.0 if finite.numel() else torch.tensor(1.0)
    return span * 4.0
