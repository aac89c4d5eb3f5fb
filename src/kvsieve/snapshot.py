"""One prefill, many methods: record a prompt's forward pass once, then build each method's compressed cache from it.

The benchmark compares many methods and budgets on the same context. A :class:`PrefillSnapshot` runs the context
through the model once with a full cache and, in that same pass, runs every method's ``observe`` on its own copy of
the per-token state, and records the attention statistics the methods request. :meth:`PrefillSnapshot.compress`
then replays what the method would have done at the end of its own prefill with the pipeline's own functions
(``decide`` -> ``apply`` -> ``pack``, :mod:`kvsieve.pipeline`), so the cache is the one the method builds alone (the
test suite checks this bit for bit for every shareable method, at lengths beyond the kept query window).

Not shareable (:func:`shareable`): methods that bias attention (their prefill itself differs) and methods that score
by passes after the prefill (``kvzip``). Their rows need a prefill of their own.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from . import attention as attn
from .attention import AttentionRequest
from .cache import SieveCache, SieveLayer
from .compat import cache_kwargs
from .errors import KVSieveError
from .methods.base import LayerContext, Method, Observation, overrides
from .pipeline import apply, decide, observation, pack_layer
from .rope import find_inv_freq
from .sieve import _ACTIVE, Budget, Sieve

KEPT_QUERIES = 64  # query rows kept per layer, for scores that read recent queries
RECORDS = "snapshot_records"


@dataclass
class _LayerRecord:
    stats: dict[AttentionRequest, torch.Tensor] = field(default_factory=dict)
    queries: torch.Tensor | None = None
    scaling: float = 1.0
    observed: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # method spec -> (state, layer state)


class _Recorder(Method):
    """Keeps every token; per layer, records the statistics of ``requests`` and runs each method's ``observe``."""

    name = "snapshot-recorder"
    own_kind = "keep-all"

    def __init__(self, methods: dict[str, Method], requests: set[AttentionRequest]):
        self.methods, self.requests = methods, requests

    def observe(self, obs: Observation) -> None:
        records = obs.shared.setdefault(RECORDS, {})
        record = _LayerRecord(queries=obs.queries[:, :, -KEPT_QUERIES:].clone(), scaling=obs.scaling)
        for request in self.requests:
            record.stats[request] = attn.column_sums(obs.queries, obs.keys, obs.scaling, obs.valid, request)
        shared = obs.shared.setdefault("snapshot_method_shared", {})
        for spec, method in self.methods.items():
            request = method.attention_request(True)
            mine = Observation(
                layer_idx=obs.layer_idx, n_layers=obs.n_layers, keys=obs.keys, values=obs.values,
                queries=obs.queries, positions=obs.positions, valid=obs.valid,
                attention=record.stats.get(request) if request is not None else None, state={}, n_new=obs.n_new,
                scaling=obs.scaling, budget=obs.budget, layer_state={}, shared=shared.setdefault(spec, {}),
                head_start=obs.head_start, seen=obs.seen, module=obs.module,
            )  # fmt: skip
            method.observe(mine)
            record.observed[spec] = (mine.state, mine.layer_state)
        records[obs.layer_idx] = record

    def spec(self) -> str:
        return self.name


def shareable(method: Method) -> bool:
    """Whether :meth:`PrefillSnapshot.compress` reproduces ``method`` exactly: its prefill must be plain attention,
    and its scores must not need passes after the prefill (``kvzip``, see :mod:`kvsieve.reconstruction`)."""
    from .reconstruction import post_prefill_method

    return not overrides(method, "logit_bias") and post_prefill_method(method) is None


