"""``critical_adakv``: AdaKV's head-wise budgets with CriticalKV's two-stage, output-aware selection.

Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective" (CriticalKV,
2025), combined with Ada-KV (Feng et al. 2024) as in kvpress's ``CriticalAdaKVPress``:

1. **Budgets** (AdaKV): every head first keeps its ``alpha_safeguard`` share of the per-head budget (its best tokens);
   the layer's ``budget x heads`` tokens then go to the best scores across all heads, which sets each head's budget
   ``B_h``.
2. **Stage 1**: each head keeps its ``first_stage_ratio x B_h`` best tokens by the wrapped method's scores.
3. **Stage 2**: the rest of ``B_h`` goes to the best of ``(score + epsilon) x |W_o v|_1``: a value's contribution to
   the layer's output is its projection by the output matrix, so a token whose value projects small perturbs the
   output little when evicted. ``|W_o v|_1`` is computed per query head and averaged over the heads sharing the KV
   head.

Heads hold tensors of different lengths (real memory saved, as ``adakv``). ``|W_o v|_1`` is computed once per token
when it enters the cache (``observe``) and kept as per-token state.

Limits: batch size 1; the wrapped method must keep original positions; a live model is needed (the layer's
``o_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .adakv import _boost
from .base import LayerContext, Method, Observation, Wrapper, hp, overrides, top_slots

WOV = "critical_wov"


def projected_value_norms(values: torch.Tensor, o_proj: torch.Tensor, head_start: int, groups: int) -> torch.Tensor:
    """``|W_o^(q) v|_1`` averaged over the ``groups`` query heads of each KV head: ``(B, h, T)``.

    values ``(B, h, T, D)``; ``o_proj``: the layer's output projection weight ``(hidden, Hq * D)``; ``head_start``: the
    first KV head of ``values`` in the layer.
    """
    b, h, t, d = values.shape
    w = o_proj.t().reshape(-1, d, o_proj.shape[0])  # (Hq, D, hidden)
    out = torch.zeros(b, h, t, dtype=torch.float32, device=values.device)
    for j in range(h):
        for i in range(groups):  # per query head, so the (T, hidden) product is never held for all heads at once
            q_head = (head_start + j) * groups + i
            out[:, j] += (values[:, j].to(w.dtype) @ w[q_head]).abs().sum(dim=-1).float()
    return out / groups


@register
@dataclass
class CriticalAdaKV(Wrapper):
    """Wraps ``inner``: AdaKV budgets across heads, then two-stage selection by score and by ``|W_o v|_1``.

    alpha_safeguard: share of the per-head budget every head keeps (kvpress: 0.2). epsilon: added to scores before the
    rescaling (kvpress: 1e-4). first_stage_ratio: share of a head's budget chosen by score alone (kvpress: 0.5).
    """

    alpha_safeguard: float = hp(0.2, ge=0.0, le=1.0)
    epsilon: float = hp(1e-4, ge=0.0)
    first_stage_ratio: float = hp(0.5, ge=0.0, le=1.0)

    name = "critical_adakv"
    family = "budget wrapper"
    paper = "Feng et al. 2025, arXiv:2502.03805 (with Ada-KV, arXiv:2407.11550)"
    needs = "the wrapped method's needs + values and the output projection"
    simplifications = (
        "kvpress's CriticalAdaKVPress; |W_o v|_1 computed once per token as it enters the cache; batch size 1"
    )
    own_kind = "evict"
    batch = "single"

    def validate(self) -> None:
        if self.inner is None:
            raise KVSieveError(
                "critical_adakv wraps a scorer: write critical_adakv:<method>, e.g. critical_adakv:snapkv"
            )

    def _check_inner(self, inner: Method) -> None:
        if overrides(inner, "reads"):
            raise KVSieveError(
                f"critical_adakv allocates what an evicting method keeps; {inner.spec()} selects reads instead"
            )
        super()._check_inner(inner)
        if inner.rerotate:
            raise KVSieveError(
                "critical_adakv gives heads different lengths, which position re-rotation cannot index; wrap a "
                "method that keeps original positions"
            )

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        if obs.module is None:
            return
        new = obs.values[:, :, -obs.n_new :]
        norms = projected_value_norms(new, obs.module.o_proj.weight.detach(), obs.head_start, obs.group_size)
        state = obs.state.get(WOV)
        if state is None or state.shape[-1] != obs.values.shape[2]:
            state = torch.zeros(obs.values.shape[:3], dtype=torch.float32, device=obs.values.device)
        state[..., -obs.n_new :] = norms
        obs.state[WOV] = state

    def score(self, obs: Observation) -> torch.Tensor:
        scores = self._in.score(obs)
        wov = obs.state.get(WOV)
        if wov is None:
            raise KVSieveError(
                "critical_adakv needs the layer's output projection while tokens enter the cache; run it on a live "
                "model (this pass had no attention module)"
            )
        # the select hook sees scores only: hand it this segment's projected norms through the layer's run state
        obs.layer_state[(WOV, obs.head_start)] = wov
        return scores

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """One ``(1, 1, k_h)`` index tensor per KV head, the ``k_h`` summing to ``budget x heads``."""
        if scores[0].shape[0] != 1:
            raise KVSieveError("critical_adakv allocates budgets per head for one sequence at a time; use batch size 1")
        per_head, norms = [], []
        start = 0
        for s in scores:
            wov = ctx.layer_state.pop((WOV, start), None)
            for h in range(s.shape[1]):
                per_head.append(s[0, h].to(torch.float32))
                norms.append(wov[0, h] if wov is not None else torch.ones_like(per_head[-1]))
            start += s.shape[1]
        return [k.view(1, 1, -1) for k in critical_ada_select(per_head, norms, budget, self.alpha_safeguard,
                                                              self.epsilon, self.first_stage_ratio)]  # fmt: skip


def critical_ada_select(
    scores: list[torch.Tensor], norms: list[torch.Tensor], budget: int, alpha: float, epsilon: float, first: float
) -> list[torch.Tensor]:
    """Sorted slots kept by each head (scores and norms: one ``(T_h,)`` tensor per head)."""
    n_safe = int(budget * alpha)
    if alpha > 0:
        n_safe = max(1, n_safe)
    boosted, safe = [], []
    for s in scores:
        s = s.clone()
        top = top_slots(s[None], n_safe)[0]
        if n_safe:
            s[top] = s[top] + _boost(s)  # a finite boost above every real score, order kept among the boosted
        boosted.append(s)
        safe.append(top)
    flat = torch.cat(boosted)
    chosen = top_slots(flat[None], budget * len(scores))[0]
    bounds = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)
    out = []
    for h, (s, wov) in enumerate(zip(boosted, norms, strict=True)):
        head_budget = int(((chosen >= bounds[h]) & (chosen < bounds[h + 1])).sum())
        stage1 = top_slots(s[None], int(head_budget * first))[0]
        second = (s + epsilon) * wov.to(s.dtype)
        second[stage1] = float("inf")  # stage 1 stays, and so does the safeguard (kvpress sets both to the max)
        second[safe[h]] = float("inf")
        out.append(top_slots(second[None], head_budget)[0].sort().values)
    return out
