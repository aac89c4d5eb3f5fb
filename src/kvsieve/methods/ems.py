"""``ems``: Global-Local importance, then head-wise evict-then-merge with a zero class.

Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local
Importance" (2024).

- Global-Local score. The global score is attention accumulated over every query so far (biased to early tokens by
  the causal mask); the local score is the attention of the ``window`` most recent queries (biased to recent tokens).
  The global score is rescaled to the local score's mean (mean alignment) and a token's score is the larger of the
  two, so neither bias dominates. The ``window`` most recent tokens are always kept.
- Evict-then-merge, per head. The top ``budget`` tokens are kept and act as class centres. Of the tokens that do not
  fit, the highest-scoring ``merge_ratio`` share are to-be-merged (TBM) tokens and the rest are evicted outright.
  Each TBM token is assigned to the class centre it is most similar to, similarity being the product of the cosine
  similarities of keys and of values (redundancy shows in both; negative cosines count as 0, so a token opposite to a
  centre in both is not taken for a duplicate); below ``threshold`` it goes to the *zero class*.
  Centres absorb their TBM tokens as score-weighted averages: values are averaged, keys are averaged in direction and
  keep the centre's norm.
- Zero class: every TBM token of every head gets a target index, a real centre ``0..k-1`` or the extra index ``k``,
  which is a dummy centre dropped after the scatter. All heads therefore run the same tensor operations on tensors of
  the same shape (parallel, no per-head loop), while what they do differs: a redundant head merges most of its TBM
  tokens, a head without redundancy sends them to the zero class, i.e. evicts them. This is the head-wise adaptive
  choice between merging and eviction the paper builds on the zero class, and what is implemented here, with the
  core's ``merge`` hook (called with the kept tokens, before they are gathered).

Simplifications: the paper's head-wise budgets driven by attention sparsity are not included (every head keeps
``budget`` tokens; put ``adakv`` outside for head-wise budgets, which the core then applies without merging); the
local score is recomputed each pass from the ``window`` most recent queries, which are kept per layer; scores are per
KV head, averaged over the query heads of its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import AttentionRequest
from . import register
from .base import Method, Observation, hp, recent_mask, top_slots

GLOBAL, LOCAL = "ems_global", "ems_local"
QUERIES = "ems_queries"


@register
@dataclass
class EMS(Method):
    """Global-Local score; evicted tokens partly merged into their most similar kept token (zero class otherwise).

    window: recent queries for the local score, and recent tokens always kept. merge_ratio: share of the tokens that
    do not fit that are merged rather than evicted. threshold: similarity (cos of keys x cos of values) needed to merge.
    """

    window: int = hp(32, ge=1)
    merge_ratio: float = hp(0.5, ge=0.0, le=1.0)
    threshold: float = 0.5

    name = "ems"
    family = "eviction + merging"
    paper = "Li et al. 2024, arXiv:2412.08521"
    needs = "attention (all queries, every step) + recent queries"
    simplifications = (
        "no sparsity-driven head-wise budgets (every head keeps `budget`; `adakv:ems` gives head-wise budgets and still"
        " merges, per head); the local score is recomputed each pass from the `window` most recent queries kept per "
        "layer; negative key/value cosines count as 0 in the redundancy product; scores per KV head; zero class as a "
        "dummy centre that is dropped"
    )

    def attention_request(self, evicting: bool) -> AttentionRequest:
        return AttentionRequest(last=None)

    def observe(self, obs: Observation) -> None:
        glo = obs.state.get(GLOBAL)
        new = obs.attention_per_kv_head()
        obs.state[GLOBAL] = new if glo is None else glo + new
        obs.state[LOCAL] = self.local_scores(obs)

    def local_scores(self, obs: Observation) -> torch.Tensor:
        """Attention of the ``window`` most recent queries (kept across passes) over the held tokens: ``(B, h, T)``."""
        key = (QUERIES, obs.head_start)
        past_q, past_pos = obs.layer_state.get(key, (None, None))
        q_new = obs.queries.to(torch.float32)
        pos_new = obs.positions[:, :1, -obs.n_new :]  # (B, 1, q): query positions
        if past_q is not None and past_q.shape[:2] == q_new.shape[:2]:
            q_new, pos_new = torch.cat([past_q, q_new], dim=2), torch.cat([past_pos, pos_new], dim=2)
        q_win, pos_win = q_new[:, :, -self.window :], pos_new[:, :, -self.window :]
        obs.layer_state[key] = (q_win, pos_win)
        b, hq, w, d = q_win.shape
        h, t = obs.keys.shape[1], obs.keys.shape[2]
        g = hq // h
        logits = (q_win.reshape(b, h, g * w, d) @ obs.keys.to(torch.float32).transpose(-1, -2)).view(b, h, g, w, t)
        allowed = obs.positions[:, :, None, None, :] <= pos_win[:, :, None, :, None]  # causal, by position
        if obs.valid is not None:
            allowed = allowed & obs.valid[:, :, None, None, :]
        probs = (logits * obs.scaling).masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        return probs.sum(dim=3).mean(dim=2)

    def global_local(self, obs: Observation) -> torch.Tensor:
        """``max(global x mean(local) / mean(global), local)`` per token: ``(B, h, T)``."""
        glo, loc = obs.state[GLOBAL], obs.state[LOCAL]
        scale = loc.mean(dim=-1, keepdim=True) / glo.mean(dim=-1, keepdim=True).clamp(min=1e-12)
        return torch.maximum(glo * scale, loc)

    def score(self, obs: Observation) -> torch.Tensor:
        scores = self.global_local(obs)
        return scores.masked_fill(recent_mask(obs.positions, min(self.window, obs.budget)), float("inf"))

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fold the TBM tokens into the kept ``keep`` ``(B, h, k)``; returns the kept keys and values after merging."""
        scores = self.global_local(obs)
        b, h, t = scores.shape
        k = keep.shape[-1]
        n_tbm = int(self.merge_ratio * (t - k))
        if n_tbm == 0:
            return None
        kept = torch.zeros(b, h, t, dtype=torch.bool, device=keep.device).scatter_(2, keep, True)
        candidates = scores.masked_fill(kept, float("-inf"))
        if obs.valid is not None:
            candidates = candidates.masked_fill(~obs.valid, float("-inf"))
        tbm = top_slots(candidates, n_tbm)
        tbm_scores = candidates.gather(-1, tbm)
        real = torch.isfinite(tbm_scores)
        return evict_then_merge(
            obs.keys, obs.values, keep, scores.gather(2, keep), tbm, tbm_scores, real, self.threshold
        )


