"""``method:<spec>``: a registered kvsieve cache method's eviction scores read as an attribution.

The prompt runs once through the model with :class:`~kvsieve.snapshot.PrefillSnapshot`, which runs the method's own
``observe`` in that pass and records the attention statistics it requests; then, per full-attention layer, the
method's own ``score`` is called on the observation the core would hand it at the end of its prefill (the replay
:meth:`PrefillSnapshot.compress` performs, stopped before ``select``): the scores the method would evict by, under
``Budget(compression=...)``. No scorer is re-implemented here.

Scores of different layers and heads live on different scales (and forced tokens score +inf), so each (layer, KV
head) row is turned into rank percentiles in [0, 1] (ties share their mean rank) and the rows are averaged: a token's
attribution is how highly the method ranks it, on average over the cache. The scores are the method's view of the
prompt, the same for every target step; target tokens before a step (not in the prompt) score 0.
"""

from __future__ import annotations

import copy

import torch

from ..errors import KVSieveError
from ..methods import build
from ..methods.base import LayerContext, Method
from ..pipeline import masked_scores, observation
from ..sieve import Budget
from ..snapshot import PrefillSnapshot, shareable
from .problem import Problem

DEFAULT_COMPRESSION = 0.5


def scorer_method(spec: str) -> Method:
    """The cache method of ``spec``; KVSieveError unless it evicts by scores the snapshot can replay."""
    method = build(spec)
    if not isinstance(method, Method):
        raise KVSieveError(
            f"method:{spec} is a {method.kind} method, not a cache method; name an evicting cache method"
        )
    if not method.evicts:
        raise KVSieveError(
            f"method:{spec} keeps every token ({method.kind}), so it has no eviction scores to read; name an evicting "
            "method such as method:snapkv or method:h2o"
        )
    if not shareable(method):
        raise KVSieveError(
            f"method:{spec} biases attention during its prefill, so its scores cannot be read from a plain prefill; "
            "name the evicting method it wraps"
        )
    return method


def rank_percentiles(scores: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores`` ``(..., T)``: each entry's rank in [0, 1] (0 lowest), ties sharing their mean rank."""
    flat = scores.reshape(-1, scores.shape[-1]).double()
    t = flat.shape[-1]
    out = torch.empty_like(flat)
    for i, row in enumerate(flat):
        values, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        start = counts.cumsum(0) - counts  # first rank of each distinct value
        mean_rank = start.double() + (counts.double() - 1) / 2
        out[i] = mean_rank[inverse] / max(t - 1, 1)
        del values
    return out.reshape(scores.shape)


SNAPSHOT = "snapshot"  # Problem._cache key: one prefill shared by every method:<spec> of a problem


@torch.no_grad()
def share_prefill(problem: Problem, specs: list[str]) -> None:
    """Run the prompt once for every cache method of ``specs`` (``method:`` dropped): their scores then replay it,
    exactly as the bench's shared prefill does (bit for bit, tests/test_explain.py), instead of one prefill each."""
    methods = [scorer_method(spec) for spec in specs]
    if len(methods) > 1:
        problem._cache[SNAPSHOT] = PrefillSnapshot(problem.model, problem.ids[:, : problem.n_prompt], methods)


@torch.no_grad()
def layer_scores(problem: Problem, spec: str, compression: float = DEFAULT_COMPRESSION) -> dict[int, torch.Tensor]:
    """The eviction scores ``(h, n_prompt)`` (stream order) cache method ``spec`` gives the prompt's tokens, per
    full-attention layer, under ``Budget(compression=compression)``."""
    method = scorer_method(spec)
    budget = Budget(compression=compression)
    prompt = problem.ids[:, : problem.n_prompt]
    key = method.spec()
    snap = problem._cache.get(SNAPSHOT)
    if snap is None or key not in snap.recorded:
        snap = PrefillSnapshot(problem.model, prompt, [method])
    n_layers = problem.model.config.get_text_config().num_hidden_layers
    shared = copy.deepcopy(snap.method_shared.get(key, {}))
    out = {}
    for idx, src in enumerate(snap.full_cache.layers):
        record = snap.records.get(idx)
        if record is None:  # sliding-window layers are not compressed, so not scored
            continue
        seg = src.segments[0]
        state, layer_state = copy.deepcopy(record.observed[key]) if key in record.observed else ({}, {})
        kept = seg.clone()
        kept.state = state
        ctx = LayerContext(idx, n_layers, src.seen, src.seen, layer_state, shared)
        targets = [method.layer_budget(budget.keep_target(s, src.seen), ctx) for s in src.real_seen()]
        obs = observation(ctx, kept, kept.keys, kept.values, record.queries, record.scaling, max(targets), None)
        request = method.attention_request(True)
        obs.attention = record.stats.get(request) if request is not None else None
        scores = masked_scores(method, obs)[0]  # (h, T)
        order = kept.positions[0].argsort(dim=-1)  # slots to stream order (a prefill keeps them in order)
        out[idx] = scores.gather(-1, order)
    return out


def method_scores(problem: Problem, spec: str, compression: float = DEFAULT_COMPRESSION) -> torch.Tensor:
    """Attribution ``(n_steps, width)`` from the eviction scores of cache method ``spec`` on the prompt."""
    rows = [rank_percentiles(s) for s in layer_scores(problem, spec, compression).values()]
    if not rows:
        raise KVSieveError(f"method:{spec}: the model has no full-attention layer to score; use another model")
    per_token = torch.cat(rows).mean(dim=0)
    out = problem.empty_scores()
    for t in range(problem.n_steps):
        out[t, : problem.n_prompt + t] = 0.0
        out[t, : problem.n_prompt] = per_token
    return out
