"""Query and key statistics shared by several scorers (no method is registered here).

- RoPE frequencies read from the layer's config, to undo the rotation of queries and keys (methods that need
  pre-RoPE vectors: ``expected_attention``, ``cap``, ``leverage_score``) and to average the rotation over future
  positions (expected attention's closed form);
- running moments of a layer's queries (sum and sum of outer products per query head, per batch row), kept in
  ``obs.layer_state`` so that a shared-prefill replay and later decoding steps see what the prefill saw;
- masked per-row z-scores and zero-padded pooling in stream order (kvpress's ``avg_pool1d`` edges).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KVSieveError, UnsupportedModelError
from .base import Observation

ROPE = "rope_frequencies"
ROW = "batch_row"


def rope_of(obs: Observation) -> tuple[torch.Tensor, float]:
    """``(inv_freq (D/2,), attention_scaling)`` of the layer's full-attention RoPE, cached in ``obs.shared``.

    Read from ``obs.module.config`` on first use (an ``observe`` of a live pass or of the shared-prefill recording).
    """
    cached = obs.shared.get(ROPE)
    if cached is not None:
        return cached
    module = obs.module
    if module is None or not hasattr(module, "config"):
        raise KVSieveError("this method needs the attention module on its first pass (kvsieve sets obs.module)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = module.config
    params = dict(getattr(config, "rope_parameters", None) or {})
    layer_type = None
    if isinstance(params.get("full_attention"), dict):
        params, layer_type = params["full_attention"], "full_attention"
    head_dim = obs.keys.shape[-1]
    if params.get("partial_rotary_factor", 1.0) != 1.0 or "rope_theta" not in params:
        raise UnsupportedModelError("this method needs RoPE on the whole head dimension (no partial rotary)")
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        inv_freq, scaling = (1.0 / float(params["rope_theta"]) ** exponents).to(torch.float32), 1.0
    else:
        fn = ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = fn(config, layer_type=layer_type) if layer_type else fn(config)
    out = (inv_freq.detach().to(obs.keys.device, torch.float32), float(scaling))
    obs.shared[ROPE] = out
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def unrotate(x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, float]) -> torch.Tensor:
    """Pre-RoPE vectors, fp32: ``x`` ``(..., n, D)`` was rotated (and scaled) at ``positions`` ``(..., n)``."""
    inv_freq, scaling = rope
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    v = x.to(torch.float32) / scaling
    return v * emb.cos() - _rotate_half(v) * emb.sin()  # rotation by -position


def mean_rotation(rope: tuple[torch.Tensor, float], start: torch.Tensor, n: int) -> torch.Tensor:
    """The RoPE matrix averaged over positions ``start .. start + n - 1``: ``(B, D, D)`` for ``start`` ``(B,)``.

    RoPE at position p maps x to ``x cos(p w) + rotate_half(x) sin(p w)``, so the average is
    ``diag(mean cos) + diag(mean sin) P`` with P the rotate-half matrix (times the attention scaling).
    """
    inv_freq, scaling = rope
    pos = start.to(torch.float64)[:, None] + torch.arange(n, device=start.device, dtype=torch.float64)
    freqs = pos[..., None] * inv_freq.to(torch.float64)  # (B, n, D/2)
    cos, sin = freqs.cos().mean(dim=1), freqs.sin().mean(dim=1)  # (B, D/2)
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    d = cos.shape[-1]
    half = d // 2
    eye = torch.eye(half, dtype=torch.float64, device=start.device)
    p = torch.zeros(d, d, dtype=torch.float64, device=start.device)
    p[:half, half:], p[half:, :half] = -eye, eye
    rot = torch.diag_embed(cos) + sin[..., None] * p
    return (rot * scaling).to(torch.float32)


def new_query_positions(obs: Observation) -> torch.Tensor:
    """Positions ``(B, Hq, n_new)`` of this pass's queries (each query head's KV head's new slots)."""
    pos = obs.positions[:, :, -obs.n_new :]
    return pos.repeat_interleave(obs.group_size, dim=1)


