"""``tokenselect``: per-head query-key criticality, soft voting across heads, and the Selection Cache.

Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic Token-Level
KV Cache Selection" (2024). At every decoding step the query's dot products with the held keys measure each token's
criticality per head; each head's criticalities are normalised with a softmax and summed over the heads (the *soft
vote*), and the ``k`` tokens with the most votes are read, besides the first ``n_init`` tokens and the ``n_local``
most recent ones, which are always read. The *Selection Cache* skips the selection while consecutive queries stay
similar: when the cosine similarity of this step's query (all heads of the layer, flattened) with the query of the
last selection is at least ``similarity``, the last selection is reused.

This module also holds :class:`SelectiveMethod`, the base of every selective-read method (``quest``,
``tidaldecode``, ``recycled_attention``): the read budget, composition with an evicting method (``inner``), and the
helpers that map a selection onto held tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..attention import AttentionRequest
from ..cache import Segment
from ..errors import BudgetError, KVSieveError
from . import register
from .base import Method, Observation

_EVICTION_BUDGET = "_kvsieve_eviction_budget"


@dataclass
class SelectiveMethod(Method):
    """Base of the methods that keep the whole cache but read only some tokens per decoding step.

    read_budget: tokens read per step (an int >= 1) or a fraction of the held tokens (a float in (0, 1)); None
    takes the sieve's budget (``Sieve(..., budget=N)`` or ``compression=r``, which reads ``int(T * (1 - r))``).
    inner: an evicting method to compose with (``"quest(read_budget=256):snapkv"``): the sieve's budget is then the
    inner method's eviction budget, and ``read_budget`` (required) the number of held tokens read per step.

    A method returns None from ``reads`` (attend to every held token) whenever the read budget covers them, so with a
    budget at least the context length every method is exactly full attention.
    """

    inner: Method | None = None
    read_budget: int | float | None = None

    family = "selection"
    needs = "queries and keys at decode time"
    evicts = False  # made True per instance when an evicting inner method is composed (see __post_init__)
    selects = True
    # logit_bias only records the eviction budget for the inner method (see below): it changes no attention
    delegates: ClassVar[tuple[str, ...]] = ("select", "logit_bias", "merge", "pack")

    def __post_init__(self) -> None:
        check_read_budget(self.read_budget, self.name)
        if self.inner is not None:
            if not isinstance(self.inner, Method):
                raise KVSieveError(f"{self.name}: inner must be a kvsieve method, got {type(self.inner).__name__}")
            if self.inner.selects or not self.inner.evicts:
                raise KVSieveError(
                    f"{self.name} composes with an evicting method (e.g. {self.name}:snapkv); "
                    f"{self.inner.name} does not evict. Use one selective-read method at a time."
                )
            if self.read_budget is None:
                raise KVSieveError(
                    f"{self.name}:{self.inner.name} evicts to the sieve's budget and reads within it: give the "
                    f"read budget, e.g. {self.name}(read_budget=256):{self.inner.spec()} (tokens) or read_budget=0.25"
                )
            self.evicts = True  # the sieve's budget is the inner method's eviction budget
            self.rerotate = self.inner.rerotate

    # --- eviction hooks: all delegated to the inner method when composed --------------------------------------------
    def check_budget(self, tokens: int) -> None:
        if self.inner is not None:
            self.inner.check_budget(tokens)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        return self.inner.layer_budget(budget, layer_idx, n_layers) if self.inner is not None else budget

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return self.inner.attention_request(evicting) if self.inner is not None else None

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        # The session overwrites ``obs.budget`` with the read budget before ``reads``; keep the eviction budget the
        # inner method's ``score`` expects (H2O's recent window, StreamingLLM's sink check). This hook runs first.
        setattr(obs, _EVICTION_BUDGET, obs.budget)
        return self.inner.logit_bias(obs) if self.inner is not None else None

    def observe(self, obs: Observation) -> None:
        if self.inner is not None:
            self.inner.observe(_with_eviction_budget(obs))

    def score(self, obs: Observation) -> torch.Tensor:
        if self.inner is None:
            raise KVSieveError(f"{self.name} keeps every token and scores none; compose it with an evicting method")
        return self.inner.score(_with_eviction_budget(obs))

    def select(self, scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
        return self.inner.select(scores, budget) if self.inner is not None else super().select(scores, budget)

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.merge(_with_eviction_budget(obs), keep) if self.inner is not None else None

    def pack(self, segment: Segment) -> Segment:
        return self.inner.pack(segment) if self.inner is not None else segment

    # --- helpers for subclasses ---------------------------------------------------------------------------------------
    def _state(self, obs: Observation, key: str) -> dict[str, Any]:
        """This method's per-layer state for the segment of ``obs`` (a layer may hold one segment per head)."""
        return obs.layer_state.setdefault((self.name, key, obs.head_start, obs.keys.shape[1]), {})


