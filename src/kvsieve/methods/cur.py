"""``cur``: approximate leverage scores of keys and values, normalised locally (CurDKV).

Sengupta et al., "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition" (2025); kvpress's
``CURPress``. The squared row norms ``||k||^2`` and ``||v||^2`` stand in for the leverage scores of the key and value
matrices (optionally after a random Gaussian projection to ``20`` dimensions); with ``local=True`` each is normalised
within windows of ``window`` consecutive tokens; the key and value terms are combined (``kv_product`` by default),
normalised to sum to 1 per head, and the first ``n_sink`` tokens get 1.0.

Simplifications: none in the score (kvpress's); windows are counted in stream positions (``position // window``),
which is kvpress's slot order for a prompt and stays right after decoding-time evictions; the random projection is
seeded (``seed``) rather than drawn from the global generator, so runs repeat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp


def window_normalise(x: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None, window: int) -> torch.Tensor:
    """``x`` ``(B, h, T)`` divided by its sum over the tokens of the same ``position // window`` window."""
    real = torch.ones_like(x, dtype=torch.bool) if valid is None else valid
    bins = torch.where(real, positions // window, 0)
    n_bins = int(bins.max()) + 1 if bins.numel() else 1
    totals = torch.zeros(*x.shape[:2], n_bins, dtype=x.dtype, device=x.device)
    totals.scatter_add_(-1, bins, x * real)
    return x / totals.gather(-1, bins).clamp(min=torch.finfo(x.dtype).tiny)


@register
@dataclass
class CUR(Method):
    """Score = normalised ``||k||^2 x ||v||^2`` (or key, value, average), locally normalised; sinks 1.0.

    leverage: "kv_product", "kv_avg", "key" or "value". random_projection: project on a seeded Gaussian (20 dims)
    first. local: normalise within windows of ``window`` tokens (16). n_sink: first tokens scored 1.0 (4).
    """

    leverage: str = hp("kv_product", choices=("kv_product", "kv_avg", "key", "value"))
    random_projection: bool = False
    local: bool = True
    window: int = hp(16, ge=1)
    n_sink: int = hp(4, ge=0)
    seed: int = hp(0, ge=0)

    name = "cur"
    paper = "Sengupta et al. 2025, arXiv:2509.15038"
    needs = "keys, values"
    simplifications = (
        "none in the score (kvpress's CURPress); windows by stream position; the optional random projection is seeded"
    )

    def score(self, obs: Observation) -> torch.Tensor:
        keys, values = obs.keys.to(torch.float32), obs.values.to(torch.float32)
        if self.random_projection:
            gen = torch.Generator().manual_seed(self.seed)
            proj = (torch.randn(keys.shape[-1], 20, generator=gen) / 20**0.5).to(keys.device)
            keys, values = keys @ proj, values @ proj
        k2, v2 = keys.square().sum(dim=-1), values.square().sum(dim=-1)
        if self.local:
            k2 = window_normalise(k2, obs.positions, obs.valid, self.window)
            v2 = window_normalise(v2, obs.positions, obs.valid, self.window)
        scores = {"key": k2, "value": v2, "kv_avg": (k2 + v2) / 2, "kv_product": k2 * v2}[self.leverage]
        if obs.valid is not None:
            scores = scores * obs.valid
        scores = scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        return scores.masked_fill(obs.positions < self.n_sink, 1.0)
