"""``qfilter``: project keys on the principal direction of the queries (Q-Filters).

Godey et al., "Q-Filters: Leveraging Query-Key Geometry for Efficient Key-Value Cache Compression" (2025). Queries
and keys of a head are anisotropic along one shared direction: with ``Q = U S V^T`` the SVD of the head's queries,
the *positive* first right vector ``v1+ = sgn(1^T u1) v1`` (queries project positively on it on average) gives
``E_q <q, k> ~ kappa <k, v1+>``; the keys with the lowest ``<k, v1+>`` are evicted. With GQA the filters of a group's
query heads are averaged. No attention is needed.

The filters are computed here, never downloaded: :func:`calibrate` runs a calibration text through the model and
writes them to a file (``qfilter(filters='path.pt')``). Without a file (``filters=None``) each layer's filters come
from the queries the layer has seen in this run (the paper finds the direction context-agnostic), accumulated as
``Q^T Q`` and ``1^T Q``, whose top eigenvector is ``v1`` and whose sign is ``sgn(1^T u1)``.

Simplifications: the SVD is of the queries as attention sees them (RoPE applied, the space of the cached keys they
are applied to); the paper's calibration set is a Pile sample, here any text the caller gives; the uncalibrated mode
is this implementation's (per run, from the context's own queries).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KVSieveError
from . import register
from .base import Method, Observation
from .qk_stats import accumulate_moments, moments, real_new_queries

STATS = "qfilter_queries"


def positive_direction(store: dict) -> torch.Tensor:
    """``v1+`` per query head ``(B, Hq, D)`` from accumulated ``outer = Q^T Q`` and ``sum = 1^T Q``."""
    _, vectors = torch.linalg.eigh(store["outer"])  # ascending eigenvalues
    v1 = vectors[..., -1]  # (B, Hq, D)
    sign = torch.sign((store["sum"] * v1).sum(dim=-1, keepdim=True))  # sgn(1^T Q v1) = sgn(1^T u1)
    return (v1 * torch.where(sign == 0, 1.0, sign)).to(torch.float32)


@register
@dataclass
class QFilter(Method):
    """Score = ``<k, f>`` with ``f`` the GQA-averaged positive principal query direction of the head.

    filters: a file written by :func:`calibrate` (tensor ``(layers, KV heads, D)``), or None to take the directions
    from the queries the layer has seen in this run.
    """

    filters: str | None = None

    name = "qfilter"
    paper = "Godey et al. 2025, arXiv:2503.02812"
    needs = "keys; query filters (calibrated, or this run's queries)"
    simplifications = (
        "SVD of the queries with RoPE applied (the space of the cached keys); calibration text of the caller's choice "
        "(`qfilter.calibrate`); filters=None takes the directions from this run's queries"
    )

    def validate(self) -> None:
        self._filters = load_filters(self.filters) if self.filters is not None else None

    def observe(self, obs: Observation) -> None:
        if self._filters is None:
            accumulate_moments(obs, STATS, obs.queries, real_new_queries(obs))

    def layer_filters(self, obs: Observation) -> torch.Tensor:
        """``(B|1, h, D)`` filters of the segment's KV heads."""
        h = obs.keys.shape[1]
        if self._filters is not None:
            if obs.layer_idx >= self._filters.shape[0] or obs.head_start + h > self._filters.shape[1]:
                raise KVSieveError(
                    f"qfilter: the filters file has {tuple(self._filters.shape[:2])} layers x KV heads, this model "
                    "more; calibrate for this model with kvsieve.methods.qfilter.calibrate"
                )
            return self._filters[None, obs.layer_idx, obs.head_start : obs.head_start + h].to(obs.keys.device)
        store = moments(obs, STATS)
        if store is None:
            return torch.zeros(1, h, obs.keys.shape[-1], device=obs.keys.device)
        per_query = positive_direction(store)
        return per_query.view(per_query.shape[0], h, -1, per_query.shape[-1]).mean(dim=2).to(obs.keys.device)

    def score(self, obs: Observation) -> torch.Tensor:
        return torch.einsum("bhtd,bhd->bht", obs.keys.to(torch.float32), self.layer_filters(obs))


def load_filters(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise KVSieveError(f"qfilter: no filters file at {path}; write one with kvsieve.methods.qfilter.calibrate")
    data = torch.load(p, map_location="cpu", weights_only=True)
    filters = data.get("filters") if isinstance(data, dict) else None
    if not isinstance(filters, torch.Tensor) or filters.ndim != 3:
        raise KVSieveError(f"qfilter: {path} is not a filters file (a dict with a (layers, KV heads, D) 'filters')")
    return filters.to(torch.float32)


@torch.no_grad()
def calibrate(model: torch.nn.Module, input_ids: torch.Tensor, path: str | Path) -> QFilter:
    """Q-Filters of ``model`` from the calibration text ``input_ids`` ``(B, T)``, saved to ``path``.

    Per full-attention layer and query head: the positive first right singular vector of the queries (from the
    accumulated ``Q^T Q``); averaged over each GQA group. Layers kvsieve does not compress (sliding windows) get zeros.
    Returns ``QFilter(filters=str(path))``.
    """
    from ..compat import cache_kwargs
    from ..sieve import Sieve  # here: the sieve module imports the method registry

    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise KVSieveError("qfilter.calibrate takes token ids (batch, tokens) with at least 2 tokens")
    probe = _QueryProbe()
    with Sieve(probe).attach(model) as cache:
        model(input_ids=input_ids.to(model.device), **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    filters = torch.zeros(text.num_hidden_layers, text.num_key_value_heads, head_dim)
    for layer in cache.sieve_layers():
        for (key, start, h), store in layer.layer_state.items():
            if key != STATS:
                continue
            summed = {k: store[k].sum(dim=0, keepdim=True) for k in ("outer", "sum")}  # every calibration row
            per_query = positive_direction(summed)[0]  # (Hq_seg, D)
            filters[probe.layers[id(layer.layer_state)], start : start + h] = per_query.view(h, -1, head_dim).mean(1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"filters": filters, "model": getattr(model.config, "name_or_path", "")}, Path(path))
    return QFilter(filters=str(path))


class _QueryProbe(Method):
    """Keeps every token; accumulates each layer's query moments (for :func:`calibrate`)."""

    name = "qfilter-calibration"
    own_kind = "keep-all"

    def __init__(self):
        self.layers: dict[int, int] = {}

    def observe(self, obs: Observation) -> None:
        self.layers[id(obs.layer_state)] = obs.layer_idx
        accumulate_moments(obs, STATS, obs.queries, real_new_queries(obs))

    def spec(self) -> str:
        return self.name