def _with_eviction_budget(obs: Observation) -> Observation:
    saved = getattr(obs, _EVICTION_BUDGET, None)
    if saved is not None:
        obs.budget = saved
    return obs


def check_read_budget(read_budget: int | float | None, name: str) -> None:
    """BudgetError unless ``read_budget`` is None, an int >= 1 or a fraction in (0, 1)."""
    if read_budget is None:
        return
    if isinstance(read_budget, bool) or not isinstance(read_budget, (int, float)):
        raise BudgetError(f"{name}: read_budget must be a token count or a fraction, got {read_budget!r}")
    if isinstance(read_budget, float) and not read_budget.is_integer() and not (0.0 < read_budget < 1.0):
        raise BudgetError(f"{name}: a fractional read_budget must be in (0, 1), got {read_budget}")
    if read_budget <= 0:
        raise BudgetError(f"{name}: read_budget must be positive (tokens >= 1 or a fraction in (0, 1))")


def held_unchanged(previous: torch.Tensor | None, positions: torch.Tensor) -> bool:
    """True if the tokens held when ``previous`` ``(B, h, T0)`` was recorded are still the first ``T0`` held now.

    Without eviction the cache only grows, so this holds; after an eviction (composed methods) indices shifted.
    """
    if previous is None or previous.shape[:2] != positions.shape[:2] or previous.shape[2] > positions.shape[2]:
        return False
    return torch.equal(previous, positions[..., : previous.shape[2]])


