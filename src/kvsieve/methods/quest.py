"""``quest``: query-aware page selection from per-page elementwise key bounds.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML 2024). The held keys are
split into pages of ``page_size`` tokens (16 in the paper); each page keeps the elementwise minimum and maximum of
its keys. For a query ``q`` the score of a page is ``sum_d max(q_d * max_d, q_d * min_d)``, an upper bound on
``q . k`` for every key ``k`` in the page; the pages with the highest bounds are read. The first ``dense_layers``
layers (2 in the paper) attend to everything, because their attention is too diffuse to select from.

Pages are indexed by held token: page ``p`` is tokens ``[p * page_size, (p + 1) * page_size)``, and the partially
filled last page counts as a page. The min/max of the pages are kept per layer and updated incrementally (only the
last, growing page is recomputed at each step); they are rebuilt from the keys only when the held tokens changed
(composed with eviction). They take ``2 / page_size`` of the key bytes (1/8 at 16; up to twice that in spare
capacity) in the layer's method state, which ``cache.kv_bytes()`` does not count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BudgetError, KVSieveError
from . import register
from .base import Observation
from .families import SelectiveMethod, held_unchanged


def page_bounds(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise min and max of each page of ``keys`` ``(B, h, T, D)``: two ``(B, h, ceil(T / page_size), D)``."""
    b, h, t, d = keys.shape
    if t <= page_size:  # one page (a decoding step's update): one reduction, no reshaping
        mins, maxs = torch.aminmax(keys, dim=2, keepdim=True)
        return mins, maxs
    full = t // page_size
    mins, maxs = torch.aminmax(keys[:, :, : full * page_size].reshape(b, h, full, page_size, d), dim=3)
    if t > full * page_size:
        tail_min, tail_max = torch.aminmax(keys[:, :, full * page_size :], dim=2, keepdim=True)
        mins, maxs = torch.cat([mins, tail_min], dim=2), torch.cat([maxs, tail_max], dim=2)
    return mins, maxs


def page_scores(queries: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor) -> torch.Tensor:
    """Quest's bound ``sum_d max(q_d min_d, q_d max_d)`` per query head and page: ``(B, h, g, P)``.

    queries ``(B, h*g, D)`` (one decoding query per head); mins/maxs ``(B, h, P, D)``. Since ``min_d <= max_d``, the
    larger product takes ``max_d`` where ``q_d > 0`` and ``min_d`` where ``q_d < 0``, so the bound is two matrix
    products, ``relu(q) . max + min(q, 0) . min``; it is at least every ``q . k`` of the page up to rounding.
    """
    return packed_page_scores(queries, torch.cat([maxs, mins], dim=-1))


