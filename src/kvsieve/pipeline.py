"""What one forward pass does to one cache layer, in one place for live runs and shared-prefill replays.

Per full-attention layer and forward pass (:func:`run_layer`, called by the registered attention function):

1. the new tokens are committed to the layer's storage (appended into spare room);
2. per storage segment, inside the layer's attention view (keys rotated by their shifts where positions are
   re-indexed): the attention output (:func:`compute`: a read method's selected slots at decoding steps, the prefill
   method for prefill passes, else dense sdpa); the statistics the cache method asked for; ``observe``;
3. if the layer holds more than its keep budget: :func:`decide` (``score`` -> ``select`` -> ``merge``), then, once the
   view is closed, :func:`apply` (merged rows written, evicted slots freed);
4. ``pack`` (storage transforms: quantisation, merging across layers).

:class:`kvsieve.snapshot.PrefillSnapshot` replays steps 3-4 with :func:`decide`, :func:`apply` and :func:`pack_layer`,
so a replayed cache is the one the method would have built on its own.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import torch

from . import attention as attn
from .cache import SieveCache, SieveLayer
from .methods.base import LayerContext, Method, Observation, overrides


@dataclass
class Eviction:
    """What :func:`decide` chose: the slots to keep (one tensor per segment, or one per KV head of a single segment)
    and the merged rows to write first: ``(segment, head or None, slots (B, h, k), keys, values)``; or, for the one
    token a decoding step evicts under the default policy, just that slot per head (``victim`` ``(B, h, 1)``)."""

    keep: list[torch.Tensor] | None
    merged: list[tuple] = field(default_factory=list)
    victim: torch.Tensor | None = None


def masked_scores(method: Method, obs: Observation) -> torch.Tensor:
    """The method's scores with padding at -inf: padding goes first, whatever the method thinks of it."""
    score = method.score(obs)
    return score if obs.valid is None else score.masked_fill(~obs.valid, float("-inf"))


def decide(method: Method, observations: list[Observation], targets: list[int], ctx: LayerContext) -> Eviction:
    """Score, select and merge for one layer that must shrink to ``targets`` tokens per head (one per batch row).

    A batch with padding is decided row by row (each row with its own target and its own observation), so each row
    keeps exactly what it would keep alone; shorter rows are filled up with padding slots to a common length.
    """
    first = observations[0]
    if (
        len(observations) == 1
        and first.valid is None
        and first.keys.shape[2] - targets[0] == 1
        and not overrides(method, "select")
        and not overrides(method, "merge")
    ):  # one token goes under the default policy (a decoding step): find it in O(T), move one row per head
        scores = masked_scores(method, replace(first, budget=targets[0]) if first.budget != targets[0] else first)
        t = scores.shape[-1]
        # the last slot among equal lowest scores goes: what the top-k (ties broken by slot) would drop
        return Eviction(None, victim=(t - 1) - scores.flip(-1).argmin(dim=-1, keepdim=True))
    if first.keys.shape[0] > 1 and any(o.valid is not None for o in observations):
        n_seg = len(observations)
        rows = [
            _select(method, [_row(o, b, targets[b]) for o in observations], targets[b], ctx)
            for b in range(first.keys.shape[0])
        ]
        split = any(len(r) != n_seg for r in rows)  # a head-wise policy split the single segment
        if split:
            rows = [r if len(r) != n_seg else [r[0][:, h : h + 1] for h in range(r[0].shape[1])] for r in rows]
        keep = [
            _stack_rows([r[j] for r in rows], observations[0] if split else observations[j],
                        slice(j, j + 1) if split else slice(None))
            for j in range(len(rows[0]))
        ]  # fmt: skip
    else:
        observations = [o if o.budget == targets[0] else replace(o, budget=targets[0]) for o in observations]
        keep = _select(method, observations, targets[0], ctx)
    return Eviction(keep, _merges(method, observations, keep))


def _select(method: Method, observations: list[Observation], target: int, ctx: LayerContext) -> list[torch.Tensor]:
    return method.select([masked_scores(method, o) for o in observations], target, ctx)


def _row(obs: Observation, b: int, budget: int) -> Observation:
    """Batch row ``b`` of an observation (views)."""
    sl = slice(b, b + 1)

    def cut(t):
        return None if t is None else t[sl]

    n_new = obs.n_new if obs.valid is None else int(obs.valid[b, 0, -obs.n_new :].sum())  # real new tokens
    return replace(
        obs, keys=obs.keys[sl], values=obs.values[sl], queries=obs.queries[sl], positions=obs.positions[sl],
        valid=cut(obs.valid), attention=cut(obs.attention), state={k: v[sl] for k, v in obs.state.items()},
        budget=budget, n_new=max(1, n_new),
    )  # fmt: skip