def query_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per batch row of two queries ``(B, Hq, 1, D)``, all heads flattened: ``(B,)``."""
    return F.cosine_similarity(a.flatten(1).to(torch.float32), b.flatten(1).to(torch.float32), dim=-1)


def remap_by_position(
    wanted: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    k: int,
) -> torch.Tensor:
    """Held-token indices ``(B, h, k)`` for a selection recorded as positions, after the cache changed (eviction).

    ``wanted``: ``(B, h, k0)`` stream positions chosen earlier; ``positions``: ``(B, h, T)`` held now; ``forced``:
    ``(B|1, h|1, T)`` tokens that must be read (sinks, recent window, the newest). Ranking: forced tokens, then the
    wanted ones still held, then the most recent of the rest (to fill slots of evicted tokens); padding never.
    """
    b, h, t = positions.shape
    real = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
    key = positions * 2 + real.long()  # unique for real tokens even where padding repeats a position
    sorted_key, order = key.sort(dim=-1)
    want = wanted * 2 + 1
    loc = torch.searchsorted(sorted_key.contiguous(), want.contiguous()).clamp(max=t - 1)
    hit = sorted_key.gather(-1, loc) == want
    score = torch.arange(t, device=positions.device, dtype=torch.float32).div(t).expand(b, h, t).clone()
    score.scatter_reduce_(-1, order.gather(-1, loc), hit.to(torch.float32) * 2.0, reduce="sum")
    score = score.clamp(max=3.0)
    if forced is not None:
        score = score.masked_fill(forced.expand(b, h, t), 4.0)
    score = score.masked_fill(~real, float("-inf"))
    return score.topk(min(k, t), dim=-1).indices


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

    n_init: int = 4
    n_local: int = 32
    similarity: float = 0.9
    kernel: int = 1
    vote: str = "layer"

    name = "tokenselect"
    paper = "Wu et al. 2024, arXiv:2411.02886"
    needs = "queries and keys at decode time (Selection Cache: last query per layer)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_init < 0 or self.n_local < 1:
            raise KVSieveError("tokenselect needs n_init >= 0 and n_local >= 1 (the local window holds the new token)")
        if self.kernel < 1 or self.kernel % 2 != 1:
            raise KVSieveError(f"tokenselect: kernel must be an odd width >= 1, got {self.kernel}")
        if self.vote not in ("layer", "kv_head"):
            raise KVSieveError(f"tokenselect: vote must be 'layer' or 'kv_head', got {self.vote!r}")
        if isinstance(self.read_budget, int) and self.read_budget < self.n_init + self.n_local + 1:
            raise BudgetError(self._too_small(self.read_budget))

    def _too_small(self, budget: int) -> str:
        return (
            f"tokenselect reads {self.n_init} initial + {self.n_local} local tokens besides the selected ones: a read "
            f"budget of {budget} leaves nothing to select; use at least {self.n_init + self.n_local + 1} tokens or "
            "lower n_init/n_local"
        )

    def reads(self, obs: Observation) -> torch.Tensor | None:
        b, h, t, _ = obs.keys.shape
        budget = obs.budget
        if budget >= t:
            return None
        k_sel = budget - self.n_init - self.n_local
        if k_sel < 1:
            raise BudgetError(self._too_small(budget))
        lo, hi = self.n_init, t - self.n_local  # candidates: neither sinks nor local window
        state = self._state(obs, "selection_cache")
        state.setdefault("hits", 0)
        state.setdefault("misses", 0)
        query = obs.queries
        order = None
        cached = state.get("order")
        if (
            cached is not None
            and cached.shape[-1] >= k_sel
            and state["query"].shape == query.shape
            and bool((query_similarity(query, state["query"]) >= self.similarity).all())
        ):
            if held_unchanged(state["positions"], obs.positions):
                order = cached[..., :k_sel]
            elif self.inner is not None:  # evictions shifted indices: find the cached tokens by position
                forced = torch.zeros(1, 1, t, dtype=torch.bool, device=obs.keys.device)
                forced[..., : self.n_init] = True
                forced[..., hi:] = True
                state["hits"] += 1
                picked = remap_by_position(
                    state["cached_positions"][..., :k_sel], obs.positions, obs.valid, forced, budget
                )
                return picked
        if order is None:
            order = self._select(obs, lo, hi, max(k_sel, 1))
            state.update(
                query=query, order=order, positions=obs.positions, cached_positions=obs.positions.gather(-1, order)
            )
            state["misses"] += 1
        else:
            state["hits"] += 1
        fixed = torch.cat([torch.arange(0, lo, device=order.device), torch.arange(hi, t, device=order.device)])
        return torch.cat([fixed.expand(b, h, -1), order], dim=-1)

    def _select(self, obs: Observation, lo: int, hi: int, k: int) -> torch.Tensor:
        """Candidate indices ``(B, h, k)`` in [lo, hi) by soft vote, best first."""
        b, h, _, d = obs.keys.shape
        hq = obs.queries.shape[1]
        g = hq // h
        keys = obs.keys[:, :, lo:hi]  # (B, h, C, D)
        q = obs.queries[:, :, -1].view(b, h, g, d)
        crit = q @ keys.transpose(-1, -2)  # (B, h, g, C): per query head, in the cache's dtype (keys read once)
        votes = crit.to(torch.float32).softmax(dim=-1)
        votes = votes.sum(dim=2) if self.vote == "kv_head" else votes.sum(dim=(1, 2), keepdim=False)[:, None]
        if self.kernel > 1:
            c = votes.shape[-1]
            votes = F.max_pool1d(votes.reshape(-1, 1, c), self.kernel, stride=1, padding=self.kernel // 2).view(
                votes.shape
            )
        if obs.valid is not None:
            valid = obs.valid[:, :, lo:hi]
            votes = votes.masked_fill(~(valid if votes.shape[1] == h else valid.any(dim=1, keepdim=True)), -1.0)
        top = votes.topk(min(k, votes.shape[-1]), dim=-1).indices + lo
        return top.expand(b, h, -1) if top.shape[1] != h else top
