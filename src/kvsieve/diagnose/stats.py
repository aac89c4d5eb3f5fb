"""Where attention goes, per layer and query head, computed chunk by chunk (never an n x n matrix in memory).

:class:`AttentionProfiler` is a non-evicting :class:`~kvsieve.methods.Method`: run under ``Sieve(profiler)`` for one
forward pass, its ``observe`` receives each layer's queries and keys (RoPE applied) and turns them into statistics
``chunk`` query rows at a time, so memory is ``O(chunk x T)`` per head. Statistics are reported per *query head*
(SmolLM2: 30 layers x 9 query heads = 270 heads); with GQA, query heads ``g*k .. g*k + g - 1`` share KV head ``k``.

Only queries at positions ``>= query_start`` are counted (early queries see few keys, so every distribution over
them looks concentrated). Per head:

- ``sink0``: mean attention mass on token 0; ``first_k``: on the first ``k`` tokens;
- ``hidden_sink_mass`` / ``hidden_sink_count``: "hidden sinks" beyond position 0 as in ACT (Yu et al. 2024): keys
  whose mean attention, over the counted queries that see them, exceeds ``sink_threshold`` (ACT: 0.1); only keys seen
  by at least ``sink_min_seen`` counted queries qualify (so the last few tokens of a local head are not called sinks);
- ``local``: mass on the last ``window`` tokens (the query's own token included);
- ``entropy`` (nats) and ``entropy_norm`` (entropy / log of the number of visible keys, in [0, 1]);
- ``hh_top1`` / ``hh_top10``: heavy-hitter concentration, the share of the head's accumulated attention (H2O's
  column sums over the counted queries) held by the top 1% and 10% of tokens;
- ``dormant_frac``: the share of counted queries on which the head parks at least ``dormant_threshold`` of its
  attention on token 0 (active-dormant heads, Guo et al. 2024); a head is *dormant* when this share is >= 0.5;
- ``output_norm``: the mean L2 norm of the head's attention output (dormant heads write little).

:func:`massive_activations` hooks the decoder layers for the residual stream's outlier dimensions (Sun et al. 2024,
"Massive Activations in Large Language Models": magnitudes >= 100 and >= 1000 x the median).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..errors import KVSieveError
from ..methods.base import Method, Observation

HEAD_STATS = (
    "sink0",
    "first_k",
    "hidden_sink_mass",
    "hidden_sink_count",
    "local",
    "entropy",
    "entropy_norm",
    "hh_top1",
    "hh_top10",
    "dormant_frac",
    "output_norm",
)

_PER_ROW = ("sink0", "first_k", "local", "entropy", "entropy_norm", "dormant_frac", "output_norm")  # means over rows


@dataclass(frozen=True)
class StatsConfig:
    """Settings of the attention statistics (see the module docstring)."""

    first_k: int = 4
    window: int = 16
    query_start: int = 100
    sink_threshold: float = 0.1
    sink_min_seen: int = 32
    dormant_threshold: float = 0.9
    map_size: int = 64
    chunk: int = 256
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0

    def __post_init__(self) -> None:
        for name in ("first_k", "window", "map_size", "chunk", "sink_min_seen"):
            if int(getattr(self, name)) < 1:
                raise KVSieveError(f"{name} must be at least 1, got {getattr(self, name)}; pass a positive integer")
        if self.query_start < 0:
            raise KVSieveError(f"query_start must be >= 0, got {self.query_start}; pass 0 to count every query")
        if not 0.0 < self.sink_threshold < 1.0 or not 0.0 < self.dormant_threshold <= 1.0:
            raise KVSieveError("sink_threshold must be in (0, 1) and dormant_threshold in (0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _LayerAcc:
    """Running sums of one layer, per query head (``Hq``) and key (``T``)."""

    rows: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (Hq,)
    col_sum: torch.Tensor | None = None  # (Hq, T) attention received from counted queries
    col_seen: torch.Tensor | None = None  # (T,) counted queries that see each key
    map_sum: torch.Tensor | None = None  # (Hq, M, M) attention mass from query bin to key bin
    map_rows: torch.Tensor | None = None  # (M,) query rows per bin


class AttentionProfiler(Method):
    """Keeps every token and accumulates the statistics of the module docstring from one forward pass.

    ``n_tokens``: length of the input (for the pooled attention maps); batch size 1.
    """

    name = "diagnose-profiler"
    family = "analysis"
    own_kind = "keep-all"

    def __init__(self, config: StatsConfig, n_tokens: int):
        self.config = config
        self.n_tokens = int(n_tokens)
        self.query_start = min(config.query_start, max(0, self.n_tokens // 2))
        self.layers: dict[int, _LayerAcc] = {}
        self.n_layers = 0

    def spec(self) -> str:
        return self.name

    def observe(self, obs: Observation) -> None:
        if obs.keys.shape[0] != 1:
            raise KVSieveError("diagnose profiles one sequence at a time (batch size 1)")
        if obs.head_start != 0 or obs.layer_idx in self.layers:
            raise KVSieveError("the diagnose profiler expects one forward pass over the whole input")
        self.n_layers = obs.n_layers
        self.layers[obs.layer_idx] = self._profile(obs)

    @torch.no_grad()
    def _profile(self, obs: Observation) -> _LayerAcc:
        cfg = self.config
        _, hq, n, d = obs.queries.shape
        h, t = obs.keys.shape[1], obs.keys.shape[2]
        g = hq // h
        offset = t - n  # key index of the first new query
        m = cfg.map_size
        dev = obs.keys.device
        k_t = obs.keys[0].to(torch.float32).transpose(-1, -2)  # (h, D, T)
        v = obs.values[0].to(torch.float32)  # (h, T, D)
        kj = torch.arange(t, device=dev)
        key_bin = (kj * m // max(self.n_tokens, 1)).clamp(max=m - 1)
        acc = _LayerAcc(
            col_sum=torch.zeros(hq, t, dtype=torch.float64, device=dev),
            col_seen=torch.zeros(t, dtype=torch.float64, device=dev),
            map_sum=torch.zeros(hq, m, m, dtype=torch.float64, device=dev),
            map_rows=torch.zeros(m, dtype=torch.float64, device=dev),
        )
        sums = {s: torch.zeros(hq, dtype=torch.float64, device=dev) for s in _PER_ROW}
        for start in range(0, n, cfg.chunk):
            stop = min(start + cfg.chunk, n)
            r = stop - start
            qi = torch.arange(offset + start, offset + stop, device=dev)  # absolute query indices (r,)
            q_blk = obs.queries[0, :, start:stop].to(torch.float32).reshape(h, g * r, d)
            logits = (q_blk @ k_t).view(h, g, r, t) * obs.scaling
            visible = kj[None, :] <= qi[:, None]  # (r, T)
            probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).view(hq, r, t)
            # pooled attention map (every query row)
            q_bin = (qi * m // max(self.n_tokens, 1)).clamp(max=m - 1)
            by_key_bin = torch.zeros(hq, r, m, dtype=torch.float32, device=dev).index_add_(2, key_bin, probs)
            acc.map_sum.index_add_(1, q_bin, by_key_bin.to(torch.float64))
            acc.map_rows.index_add_(0, q_bin, torch.ones(r, dtype=torch.float64, device=dev))
            counted = qi >= self.query_start  # (r,)
            if not bool(counted.any()):
                continue
            if not bool(counted.all()):  # only the chunk that straddles query_start is cut
                first = int((~counted).sum())
                probs, qi, visible, r = probs[:, first:].contiguous(), qi[first:], visible[first:], r - first
            acc.rows += r
            # the last `window` keys of each query, gathered (r, w): no pass over all T keys
            back = (qi[:, None] - torch.arange(cfg.window, device=dev)[None, :]).clamp(min=0)
            near = probs.gather(2, back[None].expand(hq, -1, -1))
            near = near.masked_fill((qi[:, None] - torch.arange(cfg.window, device=dev)[None, :] < 0)[None], 0.0)
            entropy = torch.special.entr(probs).sum(-1)  # (Hq, r)
            n_visible = (qi + 1).to(torch.float32)
            out = (probs.view(h, g * r, t) @ v).view(hq, r, -1)
            per_row = {
                "sink0": probs[..., 0],
                "first_k": probs[..., : cfg.first_k].sum(-1),
                "local": near.sum(-1),
                "entropy": entropy,
                "entropy_norm": entropy / torch.log(n_visible).clamp(min=math.log(2.0)),
                "dormant_frac": (probs[..., 0] >= cfg.dormant_threshold).to(torch.float32),
                "output_norm": out.norm(dim=-1),
            }
            for name, value in per_row.items():
                sums[name] += value.sum(-1).to(torch.float64)
            acc.col_sum += probs.sum(1).to(torch.float64)
            acc.col_seen += visible.sum(0).to(torch.float64)
        acc.sums = sums
        return acc

    def results(self) -> dict:
        """Per-head statistics ``name -> (L, Hq)`` tensors (NaN for layers never profiled), hidden sinks, maps."""
        cfg = self.config
        n_layers = self.n_layers or (max(self.layers) + 1 if self.layers else 0)
        hq = next(iter(self.layers.values())).col_sum.shape[0] if self.layers else 0
        stats = {s: torch.full((n_layers, hq), float("nan"), dtype=torch.float64) for s in HEAD_STATS}
        sinks: dict[int, list[dict]] = {}
        maps = torch.full((n_layers, hq, cfg.map_size, cfg.map_size), float("nan"), dtype=torch.float64)
        for layer, acc in self.layers.items():
            rows = max(acc.rows, 1)
            for name in HEAD_STATS:
                if name in acc.sums:
                    stats[name][layer] = acc.sums[name].cpu() / rows
            col_sum, seen = acc.col_sum.cpu(), acc.col_seen.cpu()
            total = col_sum.sum(-1).clamp(min=1e-30)
            t = col_sum.shape[-1]
            ranked = col_sum.sort(dim=-1, descending=True).values.cumsum(-1)
            stats["hh_top1"][layer] = ranked[:, max(1, math.ceil(0.01 * t)) - 1] / total
            stats["hh_top10"][layer] = ranked[:, max(1, math.ceil(0.10 * t)) - 1] / total
            col_mean = col_sum / seen.clamp(min=1.0)
            eligible = seen >= min(cfg.sink_min_seen, max(acc.rows, 1))
            eligible[0] = False  # hidden sinks lie beyond position 0
            is_sink = (col_mean > cfg.sink_threshold) & eligible
            stats["hidden_sink_count"][layer] = is_sink.sum(-1).to(torch.float64)
            stats["hidden_sink_mass"][layer] = (col_sum * is_sink).sum(-1) / rows
            found = []
            for head, pos in is_sink.nonzero().tolist():
                found.append({"head": head, "position": pos, "mean_attention": float(col_mean[head, pos])})
            found.sort(key=lambda e: -e["mean_attention"])
            sinks[layer] = found
            maps[layer] = acc.map_sum.cpu() / acc.map_rows.cpu().clamp(min=1.0)[None, :, None]
        return {"stats": stats, "hidden_sinks": sinks, "maps": maps, "query_start": self.query_start}


def check_heads(heads: list[tuple[int, int]], n_layers: int, n_heads: int) -> None:
    """KVSieveError unless every ``(layer, query head)`` exists in a model of ``n_layers`` x ``n_heads``."""
    missing = [f"{layer}.{head}" for layer, head in heads if not (0 <= layer < n_layers and 0 <= head < n_heads)]
    if missing:
        subject = f"heads {', '.join(missing)} do" if len(missing) > 1 else f"head {missing[0]} does"
        raise KVSieveError(
            f"{subject} not exist: the model has {n_layers} layers x {n_heads} query heads; "
            f"pass layer.head with layer 0-{n_layers - 1} and head 0-{n_heads - 1}"
        )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``model.model.layers`` for Llama, Qwen2, Mistral, Gemma 3)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise KVSieveError(f"cannot find the decoder layers of {type(model).__name__} (expected model.model.layers)")
    return layers


@dataclass
class _MassiveAcc:
    records: dict[int, dict] = field(default_factory=dict)


@contextmanager
def massive_activations(model: torch.nn.Module, config: StatsConfig, top: int = 5) -> Iterator[dict[int, dict]]:
    """Forward hooks recording each decoder layer's residual-stream outliers; removed on exit.

    Yields a dict filled during the forward pass: ``layer -> {max_abs, median_abs, ratio, top: [(pos, dim, value)],
    massive_dims: [dim], carriers: [pos]}``, where a massive activation is ``|h| >= massive_abs`` and
    ``|h| >= massive_ratio x median(|h|)`` (batch element 0).
    """
    records: dict[int, dict] = {}
    handles = []

    def hook_for(idx: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            records[idx] = _outliers(hidden[0].detach(), config, top)

        return hook

    try:
        for i, layer in enumerate(decoder_layers(model)):
            handles.append(layer.register_forward_hook(hook_for(i)))
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _outliers(hidden: torch.Tensor, config: StatsConfig, top: int) -> dict:
    """Outlier summary of one layer's output ``(T, H)``."""
    a = hidden.to(torch.float32).abs()
    width = a.shape[1]
    median = float(a.median())
    values, flat = a.flatten().topk(min(top, a.numel()))
    threshold = max(config.massive_abs, config.massive_ratio * median)
    per_dim = a.max(dim=0).values  # (H,)
    dims = (per_dim >= threshold).nonzero().flatten()
    dims = dims[per_dim[dims].argsort(descending=True)].tolist()
    carriers: list[int] = []
    if dims:
        per_token = a[:, dims].max(dim=1).values
        hits = (per_token >= threshold).nonzero().flatten()
        carriers = hits[per_token[hits].argsort(descending=True)][:10].tolist()
    return {
        "max_abs": float(values[0]) if values.numel() else 0.0,
        "median_abs": median,
        "ratio": float(values[0]) / median if median > 0 and values.numel() else None,
        "top": [
            {"position": int(i) // width, "dim": int(i) % width, "value": float(hidden.flatten()[i])}
            for i in flat.tolist()
        ],
        "massive_dims": dims,
        "carriers": carriers,
    }