def _stack_rows(rows: list[torch.Tensor], obs: Observation, heads: slice) -> torch.Tensor:
    """Per-row slot indices ``(1, h, k_b)`` stacked to ``(B, h, max k_b)``, shorter rows filled with padding slots."""
    k = max(r.shape[-1] for r in rows)
    t = obs.keys.shape[2]
    out = []
    for b, idx in enumerate(rows):
        if idx.shape[-1] < k:
            taken = torch.zeros((*idx.shape[:2], t), dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
            valid = obs.valid[b : b + 1, heads] if obs.valid is not None else torch.ones_like(taken)
            # free padding slots first, then (never needed for ratios) any other free slot
            order = (taken.to(torch.int8) * 2 + valid.to(torch.int8)).argsort(dim=-1, stable=True)
            idx = torch.cat([idx, order[..., : k - idx.shape[-1]]], dim=-1)
        out.append(idx)
    return torch.cat(out, dim=0)


def _merges(method: Method, observations: list[Observation], keep: list[torch.Tensor]) -> list[tuple]:
    """The merged rows of every kept slot set, computed before any slot moves."""
    out = []
    if not overrides(method, "merge"):
        return out
    if len(keep) != len(observations):  # a head-wise policy split the one segment: merge per head
        (obs,) = observations
        pieces = [(0, h, _head_view(obs, h), idx) for h, idx in enumerate(keep)]
    else:
        pieces = [(i, None, obs, idx) for i, (obs, idx) in enumerate(zip(observations, keep, strict=True))]
    for seg_index, head, obs, idx in pieces:
        slots = idx.sort(dim=-1).values
        merged = method.merge(obs, slots)
        if merged is not None:
            out.append((seg_index, head, slots, *merged))
    return out


def _head_view(obs: Observation, h: int) -> Observation:
    """The observation of KV head ``h`` alone (views, no copies)."""
    g = obs.group_size
    kv, qs = slice(h, h + 1), slice(h * g, (h + 1) * g)
    return replace(
        obs, keys=obs.keys[:, kv], values=obs.values[:, kv], queries=obs.queries[:, qs], positions=obs.positions[:, kv],
        valid=None if obs.valid is None else obs.valid[:, kv],
        attention=None if obs.attention is None else obs.attention[:, qs],
        state={k: v[:, kv] for k, v in obs.state.items()}, head_start=obs.head_start + h,
    )  # fmt: skip


def apply(layer: SieveLayer, eviction: Eviction, ordered: bool) -> None:
    """Write the merged rows, then keep the chosen slots (``ordered``: in slot order, as after a prefill pass)."""
    if eviction.victim is not None:
        layer.drop_one(eviction.victim)
        return
    for seg_index, head, slots, keys, values in eviction.merged:
        layer.segments[seg_index].write(slots, keys, values, head=head)
    layer.keep(eviction.keep, ordered=ordered)


def pack_layer(method: Method, layer: SieveLayer, ctx: LayerContext) -> None:
    layer.segments = [method.pack(seg, ctx) for seg in layer.segments]


def _rotated(layer: SieveLayer, seg) -> tuple[torch.Tensor, torch.Tensor]:
    with layer.attention_view(seg) as (keys, values):
        return keys, values


def layer_context(layer: SieveLayer, layer_idx: int, n_layers: int, n_new: int, cache: SieveCache) -> LayerContext:
    return LayerContext(layer_idx, n_layers, layer.seen, n_new, layer.layer_state, cache.shared)


def observation(
    ctx: LayerContext, seg, keys, values, queries, scaling: float, budget: int, read_budget: int | None
) -> Observation:
    return Observation(
        layer_idx=ctx.layer_idx, n_layers=ctx.n_layers, keys=keys, values=values, queries=queries,
        positions=seg.positions, valid=seg.valid, attention=None, state=seg.state, n_new=ctx.n_new, scaling=scaling,
        budget=budget, layer_state=ctx.layer_state, shared=ctx.shared, head_start=seg.head_start,
        read_budget=read_budget, seen=ctx.seen,
    )  # fmt: skip


def run_layer(session, module, cache: SieveCache, layer: SieveLayer, query: torch.Tensor, new_valid, scaling: float,
              dropout: float, position_ids: torch.Tensor,
              together: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One forward pass of one full-attention layer (see the module docstring); returns ``(B, q, Hq, D)``.
    ``together``: the image of each new token whose tokens attend to each other (Gemma 3), or None; the attention
    output follows it, the statistics methods read stay causal."""
    q = query.shape[2]
    layer_idx = module.layer_idx
    layer.commit(position_ids, new_valid)
    ctx = layer_context(layer, layer_idx, session.n_layers, q, cache)
    method = session.method
    if session.plain:  # keep-all with no hook to run: attention over what is held, nothing else
        (seg,) = layer.segments
        call = attn.AttentionCall(module, query, seg.keys, seg.values, seg.valid, seg.positions, scaling, dropout,
                                  together=together, layer_idx=layer_idx, n_layers=session.n_layers,
                                  layer_state=layer.layer_state, shared=cache.shared)  # fmt: skip
        out, _ = session.compute(call, None, q, False)
        session.sequence_step(cache, layer_idx, [(query, seg.keys, seg.positions, seg.valid)], scaling, q)
        return out
    targets, evicting = session.keep_targets(layer, ctx, cache)
    request = method.attention_request(evicting)
    # a decoding step of a layer at its token budget (evicting now, or between evictions of a periodic budget)
    # computes the step's attention probabilities with the output: one pass over the keys, not two
    steady = q == 1 and request is not None and dropout == 0.0 and targets is not None and (
        evicting or layer.held - 1 >= min(targets))  # fmt: skip
    groups = query.shape[1] // layer.n_kv_heads
    read_budget = session.read_target(layer.held) if q == 1 else None
    per_head = len(layer.segments) > 1  # only head-wise eviction splits a layer: no uncompressed run comes here
    if not evicting and request is None and session.idle and (read_budget is None or read_budget >= layer.held):
        # nothing to observe, bias, read selectively or evict in this pass: attention over each segment, that is all
        outputs = []
        for seg in layer.segments:
            q_seg = query[:, seg.head_start * groups : (seg.head_start + seg.n_heads) * groups]
            keys, values = seg.read() if not layer.rerotate else _rotated(layer, seg)
            call = attn.AttentionCall(module, q_seg, keys, values, seg.valid, seg.positions, scaling, dropout,
                                      together=together, layer_idx=layer_idx, n_layers=session.n_layers,
                                      packed=per_head, layer_state=layer.layer_state,
                                      shared=cache.shared)  # fmt: skip
            outputs.append(session.compute(call, None, q, False)[0])
        if session.sequence is not None:
            pieces = [(query[:, s.head_start * groups : (s.head_start + s.n_heads) * groups], s.keys, s.positions,
                       s.valid) for s in layer.segments]  # fmt: skip
            session.sequence_step(cache, layer_idx, pieces, scaling, q)
        pack_layer(method, layer, ctx)
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    outputs, observations = [], []
    eviction = None
    with ExitStack() as stack:
        for seg in layer.segments:
            keys, values = stack.enter_context(layer.attention_view(seg))
            q_seg = query[:, seg.head_start * groups : (seg.head_start + seg.n_heads) * groups]
            budget = max(targets) if targets is not None else seg.length
            obs = observation(ctx, seg, keys, values, q_seg, scaling, budget, read_budget)
            obs.module = module
            call = attn.AttentionCall(module, q_seg, keys, values, seg.valid, seg.positions, scaling, dropout,
                                      bias=method.logit_bias(obs) if session.biases else None, together=together,
                                      layer_idx=layer_idx, n_layers=session.n_layers, packed=per_head,
                                      layer_state=layer.layer_state, shared=cache.shared)  # fmt: skip
            out, probs = session.compute(call, obs, q, steady)
            outputs.append(out)
            if request is not None:
                obs.attention = (
                    probs if probs is not None else attn.column_sums(q_seg, keys, scaling, seg.valid, request)
                )
            method.observe(obs)
            observations.append(obs)
        session.sequence_step(cache, layer_idx, [(o.queries, o.keys, o.positions, o.valid) for o in observations],
                              scaling, q)  # fmt: skip
        if evicting:
            eviction = decide(method, observations, targets, ctx)
    if eviction is not None:
        apply(layer, eviction, ordered=q > 1)
    pack_layer(method, layer, ctx)
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
