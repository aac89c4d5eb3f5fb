"""``chunkkv`` and ``entropy_chunkkv``: keep whole chunks of consecutive tokens, ranked by the wrapped scorer.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference" (2025). A
token rarely carries meaning alone, so the held tokens are cut into chunks of ``chunk_length`` consecutive tokens (in
stream order; the newest chunk may be shorter), a chunk's score is the mean over its tokens of the wrapped method's
scores summed over the layer's KV heads, and the best chunks are kept whole, the same tokens in every head (kvpress's
``ChunkKVPress``).

``entropy_chunkkv`` is kvpress's ``EntropyGatedChunkKVPress``: chunks are visited from the best score down; a chunk of
above-median score whose token scores have below-median normalised entropy (one spike rather than a coherent span)
keeps only its ``spiky_keep`` best tokens, and the freed budget goes to further chunks; what is left is topped up with
the best remaining tokens.

Both are written as scores: a token's score is its rank in the chunk order (best chunk first, the best tokens of a
chunk first), so the core's top-k keeps exactly the chosen tokens and the layer's budget is honoured exactly.

Simplifications: the budget is exact, so one chunk may be kept in part (its best tokens; kvpress keeps
``int(chunks x (1 - ratio))`` whole chunks instead); infinite scores of the wrapped method (forced tokens such as
SnapKV's window) count as the largest finite score plus one, as kvpress's SnapKV pads its window; the paper's
layer-wise index reuse is not implemented (neither is it in kvpress).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import Method, Observation, Wrapper, hp, overrides

EPSILON = 1e-8


def finite_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with +inf as the largest finite value + 1 and -inf as the smallest - 1 (kvpress pads so)."""
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return scores
    vals = scores[finite]
    top = float(vals.max()) + 1.0 if vals.numel() else 1.0
    low = float(vals.min()) - 1.0 if vals.numel() else -1.0
    out = torch.where(scores == float("inf"), torch.full_like(scores, top), scores)
    out = torch.where(out == float("-inf"), torch.full_like(out, low), out)
    return out.nan_to_num(nan=low)