def real_new_queries(obs: Observation, n_sink: int = 0) -> torch.Tensor:
    """``(B, Hq, n_new)`` bool: the pass's queries that are real tokens at positions ``>= n_sink``."""
    pos = new_query_positions(obs)
    real = pos >= n_sink
    if obs.valid is not None:
        real &= obs.valid[:, :, -obs.n_new :].repeat_interleave(obs.group_size, dim=1)
    return real


def accumulate_moments(obs: Observation, key: str, vectors: torch.Tensor, real: torch.Tensor) -> dict:
    """Add ``vectors`` ``(B, Hq, n, D)`` (rows where ``real``) to the running moments of this layer and segment.

    Kept in fp64 (sums of many outer products): ``count`` ``(B, Hq)``, ``sum`` ``(B, Hq, D)``, ``outer``
    ``(B, Hq, D, D)``.
    """
    b, h, t = obs.positions.shape
    # each token carries its batch row: the core scores a padded batch row by row (a one-row observation), and the
    # row's moments are then found through it
    obs.state[ROW] = torch.arange(b, device=obs.positions.device, dtype=torch.int32)[:, None, None].expand(b, h, t)
    store = obs.layer_state.setdefault((key, obs.head_start, obs.keys.shape[1]), {})
    x = vectors.to(torch.float64) * real[..., None]
    count = real.sum(dim=-1).to(torch.float64)
    total, outer = x.sum(dim=2), x.transpose(-1, -2) @ x
    if "count" in store:
        count, total, outer = store["count"] + count, store["sum"] + total, store["outer"] + outer
    store.update(count=count, sum=total, outer=outer)
    return store


def moments(obs: Observation, key: str) -> dict | None:
    """The running moments of this layer and segment for the batch rows of ``obs`` (None before any pass)."""
    store = obs.layer_state.get((key, obs.head_start, obs.keys.shape[1]))
    if store is None:
        return None
    rows = obs.state[ROW][:, 0, 0].long() if ROW in obs.state else None
    if rows is None or (rows.numel() == store["count"].shape[0] and bool((rows == torch.arange(rows.numel())).all())):
        return store
    return {k: v[rows.to(v.device)] for k, v in store.items()}


def mean_and_covariance(store: dict | None, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, Hq, D)`` and population covariance ``(B, Hq, D, D)`` (zeros where nothing was counted)."""
    b, hq, d = shape
    if store is None:
        return torch.zeros(b, hq, d), torch.zeros(b, hq, d, d)
    n = store["count"].clamp(min=1.0)
    mu = store["sum"] / n[..., None]
    cov = store["outer"] / n[..., None, None] - mu[..., :, None] * mu[..., None, :]
    return mu.to(torch.float32), cov.to(torch.float32)


def zscore(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(x - mean) / std`` per batch row over every head and token where ``mask`` (kvpress: the whole tensor)."""
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    m = mask.to(x.dtype)
    n = m.flatten(1).sum(dim=1).clamp(min=1.0)
    mean = (x * m).flatten(1).sum(dim=1) / n
    centred = (x - mean.view(-1, *([1] * (x.ndim - 1)))) * m
    std = (centred.square().flatten(1).sum(dim=1) / (n - 1).clamp(min=1.0)).sqrt()
    shape = (-1, *([1] * (x.ndim - 1)))
    return (x - mean.view(shape)) / std.clamp(min=1e-6).view(shape)


def zero_padded_pool(x: torch.Tensor, positions: torch.Tensor, kernel: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Average over ``kernel`` stream neighbours with zeros beyond the edges and at tokens outside ``keep``
    (``F.avg_pool1d`` with ``count_include_pad=True``, as kvpress pools): ``(B, h, T)``."""
    if keep is not None:
        x = x.masked_fill(~keep, 0.0)
    order = positions.argsort(dim=-1, stable=True)
    b, h, t = x.shape
    ordered = x.gather(-1, order).reshape(b * h, 1, t)
    pooled = F.avg_pool1d(ordered, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return torch.empty_like(x).scatter_(-1, order, pooled.reshape(b, h, t))


def protect(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` with ``+inf`` where ``mask`` (tokens a method always keeps)."""
    return scores.masked_fill(mask, float("inf"))
