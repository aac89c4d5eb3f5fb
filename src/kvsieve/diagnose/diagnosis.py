"""One diagnosis: attention statistics, hidden sinks, massive activations and (optionally) retrieval scores.

:func:`diagnose` runs one forward pass of ``input_ids`` with an :class:`~kvsieve.diagnose.stats.AttentionProfiler`
attached and decoder-layer hooks for the residual stream, and returns a JSON-ready dict (:data:`DIAGNOSIS_FORMAT`).
Every per-head statistic is a ``layers x query heads`` nested list (``null`` for layers kvsieve does not profile,
e.g. Gemma 3's sliding-window layers).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..compat import cache_kwargs
from ..errors import KVSieveError
from ..sieve import Sieve
from .profile import HeadProfile
from .retrieval import RetrievalResult
from .stats import HEAD_STATS, AttentionProfiler, StatsConfig, check_heads, massive_activations

DIAGNOSIS_FORMAT = "kvsieve-diagnosis"
DIAGNOSIS_FILE = "diagnosis.json"

STAT_TITLES = {
    "sink0": "Attention mass on token 0",
    "first_k": "Attention mass on the first k tokens",
    "hidden_sink_mass": "Attention mass on hidden sinks (beyond token 0)",
    "hidden_sink_count": "Hidden sinks (tokens beyond 0 above the ACT threshold)",
    "local": "Locality: mass on the last w tokens",
    "entropy": "Attention entropy (nats)",
    "entropy_norm": "Normalised entropy (entropy / log visible keys)",
    "hh_top1": "Heavy hitters: share of accumulated attention on the top 1% of tokens",
    "hh_top10": "Heavy hitters: share of accumulated attention on the top 10% of tokens",
    "dormant_frac": "Dormancy: share of queries with >= threshold mass on token 0",
    "output_norm": "Attention output norm",
    "retrieval": "Retrieval score (copy-paste, Wu et al. 2024)",
}


def _nested(t: torch.Tensor, digits: int = 5) -> list:
    return [[None if math.isnan(float(x)) else round(float(x), digits) for x in row] for row in t]


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)]) if tokenizer is not None else str(int(token_id))


@torch.no_grad()
def diagnose(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    tokenizer: Any = None,
    config: StatsConfig | None = None,
    map_heads: list[tuple[int, int]] | None = None,
    retrieval: RetrievalResult | None = None,
    model_name: str = "",
    source: str = "",
) -> dict:
    """Profile ``input_ids`` ``(1, n)`` on ``model``; returns the diagnosis dict (see the module docstring).

    ``map_heads``: query heads ``(layer, head)`` whose pooled attention maps go into the output; by default a few
    chosen from the statistics (strongest sink, most local, most spread out, strongest hidden sink, best retrieval).
    """
    config = config or StatsConfig()
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise KVSieveError("diagnose needs one sequence of at least 2 tokens, shaped (1, n)")
    n = int(input_ids.shape[1])
    text_cfg = model.config.get_text_config()
    window = getattr(text_cfg, "max_position_embeddings", None)
    if window is not None and n > window:
        raise KVSieveError(f"the input has {n} tokens, beyond the model's window of {window}; shorten it")
    if map_heads:  # checked before the forward pass, the slow part
        check_heads(map_heads, text_cfg.num_hidden_layers, text_cfg.num_attention_heads)
    profiler = AttentionProfiler(config, n)
    t0 = time.perf_counter()
    with massive_activations(model, config) as massive, Sieve(profiler).attach(model) as cache:
        model(input_ids=input_ids.to(model.device), use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        massive = dict(massive)
    seconds = time.perf_counter() - t0
    res = profiler.results()
    stats: dict[str, torch.Tensor] = res["stats"]
    n_layers, n_heads = stats["sink0"].shape
    ids = input_ids[0].tolist()

    dormant = stats["dormant_frac"] >= 0.5
    layers_out = []
    for layer in range(n_layers):
        row = {"layer": layer, "profiled": layer in profiler.layers}
        for name in HEAD_STATS:
            vals = stats[name][layer]
            row[name] = None if bool(vals.isnan().all()) else round(float(vals.nanmean()), 5)
        sinks = res["hidden_sinks"].get(layer, [])
        by_pos: dict[int, dict] = {}
        for s in sinks:
            e = by_pos.setdefault(s["position"], {"position": s["position"], "heads": [], "max_mean_attention": 0.0})
            e["heads"].append(s["head"])
            e["max_mean_attention"] = round(max(e["max_mean_attention"], s["mean_attention"]), 5)
        hidden = sorted(by_pos.values(), key=lambda e: -e["max_mean_attention"])[:10]
        for e in hidden:
            e["token"] = _token_text(tokenizer, ids[e["position"]])
        row["hidden_sinks"] = hidden
        row["dormant_heads"] = [h for h in range(n_heads) if bool(dormant[layer, h])]
        rec = massive.get(layer)
        if rec is not None:
            rec = dict(rec)
            rec["carrier_tokens"] = [{"position": p, "token": _token_text(tokenizer, ids[p])} for p in rec["carriers"]]
            for e in rec["top"]:
                e["token"] = _token_text(tokenizer, ids[e["position"]])
        row["massive"] = rec
        layers_out.append(row)

    head_stats = {name: _nested(stats[name]) for name in HEAD_STATS}
    if retrieval is not None:
        if tuple(retrieval.scores.shape) != (n_layers, n_heads):
            raise KVSieveError("retrieval scores do not match this model's layers x heads")
        head_stats["retrieval"] = _nested(retrieval.scores)
    chosen = map_heads or default_map_heads(stats, retrieval.scores if retrieval is not None else None)
    maps = {}
    for layer, head in chosen:
        grid = res["maps"][layer, head]
        if not bool(grid.isnan().all()):
            maps[f"{layer}.{head}"] = [[round(float(x), 6) for x in row] for row in grid]

    n_kv = getattr(text_cfg, "num_key_value_heads", None) or n_heads
    profiled = [i for i in range(n_layers) if i in profiler.layers]
    return {
        "format": DIAGNOSIS_FORMAT,
        "version": 1,
        "model": model_name or getattr(text_cfg, "_name_or_path", "") or type(model).__name__,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "head_dim": int(getattr(text_cfg, "head_dim", 0) or text_cfg.hidden_size // n_heads),
        "heads_note": (
            f"Statistics are per query head; with GQA, query heads {n_heads // n_kv}k..{n_heads // n_kv}k+"
            f"{n_heads // n_kv - 1} share KV head k"
        ),
        "input": {
            "source": source,
            "n_tokens": n,
            "query_start": res["query_start"],
            "counted_queries": n - res["query_start"],
            "first_tokens": [_token_text(tokenizer, t) for t in ids[:8]],
        },
        "config": config.to_dict(),
        "seconds": round(seconds, 3),
        "profiled_layers": profiled,
        "summary": _summary(stats, dormant, profiled),
        "head_stats": head_stats,
        "layers": layers_out,
        "maps": {"size": config.map_size, "n_tokens": n, "heads": maps},
        "retrieval": retrieval.to_dict() if retrieval is not None else None,
    }


def _summary(stats: dict[str, torch.Tensor], dormant: torch.Tensor, profiled: list[int]) -> dict:
    sink = stats["sink0"]
    rows = sink[profiled] if profiled else sink
    per_layer = sink.nanmean(dim=1)
    return {
        "mean_sink0": round(float(rows.nanmean()), 5),
        "heads_over_half_on_token0": int((rows > 0.5).sum()),
        "sink_layers": [i for i in profiled if float(per_layer[i]) >= 0.25],
        "dormant_heads": int(dormant.sum()),
        "active_heads": int(len(profiled) * sink.shape[1] - int(dormant[profiled].sum())),
        "heads_with_hidden_sinks": int((stats["hidden_sink_count"][profiled] > 0).sum()),
    }


def default_map_heads(stats: dict[str, torch.Tensor], retrieval: torch.Tensor | None) -> list[tuple[int, int]]:
    """A few telling heads: strongest token-0 sink, most local, most spread out, strongest hidden sink, best
    retrieval head (duplicates dropped)."""
    picks: list[tuple[int, int]] = []

    def best(t: torch.Tensor, largest: bool = True) -> tuple[int, int] | None:
        flat = t.nan_to_num(float("-inf") if largest else float("inf")).flatten()
        if not bool(torch.isfinite(flat).any()):
            return None
        i = int(flat.argmax() if largest else flat.argmin())
        return divmod(i, t.shape[1])

    for t, largest in (
        (stats["sink0"], True),
        (stats["local"], True),
        (stats["entropy_norm"], True),
        (stats["hidden_sink_mass"], True),
        (retrieval, True),
    ):
        if t is None:
            continue
        p = best(t, largest)
        if p is not None and p not in picks:
            picks.append(p)
    return picks


def head_profile_from(diagnosis: dict) -> HeadProfile:
    """The :class:`HeadProfile` (retrieval scores) of a diagnosis that ran a retrieval task."""
    retrieval = diagnosis.get("retrieval")
    if not retrieval:
        raise KVSieveError(
            "this diagnosis has no retrieval scores; run kvsieve diagnose with --task niah_single_number"
        )
    return HeadProfile(
        model=diagnosis["model"],
        n_layers=diagnosis["n_layers"],
        n_heads=diagnosis["n_heads"],
        n_kv_heads=diagnosis["n_kv_heads"],
        head_dim=diagnosis["head_dim"],
        retrieval=retrieval["scores"],
        meta={k: v for k, v in retrieval.items() if k != "scores"},
    )


def write_json(diagnosis: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / DIAGNOSIS_FILE
    path.write_text(json.dumps(diagnosis, indent=1, allow_nan=False) + "\n")
    return path
