"""One prefill, many methods: observe a prompt once, then build each method's compressed cache from that observation.

In a single-pass prefill, eviction happens after each layer's attention, so the forward pass itself (every hidden
state, every attention statistic) is the same whatever the method keeps; only what is stored differs. A
:class:`PrefillSnapshot` therefore runs the prompt once with an uncompressed cache, records for every layer the
attention statistics the given methods ask for (each distinct request once), and :meth:`PrefillSnapshot.compress`
replays each method's ``observe``/``score``/``select`` on that record. The result is identical to running the method
on its own (``tests/test_snapshot.py`` checks it), for a fraction of the cost of one prefill per method.

Chunked prefill is not shared this way: there, earlier evictions change what later chunks attend to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import attention as attn
from .attention import AttentionRequest
from .cache import Segment, SieveCache, SieveLayer
from .methods.base import Method, Observation, overrides
from .rope import find_inv_freq
from .sieve import Budget, Sieve

KEPT_QUERIES = 64  # query rows kept per layer for methods that read queries directly


@dataclass
class _LayerRecord:
    stats: dict[AttentionRequest, torch.Tensor] = field(default_factory=dict)
    queries: torch.Tensor | None = None
    scaling: float = 1.0


class _Recorder(Method):
    """Keeps every token and records, per layer, the attention statistics of a set of requests."""

    name = "snapshot-recorder"
    evicts = False

    def __init__(self, requests: set[AttentionRequest]):
        self.requests = requests
        self.records: dict[int, _LayerRecord] = {}

    def observe(self, obs: Observation) -> None:
        record = _LayerRecord(queries=obs.queries[:, :, -KEPT_QUERIES:].clone(), scaling=obs.scaling)
        for request in self.requests:
            record.stats[request] = attn.column_sums(obs.queries, obs.keys, obs.scaling, obs.valid, request)
        self.records[obs.layer_idx] = record

    def spec(self) -> str:
        return self.name


def shareable(method: Method) -> bool:
    """Whether :meth:`PrefillSnapshot.compress` reproduces ``method`` exactly.

    A method that biases attention (its prefill differs), merges evicted tokens or repacks storage has hooks the
    replay does not run, so it must prefill on its own.
    """
    return not any(overrides(method, hook) for hook in ("logit_bias", "merge", "pack"))


class PrefillSnapshot:
    """A prompt run once through ``model`` with a full cache, plus the statistics ``methods`` need.

    >>> snap = PrefillSnapshot(model, input_ids, [build("snapkv"), build("h2o")])
    >>> cache = snap.compress(build("snapkv"), Budget(compression=0.5))   # a SieveCache, as if snapkv had run
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, methods: list[Method]):
        self.model = model
        requests = {r for m in methods if m.evicts and (r := m.attention_request(True)) is not None}
        self.recorder = _Recorder(requests)
        self.n_tokens = int(input_ids.shape[1])
        sieve = Sieve(self.recorder)
        t0 = time.perf_counter()
        with sieve.attach(model) as cache, torch.no_grad():
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.prefill_seconds = time.perf_counter() - t0
        self.full_cache = cache
        self.last_logits = out.logits[:, -1]
        self._inv_freq: torch.Tensor | None = None

    def compress(self, method: Method, budget: Budget | None) -> SieveCache:
        """A new cache holding what ``method`` keeps under ``budget`` (``None``: everything, for ``full``)."""
        if not shareable(method):
            raise ValueError(
                f"{method.spec()} biases attention, merges or repacks the cache, which a shared prefill cannot "
                "replay; run it on its own (kvsieve.prefill under its Sieve)"
            )
        request = method.attention_request(True) if method.evicts else None
        if request is not None and request not in self.recorder.requests:
            raise ValueError(f"this snapshot did not record {request}; pass {method.spec()} when creating it")
        inv_freq = self._rope() if method.rerotate else None
        config = self.model.config
        cache = SieveCache(config, rerotate=method.rerotate, inv_freq=inv_freq)
        n_layers = config.get_text_config().num_hidden_layers
        for idx, src in enumerate(self.full_cache.layers):
            if not isinstance(src, SieveLayer):
                cache.layers[idx] = _copy_window_layer(src, cache.layers[idx])
                continue
            seg = src.segments[0]
            record = self.recorder.records[idx]
            target = seg.length
            if budget is not None and method.evicts:
                target = method.layer_budget(budget.target(src.seen), idx, n_layers)
            obs = Observation(
                layer_idx=idx, n_layers=n_layers, keys=seg.keys, values=seg.values, queries=record.queries,
                positions=seg.positions, valid=seg.valid, attention=record.stats.get(request) if request else None,
                state={}, n_new=seg.length, scaling=record.scaling, budget=target,
            )
            method.observe(obs)
            # a re-rotating layer that ran this prefill itself would hold the same keys, rotated where they arrived
            rope_positions = seg.positions if method.rerotate else None
            kept = Segment(0, seg.keys, seg.values, seg.positions, seg.valid, dict(obs.state), rope_positions)
            dst: SieveLayer = cache.layers[idx]
            dst.lazy_initialization(seg.keys, seg.values)
            dst.n_kv_heads, dst.seen = src.n_kv_heads, src.seen
            dst.segments = [kept]
            if seg.length > target:
                score = method.score(obs)
                if seg.valid is not None:
                    score = score.masked_fill(~seg.valid, float("-inf"))
                dst.keep(method.select([score], target))
            else:  # nothing to evict: own copies, so the snapshot stays intact for the next method
                dst.segments = [_clone(kept)]
        return cache

    def _rope(self) -> torch.Tensor:
        if self._inv_freq is None:
            self._inv_freq = find_inv_freq(self.model)
        return self._inv_freq


def _clone(seg: Segment) -> Segment:
    def copy(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.clone()

    return Segment(
        seg.head_start, seg.keys.clone(), seg.values.clone(), seg.positions.clone(), copy(seg.valid),
        {k: v.clone() for k, v in seg.state.items()}, copy(seg.rope_positions),
    )


def _copy_window_layer(src, dst):
    """Sliding-window layers are not compressed; each compressed cache gets its own copy."""
    dst.lazy_initialization(src.keys, src.values)
    dst.keys, dst.values = src.keys.clone(), src.values.clone()
    dst.cumulative_length = src.cumulative_length
    return dst