def evict_then_merge(
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor,
    keep_weights: torch.Tensor,
    tbm: torch.Tensor,
    tbm_weights: torch.Tensor,
    real: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge TBM tokens ``tbm`` ``(B, h, m)`` into centres ``keep`` ``(B, h, k)`` of ``keys``/``values``.

    ``keys``/``values``: ``(B, h, T, D)``. Target of a TBM token: its most similar centre (cos of keys x cos of values)
    if that similarity exceeds ``threshold``, else the zero class (index ``k``, dropped). ``real`` ``(B, h, m)`` marks
    TBM entries that exist (others go to the zero class). Weights are the tokens' scores. Returns the merged centres'
    keys and values ``(B, h, k, D)``.
    """
    d = keys.shape[-1]
    ck = keys.gather(2, keep[..., None].expand(-1, -1, -1, d)).to(torch.float32)
    cv = values.gather(2, keep[..., None].expand(-1, -1, -1, d)).to(torch.float32)
    mk = keys.gather(2, tbm[..., None].expand(-1, -1, -1, d)).to(torch.float32)
    mv = values.gather(2, tbm[..., None].expand(-1, -1, -1, d)).to(torch.float32)
    cos_k = F.normalize(mk, dim=-1) @ F.normalize(ck, dim=-1).transpose(-1, -2)  # (B, h, m, k)
    cos_v = F.normalize(mv, dim=-1) @ F.normalize(cv, dim=-1).transpose(-1, -2)
    sim = cos_k.clamp(min=0.0) * cos_v.clamp(min=0.0)  # opposite keys and values are not redundant
    best, nearest = sim.max(dim=-1)
    n_centres = keep.shape[-1]
    target = torch.where((best > threshold) & real, nearest, torch.full_like(nearest, n_centres))  # zero class = k
    w_c = keep_weights.to(torch.float32).clamp(min=0.0).nan_to_num(posinf=0.0)
    w_m = tbm_weights.to(torch.float32).clamp(min=0.0).nan_to_num(posinf=0.0, neginf=0.0)
    w_c = w_c + (w_c == 0) * 1e-6  # a centre never loses itself entirely
    b, h = target.shape[:2]
    slots = torch.zeros(b, h, n_centres + 1, d, dtype=torch.float32, device=keys.device)
    idx = target[..., None].expand(-1, -1, -1, d)
    v_sum = slots.scatter_add(2, idx, w_m[..., None] * mv)[:, :, :n_centres]
    u_sum = slots.scatter_add(2, idx, w_m[..., None] * F.normalize(mk, dim=-1))[:, :, :n_centres]
    w_sum = torch.zeros(b, h, n_centres + 1, dtype=torch.float32, device=keys.device)
    w_sum = w_sum.scatter_add(2, target, w_m)[:, :, :n_centres]
    total = (w_c + w_sum)[..., None]
    new_v = (w_c[..., None] * cv + v_sum) / total
    direction = F.normalize(w_c[..., None] * F.normalize(ck, dim=-1) + u_sum, dim=-1)
    new_k = direction * ck.norm(dim=-1, keepdim=True)
    merged = (w_sum > 0)[..., None]
    new_k = torch.where(merged, new_k, ck)  # untouched centres stay bit for bit
    new_v = torch.where(merged, new_v, cv)
    return new_k.to(keys.dtype), new_v.to(values.dtype)