def packed_page_scores(queries: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """:func:`page_scores` from ``bounds`` ``(B, h, P, 2D)``: each page's maxima then minima. One matrix product,
    ``[relu(q), min(q, 0)] . [max, min]``, where two would cost twice the calls (a decoding step makes one per
    layer, and on a small model their fixed cost is most of the time)."""
    b, h, _, d2 = bounds.shape
    q = queries.view(b, h, -1, d2 // 2)  # (B, h, g, D)
    q = q if q.dtype == bounds.dtype else q.to(bounds.dtype)
    return torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1) @ bounds.transpose(-1, -2)


@register
@dataclass
class Quest(SelectiveMethod):
    """Reads the pages whose key bounds promise the highest attention; first layers dense.

    page_size: tokens per page (paper: 16). dense_layers: layers ``0 .. dense_layers - 1`` attend to everything
    (paper: 2). The read budget counts tokens: ``budget // page_size`` pages are read.

    Simplifications: GQA (the paper's models are multi-head): a KV head's page score is the maximum of its query
    heads' bounds, which stays an upper bound on every one of them; the last (partial) page, which holds the newest
    token, is always read and counts as one of the pages, so every KV head reads the same number of tokens; the
    bound and the gather are dense tensor ops, not the paper's CUDA kernels; pages of padding tokens score -inf.
    """

    page_size: int = 16
    dense_layers: int = 2

    name = "quest"
    paper = "Tang et al. 2024, arXiv:2406.10774"
    needs = "keys (per-page min/max) and the decoding query"
    simplifications = (
        "GQA: a KV head's page score is the maximum of its query heads' bounds; the last (partial) page is always read;"
        " dense tensor ops, not the paper's CUDA kernels; pages are groups of 16 slots (stream order unless decoding "
        "evicted), so left-padded batches are refused"
    )
    batch = "unpadded"  # pages are groups of slots, which left padding would shift

    def validate(self) -> None:
        super().validate()
        if self.page_size < 1:
            raise KVSieveError(f"quest: page_size must be at least 1, got {self.page_size}")
        if self.dense_layers < 0:
            raise KVSieveError(f"quest: dense_layers must be >= 0, got {self.dense_layers}")
        if isinstance(self.read_budget, int) and self.read_budget < self.page_size:
            raise BudgetError(self._too_small(self.read_budget))

    def _too_small(self, budget: int) -> str:
        return (
            f"quest reads whole pages of {self.page_size} tokens: a read budget of {budget} tokens is less than one "
            f"page; use at least {self.page_size} tokens or a smaller page_size"
        )

    def bounds(self, obs: Observation) -> torch.Tensor:
        """Max then min keys of every page of the held tokens, ``(B, h, P, 2D)``, updated incrementally.

        The bounds live in a per-layer buffer with spare capacity: a step rewrites only the pages from the one that
        was partial before (one page, at a time), without copying the others.
        """
        state = self._state(obs, "pages")
        keys, t = obs.keys, obs.keys.shape[2]
        n_pages = -(-t // self.page_size)
        first = 0
        if held_unchanged(state.get("positions"), obs.positions) and state["buffer"].dtype == keys.dtype:
            first = state["tokens"] // self.page_size  # the first page that may have changed
        else:
            state["rebuilds"] = state.get("rebuilds", 0) + 1
            state["buffer"] = keys.new_empty(0)
        buffer = state["buffer"]  # (B, h, capacity, 2D): maxima, then minima
        d = keys.shape[3]
        if buffer.dim() != 4 or buffer.shape[2] < n_pages:  # grow by doubling
            grown = keys.new_empty((*keys.shape[:2], max(2 * n_pages, 64), 2 * d))
            if first:
                grown[:, :, :first] = buffer[:, :, :first]
            state["buffer"] = buffer = grown
        mins, maxs = page_bounds(keys[:, :, first * self.page_size :], self.page_size)
        buffer[:, :, first:n_pages, :d] = maxs
        buffer[:, :, first:n_pages, d:] = mins
        state.update(tokens=t, positions=obs.positions)
        return buffer[:, :, :n_pages]

    def reads(self, obs: Observation) -> torch.Tensor | None:
        if obs.layer_idx < self.dense_layers:
            return None
        b, h, t, _ = obs.keys.shape
        budget = obs.read_budget
        if budget >= t:
            return None
        if budget < self.page_size:
            raise BudgetError(self._too_small(budget))
        bounds = self.bounds(obs)
        n_pages = bounds.shape[2]
        bound = packed_page_scores(obs.queries[:, :, -1], bounds).amax(dim=2)  # (B, h, P)
        if obs.valid is not None:
            pad = n_pages * self.page_size - t
            real = torch.nn.functional.pad(obs.valid, (0, pad)).view(b, h, n_pages, self.page_size).any(dim=-1)
            bound = bound.masked_fill(~real, float("-inf"))
        last = n_pages - 1  # the partial page with the newest token: always read
        n_read = min(budget // self.page_size, n_pages)
        top = bound[..., :last].topk(n_read - 1, dim=-1).indices  # (B, h, n_read - 1)
        offsets = torch.arange(self.page_size, device=top.device)
        tokens = (top[..., None] * self.page_size + offsets).flatten(2)
        tail = torch.arange(last * self.page_size, t, device=top.device).expand(b, h, -1)
        return torch.cat([tokens, tail], dim=-1)
