"""``simlayerkv``: StreamingLLM on "lazy" layers, every token on the others.

Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction" (2024). A layer is *lazy* when its
last queries put most of their attention on the initial tokens and the recent ones: such a layer loses little when
it keeps only those. At each prefill pass, the attention of the last ``n_last`` queries (averaged over query heads and
queries) on the ``n_initial`` oldest and the most recent tokens is summed; above ``threshold`` the layer is lazy and
keeps the ``n_initial`` sinks plus the most recent tokens, ``budget`` in all; otherwise it keeps everything. The
decision stands for the decoding steps that follow (kvpress's ``SimLayerKVPress``, SLKV-decode: ``n_last=1``).

The sieve's budget is the size of a lazy layer: ``budget = n_initial + n_recent`` (kvpress's ``n_recent`` recent
tokens; kvpress keeps ``n_recent - n_last`` of them), or ``compression=r``: a lazy layer keeps ``seen x (1 - r)``.
The share of recent tokens the laziness test sums over is the lazy layer's, ``budget - n_initial``, the newest token
(the query's own) included; kvpress's test reuses SnapKV's window helper, which leaves the querying token's key out
and sums the ``n_recent`` tokens before it, so near the threshold the two can decide differently (kvpress's test
leaves out the often large self-attention weight: fewer layers lazy).

Simplifications: batch size 1 (laziness is decided per sequence); a layer decided lazy in an earlier prefill chunk is
re-decided at each prefill pass; tokens are not re-indexed (original positions, as kvpress).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from . import register
from .base import LayerContext, Method, Observation, check_sinks_fit, hp

LAZY = "simlayerkv_lazy"


@register
@dataclass
class SimLayerKV(Method):
    """Lazy layers (attention concentrated on sinks and recent tokens) keep sinks + recent; others keep all.

    threshold: attention share above which a layer is lazy (kvpress recommends 0.9 for Llama 3, 0.65 Llama 2, 0.8
    Mistral, 0.85 Qwen; 1.0 never compresses). n_last: queries that decide. n_initial: sink tokens kept.
    """

    threshold: float = hp(0.9, ge=0.0, le=1.0)
    n_last: int = hp(1, ge=1)
    n_initial: int = hp(4, ge=0)

    name = "simlayerkv"
    family = "layer-wise"
    paper = "Zhang et al. 2024, arXiv:2410.13846"
    needs = "attention of the last queries, positions"
    simplifications = (
        "the lazy layer's size is the sieve's budget (n_initial sinks + recent tokens); laziness re-decided at each "
        "prefill pass and kept for decoding; the laziness test counts the query's own token among the recent ones "
        "(kvpress's leaves it out); original positions; batch size 1"
    )
    batch = "single"

    def check_budget(self, tokens: int) -> None:
        check_sinks_fit(tokens, self.n_initial, self.name)

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=self.n_last) if evicting else None

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        # a layer found busy keeps what it has seen; undecided layers are decided at their next eviction
        return max(budget, ctx.seen) if ctx.layer_state.get(LAZY) is False else budget

    def lazy(self, obs: Observation) -> bool:
        """kvpress's test: mean attention of the last queries on the initial + recent tokens above ``threshold``."""
        n = min(self.n_last, obs.n_new)
        share = obs.attention.sum(dim=(0, 1)) / (obs.attention.shape[0] * obs.attention.shape[1] * n)  # (T,)
        positions = obs.positions[0, 0]
        order = positions.argsort(stable=True)
        if obs.valid is not None:
            order = order[obs.valid[0, 0][order]]
        recent = max(0, obs.budget - self.n_initial)
        picked = torch.zeros_like(share, dtype=torch.bool)
        picked[order[: self.n_initial]] = True
        if recent:
            picked[order[-recent:]] = True
        return float(share[picked].sum()) > self.threshold

    def score(self, obs: Observation) -> torch.Tensor:
        check_sinks_fit(obs.budget, self.n_initial, self.name)
        if obs.n_new > 1 or LAZY not in obs.layer_state:
            obs.layer_state[LAZY] = self.lazy(obs)
        if not obs.layer_state[LAZY]:
            return torch.full(obs.positions.shape, float("inf"), device=obs.positions.device)
        scores = obs.positions.to(torch.float32)
        return scores.masked_fill(obs.positions < self.n_initial, float("inf"))  # the sinks, then the newest

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        if ctx.layer_state.get(LAZY) is False:  # a busy layer keeps every token
            return [torch.arange(s.shape[-1], device=s.device).expand(s.shape).contiguous() for s in scores]
        return super().select(scores, budget, ctx)
