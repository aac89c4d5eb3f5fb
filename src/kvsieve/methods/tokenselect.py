"""``tokenselect``: per-head query-key criticality, soft voting across heads, and the Selection Cache.

Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic Token-Level
KV Cache Selection" (2024). At every decoding step the query's dot products with the held keys measure each token's
criticality per head; each head's criticalities are normalised with a softmax and summed over the heads (the *soft
vote*), and the ``k`` tokens with the most votes are read, besides the first ``n_init`` tokens and the ``n_local``
most recent ones, which are always read. The *Selection Cache* skips the selection while consecutive queries stay
similar: when the cosine similarity of this step's query (all heads of the layer, flattened) with the query of the
last selection is at least ``similarity``, the last selection is reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BudgetError
from . import register
from .base import Observation, hp, pool_in_stream_order, top_slots
from .families import SelectiveMethod, edge_mask, held_unchanged, query_similarity, remap_by_position


@register
@dataclass
class TokenSelect(SelectiveMethod):
    """Top-k tokens by soft vote of per-head softmax(q·k), plus sinks and a local window; Selection Cache.

    n_init: first tokens always read (attention sinks). n_local: most recent tokens always read (includes the new
    token). similarity: the Selection Cache threshold on the cosine similarity of consecutive queries (the authors'
    code: 0.9); above 1 disables the cache. kernel: odd max-pooling width over the votes (1: none, as the default
    of the authors' code). vote: ``"layer"`` (paper) sums the votes of every query head of the layer, so all KV
    heads read the same tokens; ``"kv_head"`` sums only over each KV head's query-head group.

    Simplifications: criticality is the raw dot product q·k as in the authors' code (no 1/sqrt(d)); the selection
    is computed with dense tensor ops (the authors use a paged Triton kernel), which still reads every candidate key
    (but no values) on a step that does not hit the Selection Cache; with batches, a selection is reused only when
    every sequence's query passes the similarity test. Composed with eviction, a cached selection is mapped by
    token position onto the tokens still held, evicted ones replaced by the most recent others.
    """

    n_init: int = hp(4, ge=0)
    n_local: int = hp(32, ge=1)
    similarity: float = 0.9
    kernel: int = hp(1, ge=1, odd=True)
    vote: str = hp("layer", choices=("layer", "kv_head"))

    name = "tokenselect"
    paper = "Wu et al. 2024, arXiv:2411.02886"
    needs = "queries and keys at decode time (Selection Cache: last query per layer)"
    simplifications = (
        "criticality is the raw dot product q·k as in the authors' code (no 1/sqrt(d)); dense tensor ops instead of a "
        "paged Triton kernel (a step that misses the Selection Cache reads every candidate key); with batches a "
        "selection is reused only when every sequence's query passes the similarity test; composed with eviction, a "
        "cached selection is mapped by token position onto the tokens still held"
    )

    def validate(self) -> None:
        super().validate()
        if isinstance(self.read_budget, int) and self.read_budget < self.n_init + self.n_local + 1:
            raise BudgetError(self._too_small(self.read_budget))

    def _too_small(self, budget: int) -> str:
        return (
            f"tokenselect reads {self.n_init} initial + {self.n_local} local tokens besides the selected ones: a read "
            f"budget of {budget} leaves nothing to select; use at least {self.n_init + self.n_local + 1} tokens or "
            "lower n_init/n_local"
        )

    def reads(self, obs: Observation) -> torch.Tensor | None:
        t = obs.keys.shape[2]
        budget = obs.read_budget
        if budget is None or budget >= t:
            return None
        k_sel = budget - self.n_init - self.n_local
        if k_sel < 1:
            raise BudgetError(self._too_small(budget))
        forced = edge_mask(obs.positions, obs.valid, self.n_init, self.n_local)  # sinks and local window, by position
        n_forced = int(forced.sum(dim=-1).max())
        fixed = forced.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :n_forced]
        state = self._state(obs, "selection_cache")
        state.setdefault("hits", 0)
        state.setdefault("misses", 0)
        query = obs.queries
        cached = state.get("order")
        if (
            cached is not None
            and cached.shape[-1] >= k_sel
            and state["query"].shape == query.shape
            and bool((query_similarity(query, state["query"]) >= self.similarity).all())
        ):
            state["hits"] += 1
            if held_unchanged(state["positions"], obs.positions):  # only appends since: the slots still hold them
                return torch.cat([fixed, cached[..., :k_sel]], dim=-1)
            # evictions moved tokens (composed methods): find the cached tokens by position
            return remap_by_position(state["cached_positions"][..., :k_sel], obs.positions, obs.valid, forced, budget)
        order = self._select(obs, forced, k_sel)
        state.update(
            query=query, order=order, positions=obs.positions, cached_positions=obs.positions.gather(-1, order)
        )
        state["misses"] += 1
        return torch.cat([fixed, order], dim=-1)

    def _select(self, obs: Observation, forced: torch.Tensor, k: int) -> torch.Tensor:
        """Slots ``(B, h, k)`` of the best candidates (neither forced nor padding) by soft vote, best first."""
        b, h, t, d = obs.keys.shape
        g = obs.queries.shape[1] // h
        q = obs.queries[:, :, -1].view(b, h, g, d)
        crit = q @ obs.keys.transpose(-1, -2)  # (B, h, g, T): per query head, in the cache's dtype (keys read once)
        excluded = forced if obs.valid is None else forced | ~obs.valid
        # each head's softmax runs over the candidates only (neither sinks, local window nor padding)
        votes = crit.to(torch.float32).masked_fill(excluded[:, :, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        votes = votes.sum(dim=2) if self.vote == "kv_head" else votes.sum(dim=(1, 2))[:, None].expand(b, h, t)
        if self.kernel > 1:
            votes = pool_in_stream_order(votes, obs.positions, self.kernel, "max")
        votes = votes.masked_fill(excluded, -1.0)
        return top_slots(votes, k)
