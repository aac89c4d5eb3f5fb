"""``cam``: Cache Merging: evicted values are merged into the kept tokens that follow them, with a probability.

Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference" (ICML 2024), as kvpress's ``CAMPress``. Tokens
are evicted by the wrapped method's scores averaged over the layer's KV heads (the same tokens in every head). Each
evicted token ``i`` is then merged into the ``merge_budget`` kept tokens that follow it in the stream: with
probability ``p_i = clamp(A_i / mean(A_window), 0, 1)``, where ``A`` is each token's attention accumulated over the
decoding steps so far, ``v_i / m`` is added to the value of each of the ``m`` tokens of its window (fewer at the
end). Keys are unchanged. Decoding-time compression is the sieve's periodic budget (``Sieve(..., budget=N,
interval=k)``, kvpress's ``compression_interval``/``target_size``); ``interval=1`` is the paper's per-step CaM.

Accumulated attention starts at the first decoding step (as kvpress, which resets it at each prefill), so an eviction
at a prefill pass merges nothing. The Bernoulli draws come from a generator seeded by ``(seed, layer, newest
position)``: the same run gives the same cache.

Simplifications: kvpress merges only the evicted tokens among the ``k`` highest-scored, ``k`` the tokens added since
the last compression; under a token budget each compression evicts at most that many, so every evicted token is a
candidate and that restriction is not applied; attention averaged over the query heads of each KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from ..errors import KVSieveError
from . import register
from .base import Method, Observation, Wrapper, hp, overrides
from .merging import evicted_slots

ATTN = "cam_attention"


@register
@dataclass
class CaM(Wrapper):
    """Wraps ``inner``: evicts by its head-averaged scores, merging each evicted value into the kept tokens after it.

    merge_budget: kept tokens each evicted value is spread over (kvpress: 32). seed: seeds the merge draws.
    """

    merge_budget: int = hp(32, ge=1)
    seed: int = 0

    name = "cam"
    family = "merging"
    paper = "Zhang et al. 2024, ICML (CaM: Cache Merging)"
    needs = "the wrapped method's scores + attention at every decoding step"
    simplifications = (
        "kvpress's CAMPress; every evicted token is a merge candidate (kvpress: the k best, k = tokens since the "
        "last compression, which is all of them under a token budget); attention averaged over the GQA group"
    )
    own_kind = "evict"

    def validate(self) -> None:
        if self.inner is None:
            raise KVSieveError("cam merges what a scorer evicts: write cam:<method>, e.g. cam:snapkv")

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        if overrides(inner, "merge") or overrides(inner, "select"):
            raise KVSieveError(
                f"cam evicts the same tokens in every head and merges them; wrap a scorer, not {inner.spec()}"
            )

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        request = self._in.attention_request(evicting)
        return request if request is not None else AttentionRequest(last=1)

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.n_new != 1 or obs.attention is None:
            return  # accumulated over decoding steps only (kvpress resets it at the prefill)
        acc = obs.state.get(ATTN)
        step = obs.attention_per_kv_head()
        obs.state[ATTN] = step if acc is None or acc.shape != step.shape else acc + step

    def score(self, obs: Observation) -> torch.Tensor:
        scores = self._in.score(obs).to(torch.float32)
        return scores.mean(dim=1, keepdim=True).expand_as(scores).contiguous()

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        ev, real = evicted_slots(keep, obs.keys.shape[2], obs.valid)
        if ev.shape[-1] == 0:
            return None
        d = obs.values.shape[-1]
        kept_keys = obs.keys.gather(2, keep[..., None].expand(*keep.shape, d))
        kept_values = obs.values.gather(2, keep[..., None].expand(*keep.shape, d)).float()
        acc = obs.state.get(ATTN)
        if acc is None:
            return None  # no decoding step yet: nothing to merge by
        for b in range(keep.shape[0]):
            newest = int(obs.positions[b].max())
            gen = torch.Generator(device="cpu").manual_seed(
                hash((self.seed, obs.layer_idx, obs.head_start, newest)) & 0x7FFFFFFF
            )
            kept_values[b] += cam_contributions(
                obs.positions[b], obs.values[b].float(), acc[b], keep[b], ev[b], real[b], self.merge_budget, gen
            )
        return kept_keys, kept_values.to(obs.values.dtype)


def cam_contributions(
    positions: torch.Tensor,
    values: torch.Tensor,
    attention: torch.Tensor,
    keep: torch.Tensor,
    evicted: torch.Tensor,
    real: torch.Tensor,
    merge_budget: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """What each kept token's value gains, ``(h, k, D)``, for one batch row.

    positions/attention ``(h, T)``, values ``(h, T, D)``, keep ``(h, k)`` and evicted ``(h, m)`` slots, real ``(h, m)``
    flags of the evicted entries.
    """
    h, k = keep.shape
    kept_pos = positions.gather(1, keep)
    order = kept_pos.argsort(dim=-1, stable=True)  # kept tokens in stream order
    sorted_pos = kept_pos.gather(1, order)
    ev_pos = positions.gather(1, evicted)
    start = torch.searchsorted(sorted_pos.contiguous(), ev_pos.contiguous(), right=True)  # first kept token after
    window = start[..., None] + torch.arange(merge_budget, device=keep.device)  # (h, m, M) indices into sorted
    inside = window < k
    window = window.clamp(max=k - 1)
    targets = order.gather(1, window.flatten(1)).view_as(window)  # (h, m, M) indices into keep
    count = inside.sum(dim=-1)  # (h, m)
    kept_attn = attention.gather(1, keep)  # (h, k)
    window_attn = (kept_attn.gather(1, targets.flatten(1)).view_as(targets) * inside).sum(dim=-1)
    mean_attn = window_attn / count.clamp(min=1)
    prob = attention.gather(1, evicted) / mean_attn
    prob = torch.where(torch.isnan(prob), torch.zeros_like(prob), prob)
    prob = torch.where(torch.isinf(prob), torch.ones_like(prob), prob).clamp(0.0, 1.0)
    draw = torch.bernoulli(prob.cpu(), generator=gen).to(prob.device) * real
    scale = torch.where(count > 0, draw / count.clamp(min=1), torch.zeros_like(draw))  # (h, m)
    ev_values = values.gather(1, evicted[..., None].expand(*evicted.shape, values.shape[-1]))  # (h, m, D)
    contrib = (ev_values * scale[..., None])[:, :, None, :] * inside[..., None]  # (h, m, M, D)
    out = torch.zeros(h, k, values.shape[-1], dtype=torch.float32, device=values.device)
    out.scatter_add_(1, targets.flatten(1)[..., None].expand(-1, -1, values.shape[-1]),
                     contrib.reshape(h, -1, values.shape[-1]))  # fmt: skip
    return out
