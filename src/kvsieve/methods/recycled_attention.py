"""``recycled_attention``: alternate full-attention steps with steps that recycle their top-K tokens.

Xu, Goyal & Choi, "Recycled Attention: Efficient inference for long-context language models" (2024). Consecutive
tokens attend to similar parts of the context, so a *full step* attends to every token and remembers, per layer and
KV head, the K tokens it attended to most; the *recycled steps* that follow attend only to those K tokens and to the
tokens generated since the full step. A full step comes back every ``stride`` steps (the paper's fixed schedule),
or, with ``similarity`` set, as soon as the current query's cosine similarity with the query of the last full step
drops below it (the paper's dynamic schedule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import Observation, top_slots
from .families import SelectiveMethod, held_unchanged, query_similarity, remap_by_position
from .tidaldecode import group_attention


@register
@dataclass
class RecycledAttention(SelectiveMethod):
    """Full step every ``stride`` steps (or on a query-similarity drop); partial steps read its top tokens + new ones.

    stride: decoding steps from one full step to the next (1: every step full); 0 leaves refreshes to
    ``similarity`` alone. similarity: refresh when the cosine similarity of this step's query (the layer's query
    heads, flattened) with the last full step's query is below this; None: fixed schedule only.

    Simplifications: GQA: each KV head recycles its own top tokens, ranked by its query heads' attention
    probabilities summed; the full step's attention scores come from a second pass over the keys (the paper reads
    them from its attention kernel); the recycled tokens are indices into the one kept cache, not a second copy of
    their keys and values; the tokens generated since the full step count against the read budget (the top-K shrinks
    as they accumulate, and a full step comes early if they fill it); the similarity test is per layer.
    """

    stride: int = 10
    similarity: float | None = None

    name = "recycled_attention"
    paper = "Xu et al. 2024, arXiv:2411.05787"
    needs = "attention of the decoding query on full steps"
    simplifications = (
        "GQA: each KV head recycles its own top tokens; full-step scores come from a second pass over the keys; "
        "recycled tokens are indices into the one kept cache; tokens generated since the full step count against the "
        "read budget; the similarity test is per layer"
    )

    def validate(self) -> None:
        super().validate()
        if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 0:
            raise KVSieveError(f"recycled_attention: stride must be a whole number >= 0, got {self.stride!r}")
        if self.stride == 0 and self.similarity is None:
            raise KVSieveError("recycled_attention: stride=0 needs a similarity threshold, e.g. similarity=0.9")
        if self.similarity is not None and not (-1.0 <= self.similarity <= 1.0):
            raise KVSieveError(f"recycled_attention: similarity is a cosine in [-1, 1], got {self.similarity}")

    def full_step_due(self, state: dict, obs: Observation, budget: int) -> bool:
        """Whether this step must attend to everything and refresh the recycled tokens."""
        if state.get("order") is None:
            return True
        if self.stride and state["since"] + 1 >= self.stride:
            return True
        if self.similarity is not None:
            sim = query_similarity(obs.queries, state["query"])
            if bool((sim < self.similarity).any()):
                return True
        return self._recent(state, obs) >= budget or state["order"].shape[-1] < budget - self._recent(state, obs)

    def _recent(self, state: dict, obs: Observation) -> int:
        """Tokens read besides the recycled ones: those from the full step's newest token on."""
        if held_unchanged(state["positions"], obs.positions):
            return obs.keys.shape[2] - state["tokens"] + 1
        return int((obs.positions >= state["newest"]).sum(dim=-1).max())

    def reads(self, obs: Observation) -> torch.Tensor | None:
        b, h, t, _ = obs.keys.shape
        budget = obs.read_budget
        state = self._state(obs, "recycle")
        state.setdefault("full_steps", 0)
        state.setdefault("partial_steps", 0)
        if budget >= t:
            state["order"] = None  # nothing to recycle; the next step under budget is a full step
            return None
        stale = state.get("order") is not None and not held_unchanged(state["positions"], obs.positions)
        if stale and self.inner is None:  # cannot happen without eviction, but never recycle shifted indices
            state["order"] = None
        if self.full_step_due(state, obs, budget):
            order = top_slots(group_attention(obs, t - 1), budget - 1)  # (B, h, K), most attended first
            state.update(
                order=order,
                order_positions=obs.positions.gather(-1, order),
                positions=obs.positions,
                tokens=t,
                newest=obs.positions[..., -1:].clone(),
                query=obs.queries,
                since=0,
            )
            state["full_steps"] += 1
            return None
        state["since"] += 1
        state["partial_steps"] += 1
        if held_unchanged(state["positions"], obs.positions):
            recent = torch.arange(state["tokens"] - 1, t, device=obs.keys.device).expand(b, h, -1)
            return torch.cat([state["order"][..., : budget - recent.shape[-1]], recent], dim=-1)
        forced = obs.positions >= state["newest"]  # composed with eviction: find the recycled tokens by position
        return remap_by_position(state["order_positions"], obs.positions, obs.valid, forced, budget)
