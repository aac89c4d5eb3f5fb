"""``kvzip`` and ``kvzip_plus``: query-agnostic scores from the attention a KV pair receives while the model repeats
the context.

Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction" (2025); kvpress's
``KVzipPress``. After the context is prefilled in full, the model is prompted to repeat it ("Repeat the previous
context exactly." then the chat template's assistant header, then the context itself, teacher-forced), chunk by chunk
(``chunk`` context tokens per pass; later chunks are introduced with "Repeat the part of the previous context
exactly, starting with" and the last 8 tokens of the previous chunk). In each pass, the repeat queries attend to the
first ``n_sink`` tokens, the chunk being reconstructed and themselves (causally); a context KV pair's score is the
maximum attention it receives over the repeat queries and the query heads of its group. ``kvzip_plus`` normalises
each attention row by ``||h||`` (the query token's input to the attention) and each column by ``||v W_o||`` (KVzip+).
The sinks are always kept. Without ``layerwise``, the kept pairs are the top scores across *all* layers and heads
(kvpress's default): layers and heads keep different numbers of tokens, and the bytes freed are real.

How it runs: the reconstruction needs the model after the prefill, so it runs from :func:`kvsieve.prefill` (also used
by :func:`kvsieve.generate` and the bench): the prompt is prefilled without eviction, :meth:`KVzip.after_prefill`
runs the repeat passes on the cache (rolled back after each one, so the repeats are never kept) and then compresses
every layer once. The extra work is about one more prefill (the repeat of the context) plus its attention statistics;
``benchmarks/kvzip_cost.py`` measures the ratio. A prompt run by calling the model directly cannot be scored; the
first eviction then stops with an error naming ``kvsieve.prefill``. The prefill holds the whole prompt (chunked or
not) until the repeat passes have scored it: peak memory is the full context's cache, as in KVzip.

Simplifications: the whole context is reconstructed (kvpress leaves the chat template's prefix unscored, so those
tokens go first); the logit scale is the model's attention scaling; with a token budget, tokens appended after the
reconstruction (decoding) rank above every context token, oldest first among them (kvpress does not compress while
decoding); with ``layerwise=False`` a layer's share is rounded to whole tokens per head; batch size 1 (as kvpress).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import KVSieveError
from . import register
from .base import LayerContext, Method, Observation, hp, top_slots

SCORE, SCORED = "kvzip", "kvzip_scored"
PASS = "kvzip_pass"  # in cache.shared while a repeat pass runs: what it reconstructs and where scores go
BUDGETS = "kvzip_layer_budgets"
ROWS = 256  # repeat queries per block when computing attention: memory O(ROWS x keys) per head
FIRST = "\n\nRepeat the previous context exactly."
LATER = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8  # tokens of the previous chunk quoted to start the next one


@register
@dataclass
class KVzip(Method):
    """Score = max attention received while the model repeats the context (chunked repeat passes after the prefill).

    chunk: context tokens per repeat pass (2048, kvpress's). n_sink: first tokens always kept (4). layerwise: keep
    the same share in every layer (False: top scores across all layers, kvpress's default).
    """

    chunk: int = hp(2048, ge=1)
    n_sink: int = hp(4, ge=0)
    layerwise: bool = False

    name = "kvzip"
    paper = "Kim et al. 2025, arXiv:2505.23416"
    needs = "a repeat pass after the prefill (kvsieve.prefill)"
    simplifications = (
        "whole context reconstructed (kvpress skips the template prefix); model's attention scaling; decoding-time "
        "tokens rank above context tokens, oldest first; per-layer shares rounded per head; batch size 1"
    )
    batch = "single"
    normalised: ClassVar[bool] = False
    post_prefill: ClassVar[bool] = True  # kvsieve.prefill runs after_prefill (see kvsieve.generation)

    # --- the repeat passes ------------------------------------------------------------------------------------------
    def after_prefill(self, model: torch.nn.Module, cache, input_ids: torch.Tensor, tokenizer) -> None:
        """Score every held context token by repeat passes, then compress each layer once (see the module doc)."""
        from ..compat import cache_kwargs
        from ..reconstruction import repeat_prompts, will_evict

        if not will_evict(self, cache, input_ids):  # nothing to evict (e.g. compression 0): no repeat passes
            return
        n = input_ids.shape[1]
        scores: dict = {}
        norms: dict = {}
        hooks = []
        if self.normalised:  # KVzip+: the norm of each repeat token's input to the attention, per layer
            for module in model.modules():
                if hasattr(module, "o_proj") and hasattr(module, "layer_idx"):
                    hooks.append(module.register_forward_pre_hook(_norm_hook(norms), with_kwargs=True))
        try:
            for start, prompt in repeat_prompts(input_ids[0], self.chunk, tokenizer, FIRST, LATER, OVERLAP):
                stop = min(n, start + self.chunk)
                mark = cache.checkpoint()
                cache.shared[PASS] = {"start": start, "stop": stop, "scores": scores, "norms": norms}
                with cache.paused(), torch.no_grad():
                    model(input_ids=prompt[None].to(input_ids.device), use_cache=True, logits_to_keep=1,
                          **cache_kwargs(model, cache))  # fmt: skip
                cache.restore(mark)  # the repeat is never kept
        finally:
            cache.shared.pop(PASS, None)
            for hook in hooks:
                hook.remove()
        self.compress_scored(model, cache, scores)

    def compress_scored(self, model: torch.nn.Module, cache, scores: dict) -> None:
        """Hand each held token its score (``scores[(layer, head_start)]``: ``(B, h, n)`` by position), share the
        budget across layers unless ``layerwise``, then compress every layer once."""
        from ..reconstruction import compress_held

        for layer_idx, layer in enumerate(cache.layers):
            for seg in getattr(layer, "segments", []):
                got = scores.get((layer_idx, seg.head_start))
                if got is None:
                    continue
                pos = seg.positions.clamp(min=0)
                seg.state[SCORE] = got.gather(-1, pos)
                seg.state[SCORED] = torch.ones_like(pos, dtype=torch.float32)
        if not self.layerwise:
            cache.shared[BUDGETS] = _global_budgets(self, cache)
        compress_held(model, cache, cache.session.method)

    def observe(self, obs: Observation) -> None:
        run = obs.shared.get(PASS)
        if run is None:
            return
        q = obs.n_new
        t = obs.keys.shape[2]
        ctx = t - q
        if not torch.equal(obs.positions[0, 0, :ctx], torch.arange(ctx, device=obs.positions.device)):
            raise KVSieveError(f"{self.name} reconstructs a context held in order; prefill it with kvsieve.prefill")
        start, stop = run["start"], run["stop"]
        sink = min(self.n_sink, start)
        cols = torch.cat([torch.arange(sink), torch.arange(start, stop), torch.arange(ctx, t)]).to(obs.keys.device)
        keys, values = obs.keys[:, :, cols].to(torch.float32), obs.values[:, :, cols]
        b, h, _, d = keys.shape
        g = obs.group_size
        column_weight = None
        if self.normalised:
            column_weight = _per_query_head_norms(obs, values)  # (B, h, g, cols)
        best = torch.zeros(b, h, stop - start, dtype=torch.float32, device=keys.device)
        n_cols = cols.numel()
        for r0 in range(0, q, ROWS):
            r1 = min(q, r0 + ROWS)
            query = obs.queries[:, :, r0:r1].to(torch.float32).reshape(b, h, g, r1 - r0, d)
            logits = (query @ keys[:, :, None].transpose(-1, -2)) * obs.scaling  # (B, h, g, r, cols)
            future = torch.ones(r1 - r0, q, dtype=torch.bool, device=keys.device).triu(r0 + 1)
            logits[..., n_cols - q :] = logits[..., n_cols - q :].masked_fill(future, float("-inf"))
            probs = logits.softmax(dim=-1)
            if column_weight is not None:
                row_norm = run["norms"][obs.layer_idx][:, r0:r1].to(torch.float32)  # (B, r)
                probs = probs * column_weight[..., None, :] / row_norm[:, None, None, :, None]
            chunk_probs = probs[..., sink : sink + stop - start]
            best = torch.maximum(best, chunk_probs.amax(dim=(2, 3)))
        key = (obs.layer_idx, obs.head_start)
        total = run["scores"].get(key)
        if total is None:
            total = torch.zeros(b, h, ctx, dtype=torch.float32, device=keys.device)
            run["scores"][key] = total
        total[..., start:stop] = best

    # --- scoring and budgets ----------------------------------------------------------------------------------------
    def score(self, obs: Observation) -> torch.Tensor:
        if SCORE not in obs.state:
            raise KVSieveError(
                f"{self.name} scores the context by having the model repeat it, which kvsieve.prefill runs: prefill "
                "the prompt with kvsieve.prefill(model, ids, cache, tokenizer=tok) (kvsieve.generate and the bench do)"
            )
        scores = obs.state[SCORE].clone()
        scored = obs.state[SCORED] > 0
        if not bool(scored.all()):  # appended after the reconstruction: above every context token, oldest first
            top = scores.masked_fill(~scored, float("-inf")).amax(dim=-1, keepdim=True).clamp(min=0.0)
            rank = obs.positions.to(torch.float32) / (obs.positions.max().to(torch.float32) + 1.0)
            scores = torch.where(scored, scores, top + 1.0 - rank)
        return scores.masked_fill(obs.positions < self.n_sink, float("inf"))

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        budgets = ctx.shared.get(BUDGETS)
        return budget if budgets is None else budgets.get((ctx.layer_idx, budget), budget)

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """The layer's ``budget x heads`` highest scores across its heads (kvpress: bottom-k across heads)."""
        if scores[0].shape[0] != 1:
            raise KVSieveError(f"{self.name} scores one sequence at a time; run the prompts one at a time")
        per_head = [s[:, h].to(torch.float32) for s in scores for h in range(s.shape[1])]
        flat = torch.cat(per_head, dim=-1)
        chosen = top_slots(flat, budget * len(per_head))[0]
        bounds = torch.tensor([0] + [s.shape[-1] for s in per_head], device=chosen.device).cumsum(0)
        return [(chosen[(chosen >= bounds[h]) & (chosen < bounds[h + 1])] - bounds[h]).view(1, 1, -1)
                for h in range(len(per_head))]  # fmt: skip


@register
@dataclass
class KVzipPlus(KVzip):
    """KVzip+: the repeat attention normalised by ``||h||`` per query row and ``||v W_o||`` per key column."""

    name = "kvzip_plus"
    simplifications = KVzip.simplifications + "; ||v W_o|| per query head (L2), ||h|| the attention module's input"
    normalised = True


def _norm_hook(norms: dict):
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None:
            norms[int(module.layer_idx)] = hidden.detach().to(torch.float32).norm(dim=-1)  # (B, q)

    return hook


def _per_query_head_norms(obs: Observation, values: torch.Tensor) -> torch.Tensor:
    """``||v W_o||_2`` of the selected values per query head ``(B, h, g, n)``."""
    if obs.module is None or not hasattr(obs.module, "o_proj"):
        raise KVSieveError("kvzip_plus reads the layer's output projection (o_proj), which this model lacks")
    h, d = values.shape[1], values.shape[-1]
    g = obs.group_size
    weight = obs.module.o_proj.weight
    w = weight.view(weight.shape[0], -1, d)[:, obs.head_start * g : (obs.head_start + h) * g].to(torch.float32)
    w = w.reshape(weight.shape[0], h, g, d)
    return torch.einsum("bhtd,jhgd->bhgtj", values.to(torch.float32), w).norm(dim=-1)


def _global_budgets(method: KVzip, cache) -> dict:
    """Per-layer budgets from the top scores across every layer and head (kvpress's ``layerwise=False``):
    ``{(layer, uniform budget): tokens per head}`` for the budget the session would give every layer."""
    from ..cache import SieveLayer

    session = cache.session
    layers = [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, SieveLayer)]
    if not layers or session is None or not session.evicts:
        return {}
    seen = layers[0][1].seen
    uniform = session.budget.keep_target(seen, seen)
    if uniform is None:
        return {}
    flat, owner = [], []
    for i, layer in layers:
        for seg in layer.segments:
            s = seg.state.get(SCORE)
            if s is None:
                return {}
            s = s.masked_fill(seg.positions < method.n_sink, float("inf"))
            flat.append(s.flatten())
            owner.append(torch.full((s.numel(),), i, dtype=torch.long, device=s.device))
    scores, owners = torch.cat(flat), torch.cat(owner)
    heads = {i: sum(seg.n_heads for seg in layer.segments) for i, layer in layers}
    total = sum(uniform * heads[i] for i, _ in layers)
    kept = owners[top_slots(scores[None, None], min(total, scores.numel()))[0, 0]]
    counts = torch.bincount(kept, minlength=max(heads) + 1)
    return {(i, uniform): max(1, int(counts[i]) // heads[i]) for i, _ in layers}