def stream_slots(positions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Slots ``(T,)`` of one row's real tokens in stream order (padding left out)."""
    order = positions.argsort(stable=True)
    if valid is None:
        return order
    return order[valid[order]]


def ranks_as_scores(order: torch.Tensor, t: int) -> torch.Tensor:
    """Scores ``(T,)`` that make ``order`` (slots, best first) the top-k order; slots not listed get -inf."""
    out = torch.full((t,), float("-inf"), dtype=torch.float32, device=order.device)
    out[order] = -torch.arange(order.numel(), dtype=torch.float32, device=order.device)
    return out


class _Chunked(Wrapper):
    """Shared by the two chunk methods: per batch row, the layer's token scores summed over KV heads."""

    own_kind = "evict"
    default_inner = "snapkv"
    needs = "the wrapped method's scores, positions"
    family = "budget wrapper"

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        if overrides(inner, "select"):
            raise KVSieveError(
                f"{self.name} keeps the same chunks in every head; {inner.spec()} chooses per head. Wrap a scorer, "
                f"e.g. {self.name}:snapkv"
            )

    def score(self, obs: Observation) -> torch.Tensor:
        scores = finite_scores(self._in.score(obs).to(torch.float32))
        b, _, t = scores.shape
        out = torch.empty_like(scores)
        for row in range(b):
            for head in self._head_groups(obs.positions[row]):
                # heads that hold the same tokens share one ranking (ChunkKV sums their scores)
                slots = stream_slots(
                    obs.positions[row, head[0]], None if obs.valid is None else obs.valid[row, head[0]]
                )
                tokens = scores[row, head].sum(dim=0)[slots]
                order = slots[self.ranking(tokens, obs.budget)]
                out[row, head] = ranks_as_scores(order, t)
        return out

    @staticmethod
    def _head_groups(positions: torch.Tensor) -> list[list[int]]:
        """KV heads grouped by the tokens they hold (all heads together after a prefill)."""
        groups: list[list[int]] = []
        for h in range(positions.shape[0]):
            for g in groups:
                if torch.equal(positions[g[0]], positions[h]):
                    g.append(h)
                    break
            else:
                groups.append([h])
        return groups

    def ranking(self, tokens: torch.Tensor, budget: int) -> torch.Tensor:
        """Indices into ``tokens`` (stream order), best first: the order in which tokens are kept."""
        raise NotImplementedError


def chunk_ids(n: int, length: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) // length


@register
@dataclass
class ChunkKV(_Chunked):
    """Wraps ``inner`` (default SnapKV): whole chunks of ``chunk_length`` tokens kept, by mean summed score.

    chunk_length: tokens per chunk (the paper and kvpress: 20).
    """

    chunk_length: int = hp(20, ge=1)

    name = "chunkkv"
    paper = "Liu et al. 2025, arXiv:2502.00299"
    simplifications = (
        "exact budget: the last chunk kept may be partial (its best tokens), kvpress keeps int(chunks x (1-r)) whole "
        "chunks; the wrapped method's infinite scores count as max + 1; chunks of the held tokens in stream order; no "
        "layer-wise index reuse (as kvpress)"
    )

    def ranking(self, tokens: torch.Tensor, budget: int) -> torch.Tensor:
        n = tokens.numel()
        ids = chunk_ids(n, self.chunk_length, tokens.device)
        n_chunks = int(ids[-1]) + 1 if n else 0
        sums = torch.zeros(n_chunks, dtype=torch.float32, device=tokens.device).scatter_add_(0, ids, tokens)
        counts = torch.bincount(ids, minlength=n_chunks).to(torch.float32)
        chunk_rank = torch.empty(n_chunks, dtype=torch.long, device=tokens.device)
        chunk_rank[(sums / counts).argsort(descending=True, stable=True)] = torch.arange(n_chunks, device=tokens.device)
        # best chunk first; inside a chunk, best token first
        within = tokens.argsort(descending=True, stable=True)
        key = chunk_rank[ids[within]]
        return within[key.argsort(stable=True)]


@register
@dataclass
class EntropyChunkKV(_Chunked):
    """Wraps ``inner`` (default SnapKV): ChunkKV whose spiky important chunks keep only their best tokens.

    chunk_length: tokens per chunk (kvpress: 10). spiky_keep: tokens kept from an above-median-score, below-median-
    entropy chunk (kvpress's low_entropy_chunk_length: 4).
    """

    chunk_length: int = hp(10, ge=2)
    spiky_keep: int = hp(4, ge=1)

    name = "entropy_chunkkv"
    paper = "kvpress EntropyGatedChunkKVPress, after Liu et al. 2025, arXiv:2502.00299"
    simplifications = (
        "kvpress's greedy chunk pass and top-up exactly; the wrapped method's infinite scores count as max + 1; "
        "chunks of the held tokens in stream order"
    )

    def validate(self) -> None:
        if self.spiky_keep >= self.chunk_length:
            raise KVSieveError(
                f"entropy_chunkkv: spiky_keep ({self.spiky_keep}) must be below chunk_length ({self.chunk_length})"
            )

    def ranking(self, tokens: torch.Tensor, budget: int) -> torch.Tensor:
        n = tokens.numel()
        size = self.chunk_length
        bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        means, entropies = [], []
        for start, end in bounds:
            part = tokens[start:end]
            means.append(part.mean())
            entropies.append(normalised_entropy(part))
        means_t, ent_t = torch.stack(means), torch.stack(entropies)
        high = means_t >= means_t.median()
        spiky = ent_t < ent_t.median()
        keep_order: list[torch.Tensor] = []
        taken = torch.zeros(n, dtype=torch.bool, device=tokens.device)
        left = min(budget, n)
        for c in means_t.argsort(descending=True, stable=True).tolist():
            if left <= 0:
                break
            start, end = bounds[c]
            k = min(end - start, left)
            if bool(high[c]) and bool(spiky[c]):
                k = min(k, self.spiky_keep)
            best = tokens[start:end].argsort(descending=True, stable=True)[:k] + start
            keep_order.append(best)
            taken[best] = True
            left -= k
        rest = (~taken).nonzero().flatten()
        rest = rest[tokens[rest].argsort(descending=True, stable=True)]  # the top-up, then everything else
        return torch.cat([*keep_order, rest])


def normalised_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of a chunk's scores as a distribution (negative chunks rebased at 0), divided by log(length)."""
    n = scores.numel()
    if n == 1:
        return torch.zeros((), device=scores.device)
    s = scores - scores.min().clamp(max=0.0)
    p = s / (s.sum() + EPSILON)
    return (-(p * (p + EPSILON).log()).sum() / math.log(n)).clamp(0.0, 1.0)
