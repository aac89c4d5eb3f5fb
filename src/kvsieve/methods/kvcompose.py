"""``kvcompose``: attention of a second pass over the context, composite scores that allocate tokens across layers.

"KVCompose: Efficient Structured KV Cache Compression with Composite Tokens" (2025, arXiv:2509.05165);
kvpress's ``KVComposePress``. After the context is prefilled, the context itself is run once more after it (so every
context token is queried by every repeat token; kvpress's default probe prompt). Per query head the score of context
token ``c`` is the maximum attention it receives from the repeat queries (the attention of the whole pass, over the
context and the repeat so far, causally); the query heads of a KV head are averaged; optionally times ``||v_c||``
(``v_norm``); then the mean over the layer's KV heads is added to each head's scores (``add_mean``).

Allocation (``layerwise=False``, kvpress's): each head's scores sorted in descending order form its *composite* curve;
a layer's composite curve is the mean of its heads' curves (the first layer's is raised to the maximum over layers);
the top ``layers x budget`` composite values across the model give each layer its count of kept tokens (at least
one). ``structured`` (kvpress's default): every KV head of a layer keeps that many tokens, each head its own best
ones (the composite tokens of the paper: one index per layer position, aligned across heads). Unstructured: the
top values of the per-head curves across the model give each KV head its own count.

How it runs: the second pass needs the model after the prefill, so it runs from :func:`kvsieve.prefill` (as
``kvzip``): the prompt is prefilled without eviction, the repeat pass runs on the cache and is rolled back, then
every layer is compressed once. Cost: about one more prefill (kvpress holds ~2x the context's cache while it runs).

Simplifications: kvpress's aggregations only (max over the repeat queries, mean over the group and over heads; the
paper also studies others); ``layerwise=True`` (not in kvpress) keeps the sieve's budget in every layer; with a token
budget, tokens appended after the scoring pass (decoding) rank above every context token, oldest first (kvpress does
not compress while decoding); a layer's count is rounded to whole tokens per head; unstructured, a layer's heads are
evicted (each to its own count) when their mean passes the mean of their counts, and every head keeps at least one
token (kvpress may empty a head); batch size 1 (as kvpress).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import KVSieveError
from . import register
from .base import LayerContext, Method, Observation, hp, top_slots

SCORE, SCORED = "kvcompose", "kvcompose_scored"
PASS = "kvcompose_pass"  # in cache.shared while the repeat pass runs: where the scores go
BUDGETS = "kvcompose_budgets"  # {(layer, uniform budget): tokens per head (unstructured: the heads' mean)}
HEADS = "kvcompose_heads"  # unstructured: {(layer, that count): tokens of each KV head}
ROWS = 256  # repeat queries per block when computing attention: memory O(ROWS x keys) per head


@register
@dataclass
class KVCompose(Method):
    """Score = max attention from a second pass over the context (mean over the group, + mean over heads); tokens
    allocated across layers (and heads, unstructured) by composite scores.

    structured: same count for every head of a layer (kvpress's default). v_norm: multiply by ``||v||`` (False).
    add_mean: add the mean over the layer's KV heads (True). min_tokens: tokens every head keeps at least
    (kvpress's ``keep_token_lower_bound``, 0). layerwise: the sieve's budget in every layer (not kvpress's allocation).
    """

    structured: bool = True
    v_norm: bool = False
    add_mean: bool = True
    min_tokens: int = hp(0, ge=0)
    layerwise: bool = False

    name = "kvcompose"
    paper = "KVCompose 2025, arXiv:2509.05165"
    needs = "a second pass over the context after the prefill (kvsieve.prefill)"
    simplifications = (
        "kvpress's aggregations (max over repeat queries, mean over group and heads); decoding-time tokens rank above "
        "context tokens, oldest first; layer counts rounded per head; unstructured heads evicted when their mean "
        "passes the mean of their counts and keep >= 1 token; batch size 1"
    )
    batch = "single"
    post_prefill: ClassVar[bool] = True  # kvsieve.prefill runs after_prefill (see kvsieve.generation)

    # --- the scoring pass --------------------------------------------------------------------------------------------
    def after_prefill(self, model: torch.nn.Module, cache, input_ids: torch.Tensor, tokenizer) -> None:
        """Run the context again after itself, score the held tokens, then compress each layer once."""
        from ..compat import cache_kwargs
        from ..reconstruction import compress_held, will_evict

        if not will_evict(self, cache, input_ids):  # nothing to evict (e.g. compression 0): no second pass
            return
        scores: dict = {}
        mark = cache.checkpoint()
        cache.shared[PASS] = scores
        try:
            with cache.paused(), torch.no_grad():
                model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        finally:
            cache.shared.pop(PASS, None)
        cache.restore(mark)  # the second pass is never kept
        by_layer: dict[int, list] = {}
        for layer_idx, layer in enumerate(cache.layers):
            for seg in getattr(layer, "segments", []):
                got = scores.get((layer_idx, seg.head_start))
                if got is not None:
                    by_layer.setdefault(layer_idx, []).append((seg, got))
        for pieces in by_layer.values():
            layer_scores = torch.cat([got for _, got in pieces], dim=1)  # (B, H_kv, n)
            if self.add_mean:  # every head's scores plus the mean over the layer's KV heads
                layer_scores = layer_scores + layer_scores.mean(dim=1, keepdim=True)
            first = 0
            for seg, got in pieces:
                h = got.shape[1]
                pos = seg.positions.clamp(min=0)
                seg.state[SCORE] = layer_scores[:, first : first + h].gather(-1, pos)
                seg.state[SCORED] = torch.ones_like(pos, dtype=torch.float32)
                first += h
        if not self.layerwise:
            cache.shared[BUDGETS], cache.shared[HEADS] = composite_budgets(self, cache)
        compress_held(model, cache, cache.session.method)

    def observe(self, obs: Observation) -> None:
        scores = obs.shared.get(PASS)
        if scores is None:
            return
        q = obs.n_new
        t = obs.keys.shape[2]
        ctx = t - q
        if not torch.equal(obs.positions[0, 0, :ctx], torch.arange(ctx, device=obs.positions.device)):
            raise KVSieveError(f"{self.name} scores a context held in order; prefill it with kvsieve.prefill")
        keys = obs.keys.to(torch.float32)
        b, h, _, d = keys.shape
        g = obs.group_size
        best = torch.zeros(b, h, g, ctx, dtype=torch.float32, device=keys.device)
        for r0 in range(0, q, ROWS):
            r1 = min(q, r0 + ROWS)
            query = obs.queries[:, :, r0:r1].to(torch.float32).reshape(b, h, g, r1 - r0, d)
            logits = (query @ keys[:, :, None].transpose(-1, -2)) * obs.scaling  # (B, h, g, r, T)
            future = torch.ones(r1 - r0, q, dtype=torch.bool, device=keys.device).triu(r0 + 1)
            logits[..., ctx:] = logits[..., ctx:].masked_fill(future, float("-inf"))
            best = torch.maximum(best, logits.softmax(dim=-1)[..., :ctx].amax(dim=3))
        score = best.mean(dim=2)  # (B, h, ctx): max over repeat queries, mean over the group
        if self.v_norm:
            score = score * obs.values[:, :, :ctx].to(torch.float32).norm(dim=-1)
        scores[(obs.layer_idx, obs.head_start)] = score

    # --- scoring and budgets ----------------------------------------------------------------------------------------
    def score(self, obs: Observation) -> torch.Tensor:
        if SCORE not in obs.state:
            raise KVSieveError(
                f"{self.name} scores the context with a second pass over it, which kvsieve.prefill runs: prefill the "
                "prompt with kvsieve.prefill(model, ids, cache) (kvsieve.generate and the bench do)"
            )
        scores = obs.state[SCORE].clone()
        scored = obs.state[SCORED] > 0
        if not bool(scored.all()):  # appended after the scoring pass: above every context token, oldest first
            top = scores.masked_fill(~scored, float("-inf")).amax(dim=-1, keepdim=True).clamp(min=0.0)
            rank = obs.positions.to(torch.float32) / (obs.positions.max().to(torch.float32) + 1.0)
            scores = torch.where(scored, scores, top + 1.0 - rank)
        return scores

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        return ctx.shared.get(BUDGETS, {}).get((ctx.layer_idx, budget), budget)

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """Structured: each head its own top ``budget``. Unstructured: each KV head its own allocated count."""
        got = ctx.shared.get(HEADS, {}).get((ctx.layer_idx, budget))
        if got is None:
            return [top_slots(s, budget) for s in scores]
        if scores[0].shape[0] != 1:
            raise KVSieveError(f"{self.name} scores one sequence at a time; run the prompts one at a time")
        per_head = [s[:, h : h + 1] for s in scores for h in range(s.shape[1])]
        return [top_slots(p, k) for p, k in zip(per_head, got, strict=True)]


def composite_budgets(method: KVCompose, cache) -> tuple[dict, dict]:
    """kvpress's allocation: ``{(layer, uniform budget): tokens per head}`` (unstructured: the mean over the heads) and,
    unstructured, ``{(layer, that mean): tokens of each KV head}``."""
    from ..cache import SieveLayer

    session = cache.session
    layers = [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, SieveLayer)]
    if not layers or session is None or not session.evicts:
        return {}, {}
    seen = layers[0][1].seen
    uniform = session.budget.keep_target(seen, seen)
    if uniform is None:
        return {}, {}
    per_layer = []
    for _, layer in layers:
        parts = [seg.state.get(SCORE) for seg in layer.segments]
        if any(p is None for p in parts):
            return {}, {}
        per_layer.append(torch.cat(parts, dim=1)[0].to(torch.float32))  # (H_kv, n): batch size 1
    curves = [s.sort(dim=-1, descending=True).values for s in per_layer]  # each head's composite curve
    bound = method.min_tokens
    out, heads_out = {}, {}
    if method.structured:
        layer_curves = torch.stack([c.mean(dim=0) for c in curves])  # (L, n)
        layer_curves[:, :bound] += 1e9
        layer_curves[0] = layer_curves.max(dim=0).values  # the first layer's curve is the largest
        counts = _allocate(layer_curves, uniform * len(layers))
        for (i, _), c in zip(layers, counts.tolist(), strict=True):
            out[(i, uniform)] = max(1, bound, c)
    else:
        heads = torch.stack(curves)  # (L, H_kv, n)
        heads[..., :bound] += 1e9
        counts = _allocate(heads.flatten(0, 1), uniform * heads.shape[0] * heads.shape[1]).view(heads.shape[:2])
        for (i, _), c in zip(layers, counts.tolist(), strict=True):
            c = [max(1, n) for n in c]
            mean = max(1, round(sum(c) / len(c)))  # the layer's budget: its heads evict when their mean passes it
            out[(i, uniform)] = mean
            heads_out[(i, mean)] = c
    return out, heads_out


def _allocate(curves: torch.Tensor, total: int) -> torch.Tensor:
    """Rows ``(R, n)`` of scores: how many of the ``total`` highest values across all rows fall in each row."""
    r, n = curves.shape
    kept = top_slots(curves.reshape(1, 1, -1), min(total, r * n))[0, 0] // n
    return torch.bincount(kept, minlength=r)
