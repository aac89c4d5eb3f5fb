"""``taskkv``: heterogeneous heads (far from the layer's semantic centre) keep everything; the others keep sinks,
recent tokens and middle activations.

He, Liu and Chen, "Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads" (2025,
arXiv:2501.15113). Heads whose output lies far from the *semantic centre* of all heads (*heterogeneous* heads) carry
the task's semantics and keep the full cache; the other heads aggregate and focus, and keep a few attention sinks, the
most recent tokens, and *middle activations*: the tokens of the middle of the context that the prompt's last queries
attend to most. The classification is per input (task-aware), not a fixed profile.

Here, per layer and at the layer's first pass (the prompt, or the first chunk of a chunked prefill): a query head's
*semantic vector* is its attention output over the last ``window`` prompt queries, written into the residual stream
by its slice of ``W_o`` and averaged over those queries; the semantic centre is the mean of the layer's semantic
vectors; a KV head's distance is the largest distance of its query heads to the centre (``distance``: Euclidean or
cosine). The ``round(ratio x KV heads)`` farthest KV heads of the layer are heterogeneous (the *semantic separator*).
Each other head keeps ``n_sink`` sinks, ``middle`` of the rest of its budget as middle activations (the tokens with the
most attention from the last ``window`` queries, mean over the group) and the most recent tokens for the remainder.
The sieve's budget is what a non-heterogeneous head holds; storage is per KV head, so the memory saved is real.

Simplifications: only the abstract of the paper was available here; the semantic vector (the W_o-projected head
output over the last ``window`` queries), the distance (Euclidean by default), the per-layer share ``ratio`` and the
middle activations (attention votes of the last ``window`` queries, SnapKV-like) are this implementation's reading of
it. Heads are classified once per layer, at its first pass; decoding keeps that classification. Batch size 1 (each
input has its own heterogeneous heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from ..errors import KVSieveError
from . import register
from .base import LayerContext, Method, Observation, check_sinks_fit, hp, recent_mask
from .families import HeadwiseRetention

HEADS = "taskkv_heterogeneous"  # in layer_state: (H_kv,) bool, from the layer's first pass


@register
@dataclass
class TaskKV(Method):
    """Heterogeneous heads (far from the semantic centre) keep all; others sinks + middle activations + recent.

    ratio: share of each layer's KV heads classified heterogeneous (0.25). window: prompt queries whose outputs and
    attention are used (32). n_sink: sink tokens (4). middle: share of a non-heterogeneous head's budget (after the
    sinks) given to middle activations (0.5). distance: ``"euclidean"`` or ``"cosine"`` to the semantic centre.
    """

    ratio: float = hp(0.25, ge=0.0, le=1.0)
    window: int = hp(32, ge=1)
    n_sink: int = hp(4, ge=0)
    middle: float = hp(0.5, ge=0.0, lt=1.0)
    distance: str = hp("euclidean", choices=("euclidean", "cosine"))

    name = "taskkv"
    family = "head-wise"
    batch = "single"  # heads are classified per input, so two rows of a batch would split heads differently
    paper = "He et al. 2025, arXiv:2501.15113"
    needs = "attention outputs and W_o at the prompt (per input), attention (window), positions"
    simplifications = (
        "from the abstract: semantic vector = W_o-projected head output over the last `window` prompt queries, "
        "Euclidean distance to the layer's mean, top `ratio` of each layer's KV heads heterogeneous; middle "
        "activations = most-attended tokens of the last `window` queries; heads classified once at the first pass; "
        "batch size 1"
    )

    def check_budget(self, tokens: int) -> None:
        check_sinks_fit(tokens, self.n_sink, self.name)

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=self.window) if evicting else None

    def observe(self, obs: Observation) -> None:
        """At the layer's first pass: classify its KV heads (stored per layer, kept for decoding)."""
        if HEADS in obs.layer_state or obs.head_start != 0:
            return
        if obs.module is None or not hasattr(obs.module, "o_proj"):
            raise KVSieveError("taskkv reads the layer's output projection (o_proj), which this model lacks")
        distances = head_distances(obs, obs.module.o_proj.weight, self.window, self.distance)  # (h,)
        n_het = round(self.ratio * distances.shape[0])
        heterogeneous = torch.zeros_like(distances, dtype=torch.bool)
        if n_het > 0:
            heterogeneous[distances.topk(n_het).indices] = True
        obs.layer_state[HEADS] = heterogeneous

    def heterogeneous(self, obs: Observation) -> torch.Tensor:
        """``(h,)`` bool for this segment's KV heads."""
        flags = obs.layer_state.get(HEADS)
        h = obs.keys.shape[1]
        if flags is None:
            return torch.zeros(h, dtype=torch.bool, device=obs.keys.device)
        return flags[obs.head_start : obs.head_start + h].to(obs.keys.device)

    def score(self, obs: Observation) -> torch.Tensor:
        """+inf for a heterogeneous head's tokens and for sinks; recent tokens above middle activations (votes)."""
        check_sinks_fit(obs.budget, self.n_sink, self.name)
        rest = obs.budget - self.n_sink
        n_recent = max(1, rest - int(self.middle * rest))
        votes = obs.attention_per_kv_head().to(torch.float32)  # (B, h, T), in [0, window]
        scores = votes.masked_fill(recent_mask(obs.positions, n_recent), float(self.window) + 1.0)
        scores = scores.masked_fill(obs.positions < self.n_sink, float("inf"))
        return scores.masked_fill(self.heterogeneous(obs)[None, :, None], float("inf"))

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """A heterogeneous head (all scores infinite) keeps every token; the others their top ``budget``."""
        return HeadwiseRetention.select(self, scores, budget, ctx)  # type: ignore[arg-type]


def head_distances(obs: Observation, o_proj: torch.Tensor, window: int, distance: str) -> torch.Tensor:
    """Per KV head of ``obs``: the largest distance of its query heads' semantic vectors to the layer's centre.

    Semantic vector of query head ``j``: ``mean_i (softmax(q_ij K^T / sqrt d) V) W_o[:, j]^T`` over the last
    ``window`` new queries ``i`` (causal, by position; batch size 1); centre: their mean over the heads.
    """
    b, h, _, d = obs.keys.shape
    g = obs.group_size
    w = min(window, obs.n_new)
    q = obs.queries[:, :, -w:].to(torch.float32).reshape(b, h, g, w, d)
    logits = q @ obs.keys.to(torch.float32)[:, :, None].transpose(-1, -2) * obs.scaling  # (B, h, g, w, T)
    q_pos = obs.positions[..., -w:]  # (B, h, w)
    allowed = obs.positions[:, :, None, :] <= q_pos[..., None]  # (B, h, w, T)
    if obs.valid is not None:
        allowed = allowed & obs.valid[:, :, None, :]
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    out = logits.softmax(dim=-1) @ obs.values.to(torch.float32)[:, :, None]  # (B, h, g, w, D)
    hq0 = obs.head_start * g
    weight = o_proj.view(o_proj.shape[0], -1, d)[:, hq0 : hq0 + h * g].to(torch.float32)  # (hidden, h*g, D)
    weight = weight.reshape(o_proj.shape[0], h, g, d)
    vectors = torch.einsum("bhgwd,jhgd->hgj", out, weight) / (b * w)  # (h, g, hidden)
    flat = vectors.reshape(h * g, -1)
    centre = flat.mean(dim=0, keepdim=True)
    if distance == "cosine":
        dist = 1.0 - torch.nn.functional.cosine_similarity(flat, centre, dim=-1)
    else:
        dist = (flat - centre).norm(dim=-1)
    return dist.view(h, g).amax(dim=1)
