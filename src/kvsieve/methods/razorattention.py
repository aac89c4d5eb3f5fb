"""``razorattention``: full cache for retrieval heads; sinks, a recent window and a compensation token elsewhere.

Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads" (2024). Retrieval heads keep
every token. Every other head keeps the first ``n_sink`` tokens, the most recent ones, and one *compensation token*
whose key and value are the means of the keys and values it replaced (eq. 4); in attention it stands for all of them,
so its weight is multiplied by their number ``N_d`` (eq. 5), i.e. ``log N_d`` is added to its logit.

Here the compensation token occupies one kept slot (the oldest non-sink token at the first eviction; flagged in the
per-token state ``razor_slot``): :meth:`RazorAttention.merge` folds every dropped token into it as a running mean and
counts them in ``razor_count``; :meth:`RazorAttention.logit_bias` adds ``log razor_count`` to its logit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register
from .base import Observation, hp
from .families import HeadwiseRetention

SLOT = "razor_slot"
COUNT = "razor_count"


@register
@dataclass
class RazorAttention(HeadwiseRetention):
    """RazorAttention: retrieval heads full; other heads sinks + recent + one compensation token (mean of dropped).

    ratio: share of KV heads kept in full (top diagnosed retrieval scores). n_sink: sink tokens per streaming head.
    A streaming head holds exactly the sieve's budget: ``n_sink`` sinks, 1 compensation token, the rest recent.

    Simplifications: the paper finds retrieval heads with echo and induction scores on repeated random tokens and
    protects the top ~15% induction + 1% echo heads; here they are the heads with the highest diagnosed copy-paste
    retrieval scores (Wu et al. 2024), ``ratio`` of the KV heads (GQA: a KV head is a retrieval head if any of its
    query heads is). The paper keeps ``max(S0, N/C)`` recent tokens; here the recent window is the sieve's budget
    (``budget=N`` or ``compression=r``). The compensation token is built from keys as stored (RoPE applied at their
    own positions), like the paper's post-rotary cache. The benchmark's shared prefill cannot replay the compensation,
    so ``PrefillSnapshot.compress`` refuses this method and the bench gives it its own prefill.
    """

    ratio: float = hp(0.15, ge=0.0, le=1.0)

    name = "razorattention"
    simplifications = (
        "retrieval heads are the KV heads with the highest diagnosed copy-paste retrieval scores (`ratio` 0.15), not "
        "echo/induction scores; the recent window of the other heads is the sieve's budget, not max(S0, N/C); the "
        "compensation token is built from keys as stored; the shared prefill cannot replay its bias, so the bench "
        "prefills it on its own"
    )
    paper = "Tang et al. 2024, arXiv:2407.15891"
    extra_slots = 1

    def observe(self, obs: Observation) -> None:
        """Give every streaming head a compensation slot (its oldest non-sink real token) if it has none yet."""
        b, h, t = obs.positions.shape
        slot = obs.state.get(SLOT)
        if slot is None:
            slot = torch.zeros(b, h, t, dtype=torch.float32, device=obs.keys.device)
            obs.state[COUNT] = torch.zeros_like(slot)
        streaming = ~self.retrieval_heads(obs)
        need = streaming[None, :] & (slot.sum(-1) == 0)  # (B, h)
        if bool(need.any()):
            candidate = obs.positions >= self.n_sink
            if obs.valid is not None:
                candidate &= obs.valid
            oldest = torch.where(candidate, obs.positions, torch.iinfo(obs.positions.dtype).max).argmin(-1)
            mark = (need & candidate.any(-1)).to(slot.dtype)
            slot = torch.maximum(slot, torch.zeros_like(slot).scatter_(2, oldest[..., None], mark[..., None]))
        obs.state[SLOT] = slot

    def score(self, obs: Observation) -> torch.Tensor:
        scores = super().score(obs)
        return scores.masked_fill(obs.state[SLOT] > 0, float("inf"))

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fold the dropped tokens of each head into its compensation slot (running means); kept K/V, sorted."""
        keep = keep.sort(dim=-1).values
        b, h, t, d = obs.keys.shape
        dropped = torch.ones(b, h, t, dtype=torch.bool, device=keep.device).scatter_(2, keep, False)
        if obs.valid is not None:
            dropped &= obs.valid
        n_dropped = dropped.sum(-1)  # (B, h)
        if not bool(n_dropped.any()):
            return None
        slot_flags = obs.state[SLOT]
        has_slot = slot_flags.sum(-1) > 0
        if bool((n_dropped.bool() & ~has_slot).any()):
            raise RuntimeError("razorattention dropped tokens from a head without a compensation slot")
        slot = slot_flags.argmax(-1)  # (B, h)
        count = obs.state[COUNT]
        n_old = count.gather(2, slot[..., None])[..., 0].clamp(min=1.0)  # the slot's own token counts once
        weight = dropped.to(obs.keys.dtype)
        new = []
        for tensor in (obs.keys, obs.values):
            total = torch.einsum("bht,bhtd->bhd", weight, tensor)
            current = tensor.gather(2, slot[..., None, None].expand(b, h, 1, d))[:, :, 0]
            mean = (current * n_old[..., None] + total) / (n_old + n_dropped)[..., None]
            mean = torch.where(n_dropped[..., None] > 0, mean, current)
            updated = tensor.scatter(2, slot[..., None, None].expand(b, h, 1, d), mean[:, :, None])
            new.append(updated.gather(2, keep[..., None].expand(-1, -1, -1, d)))
        unchanged = count.gather(2, slot[..., None])[..., 0]
        merged = torch.where(n_dropped > 0, n_old + n_dropped.to(count.dtype), unchanged)
        count.scatter_(2, slot[..., None], merged[..., None])  # in place: also right for a per-head view
        return new[0], new[1]

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        """``log N_d`` on each compensation token's logit (``N_d`` tokens merged into it), for every query head."""
        count = obs.state.get(COUNT)
        if count is None or not bool((count > 1).any()):
            return None
        bias = torch.log(count.clamp(min=1.0)).repeat_interleave(obs.group_size, dim=1)  # (B, Hq, T)
        b, hq, t = bias.shape
        return bias[:, :, None, :].expand(b, hq, obs.n_new, t)