class PrefillSnapshot:
    """A prompt run once through ``model`` with a full cache, plus what ``methods`` observed in that pass.

    >>> snap = PrefillSnapshot(model, input_ids, [build("snapkv"), build("h2o")])
    >>> with Sieve("snapkv", compression=0.5).attach(model):
    ...     cache = snap.compress(build("snapkv"), Budget(compression=0.5))   # as if snapkv had run
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, methods: list[Method]):
        self.model = model
        # every method whose eviction or storage depends on what it observed (keep-all quantisers observe too)
        wanted = {m.spec(): m for m in methods if shareable(m) and (m.evicts or overrides(m, "observe"))}
        requests = {r for m in wanted.values() if (r := m.attention_request(True)) is not None}
        self.recorded = set(wanted)
        self.n_tokens = int(input_ids.shape[1])
        sieve = Sieve(_Recorder(wanted, requests))
        t0 = time.perf_counter()
        with sieve.attach(model) as cache, torch.no_grad():
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        self.prefill_seconds = time.perf_counter() - t0
        self.full_cache = cache
        self.records: dict[int, _LayerRecord] = cache.shared.pop(RECORDS)
        self.method_shared: dict = cache.shared.pop("snapshot_method_shared", {})
        self.last_logits = out.logits[:, -1]
        self._inv_freq: torch.Tensor | None = None

    def compress(self, method: Method, budget: Budget | None) -> SieveCache:
        """A new cache holding what ``method`` keeps under ``budget`` (``None``: everything, for ``full``).

        Call it inside ``with Sieve(method, ...).attach(model):``; the cache belongs to that block.
        """
        if not shareable(method):
            raise KVSieveError(
                f"{method.spec()} biases attention during the prefill, which a shared prefill cannot replay; run it "
                "on its own (kvsieve.prefill under its Sieve)"
            )
        session = _ACTIVE.get()
        if session is None:
            raise KVSieveError("PrefillSnapshot.compress must run inside `with sieve.attach(model):` of the method")
        evicting = method.evicts and budget is not None and budget.keeps
        spec = method.spec()
        observed = spec in self.recorded
        if not observed and (evicting or overrides(method, "observe")):
            raise KVSieveError(f"this snapshot did not record {spec}; pass it when creating the snapshot")
        inv_freq = self._rope() if method.rerotate else None
        cache = SieveCache(self.model.config, session=session, rerotate=method.rerotate, inv_freq=inv_freq)
        n_layers = self.model.config.get_text_config().num_hidden_layers
        shared = copy.deepcopy(self.method_shared.get(spec, {}))
        for idx, src in enumerate(self.full_cache.layers):
            if not isinstance(src, SieveLayer):
                cache.layers[idx] = copy.deepcopy(src)
                continue
            dst: SieveLayer = cache.layers[idx]
            seg = src.segments[0]
            state, layer_state = ({}, {})
            if observed:
                state, layer_state = copy.deepcopy(self.records[idx].observed[spec])
            kept = seg.clone()
            kept.state = state
            if method.rerotate:
                kept.track_shift()
            dst.lazy_initialization(seg.keys, seg.values)
            dst.n_kv_heads, dst.seen, dst._real_seen = src.n_kv_heads, src.seen, src._real_seen
            dst.segments, dst.layer_state = [kept], layer_state
            ctx = LayerContext(idx, n_layers, src.seen, src.seen, layer_state, shared)
            if evicting:
                targets = [method.layer_budget(budget.keep_target(s, src.seen), ctx) for s in src.real_seen()]
                if budget.due(kept.length, min(targets), src.seen):
                    record = self.records[idx]
                    obs = observation(ctx, kept, kept.keys, kept.values, record.queries, record.scaling,
                                      max(targets), None)  # fmt: skip
                    request = method.attention_request(True)
                    obs.attention = record.stats.get(request) if request is not None else None
                    apply(dst, decide(method, [obs], targets, ctx), ordered=True)
            pack_layer(method, dst, ctx)
        cache.shared = shared
        return cache

    def _rope(self) -> torch.Tensor:
        if self._inv_freq is None:
            self._inv_freq = find_inv_freq(self.model)
        return self._inv_freq
