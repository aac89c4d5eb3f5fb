"""``dms``: evict by a score threshold instead of a budget, outside a sliding window of recent tokens.

After Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression" (Dynamic Memory Sparsification, 2025),
as kvpress's ``DMSPress``: the wrapped method scores each token once, when it enters the cache; the ``window`` most
recent tokens are protected; a token that leaves the window with a score below ``threshold`` is evicted, in its own
head. How much is evicted depends on the content, not on a budget.

With ``Sieve("dms(threshold=t):knorm", compression=0.0)`` this is kvpress's press at the prefill (decoding appends,
``decoding=False``). A token budget adds decoding-time eviction (kvpress's ``decoding=True``): each eviction of
``Sieve(..., budget=N)`` drops the tokens past the window below the threshold, and the budget ``N`` (or a ratio) also
caps what a head may keep: above it, the lowest-scored tokens go too (so ``threshold`` very low gives the wrapped
method under that budget). Heads keep different numbers of tokens (per-head storage, real memory saved).

Departures from the paper: DMS trains per-head eviction decisions (and delays them); here, as in kvpress, the scores
are a training-free scorer's. From kvpress: a token's score is computed by the wrapped method over the whole cache in
the pass it enters (kvpress scores the new keys alone); batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..attention import AttentionRequest
from ..errors import KVSieveError
from . import register
from .base import LayerContext, Method, Observation, Wrapper, hp, recent_mask, top_slots

SCORES = "dms_scores"
CAP = "dms_cap"


@register
@dataclass
class DMS(Wrapper):
    """Wraps ``inner``: tokens past the recent ``window`` whose score (frozen at arrival) is below ``threshold`` go.

    threshold: the score a token needs to stay (depends on the scorer; required). window: recent tokens protected
    (kvpress: 128).
    """

    threshold: float | None = None
    window: int = hp(128, ge=0)

    name = "dms"
    family = "threshold"
    paper = "Łańcucki et al. 2025, arXiv:2506.05345 (kvpress DMSPress)"
    needs = "the wrapped method's scores (once per token)"
    simplifications = (
        "training-free scorer instead of DMS's trained eviction decisions (as kvpress); a token's score is frozen when "
        "it enters the cache, computed over the whole cache; the sieve's budget caps a head (compression=0: no cap); "
        "batch size 1"
    )
    own_kind = "evict"
    batch = "single"

    def validate(self) -> None:
        if self.inner is None:
            raise KVSieveError("dms evicts by a scorer's threshold: write dms(threshold=T):<method>, e.g. :knorm")
        if self.threshold is None:
            raise KVSieveError("dms needs a threshold (its scale depends on the scorer): dms(threshold=-1.5):knorm")

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        if inner.rerotate:
            raise KVSieveError("dms gives heads different lengths, which position re-rotation cannot index")

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return self._in.attention_request(True)  # every pass scores its new tokens

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        # a fixed budget (every held token): the frozen score must not depend on the sieve's budget
        fresh = self._in.score(replace(obs, budget=obs.keys.shape[2]))[..., -obs.n_new :].to(torch.float32)
        frozen = obs.state.get(SCORES)
        if frozen is None or frozen.shape[-1] != obs.keys.shape[2]:
            frozen = torch.zeros(obs.keys.shape[:3], dtype=torch.float32, device=obs.keys.device)
        frozen[..., -obs.n_new :] = fresh
        obs.state[SCORES] = frozen

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        cap = self._in.layer_budget(budget, ctx)
        ctx.layer_state[CAP] = cap  # select keeps up to the cap; eviction is due once the window is exceeded
        return max(1, min(cap, self.window))

    def score(self, obs: Observation) -> torch.Tensor:
        frozen = obs.state[SCORES]
        return frozen.masked_fill(recent_mask(obs.positions, self.window), float("inf"))

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """Per KV head: the window and every token at or above the threshold, at most the cap (best first)."""
        cap = max(budget, ctx.layer_state.get(CAP, budget))
        out = []
        for s in scores:
            if s.shape[0] != 1:
                raise KVSieveError("dms decides per head for one sequence at a time; use batch size 1")
            for h in range(s.shape[1]):
                row = s[:, h : h + 1]
                n = int((row >= self.threshold).sum())
                out.append(top_slots(row, max(1, min(n, cap))).sort(dim=-1).values)
        return out
