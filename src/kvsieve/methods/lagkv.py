"""``lagkv``: lag-relative key/value statistics, no attention needed.

Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important" (2025); kvpress's
``LagKVPress``. After ``n_sink`` sinks the tokens are cut into partitions of ``lag`` tokens in stream order. Each
partition is scored against the *next* one (its lag reference): keys and values are min-max normalised per channel by
the reference's range, the standard deviation over channels is taken and a softmax runs over the partition; key and
value scores are averaged, then (``cross_scoring=False``) replaced by their rank within the partition divided by
``lag``. The sinks, the last full partition (it has no reference) and the remainder are always kept (score 1). With
fewer than ``n_sink + 2 * lag`` tokens nothing is compared: the most recent tokens score highest.

Simplifications: none in the score (kvpress's); partitions follow stream positions (kvpress: slot order, the same for
a prompt); a channel whose reference range is zero is divided by 1e-6 rather than producing NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Method, Observation, hp


def lag_scores(keys: torch.Tensor, values: torch.Tensor, n_sink: int, lag: int, cross: bool) -> torch.Tensor:
    """LagKV scores ``(B, h, T)`` of tokens in stream order, keys/values ``(B, h, T, D)`` (all real)."""
    b, h, t, d = keys.shape
    if t < n_sink + 2 * lag:
        score = torch.ones(b, h, t, dtype=torch.float32, device=keys.device)
        if t > n_sink:
            score[..., n_sink:] = torch.arange(t - n_sink, device=keys.device, dtype=torch.float32) / (t - n_sink)
        return score
    end = n_sink + ((t - n_sink) // lag) * lag

    def partition_score(x: torch.Tensor) -> torch.Tensor:
        parts = x[:, :, n_sink:end].to(torch.float32).reshape(b, h, -1, lag, d)
        ref, cur = parts[:, :, 1:], parts[:, :, :-1]
        lo, hi = ref.amin(dim=-2, keepdim=True), ref.amax(dim=-2, keepdim=True)
        return ((cur - lo) / (hi - lo).clamp(min=1e-6)).std(dim=-1).softmax(dim=-1)  # (B, h, P-1, lag)

    score = (partition_score(keys) + partition_score(values)) / 2
    if not cross:
        score = score.argsort(dim=-1).argsort(dim=-1).to(torch.float32) / lag
    ones = torch.ones(b, h, 1, dtype=torch.float32, device=keys.device)
    return torch.cat([ones.expand(b, h, n_sink), score.reshape(b, h, -1), ones.expand(b, h, t - (end - lag))], dim=-1)


@register
@dataclass
class LagKV(Method):
    """Lag-relative min-max normalised std of keys and values, ranked within partitions of ``lag`` tokens.

    n_sink: sink tokens kept (4). lag: partition size (128). cross_scoring: keep the raw softmax scores, comparable
    across partitions (for head-wise allocations), instead of ranks.
    """

    n_sink: int = hp(4, ge=0)
    lag: int = hp(128, ge=1)
    cross_scoring: bool = False

    name = "lagkv"
    paper = "Liang et al. 2025, arXiv:2504.04704"
    needs = "keys, values"
    simplifications = (
        "none in the score (kvpress's LagKVPress); partitions in stream order; zero ranges divided by 1e-6"
    )

    def score(self, obs: Observation) -> torch.Tensor:
        b, h, t, _ = obs.keys.shape
        order = obs.stream_order()
        out = torch.empty(b, h, t, dtype=torch.float32, device=obs.keys.device)
        for row in range(b):  # padding (position -1) comes first in stream order: score the real tail only
            n_real = t if obs.valid is None else int(obs.valid[row, 0].sum())
            idx = order[row : row + 1, :, t - n_real :]
            keys = obs.keys[row : row + 1].gather(2, idx[..., None].expand(-1, -1, -1, obs.keys.shape[-1]))
            values = obs.values[row : row + 1].gather(2, idx[..., None].expand(-1, -1, -1, obs.values.shape[-1]))
            scores = lag_scores(keys, values, self.n_sink, self.lag, self.cross_scoring)
            out[row : row + 1].fill_(float("-inf"))
            out[row : row + 1].scatter_(-1, idx, scores)
        return out
