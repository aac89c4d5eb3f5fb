"""``compresskv``: tokens chosen by semantic retrieval heads only, with per-layer budgets from measured eviction error.

Lin et al., "CompressKV: Semantic Retrieval Heads Know What Tokens are Not Important Before Generation" (2025).

- Scoring: in GQA models every query head votes in SnapKV-style scoring, although most heads are not about retrieving
  content. CompressKV lets only each layer's ``n_heads`` *semantic retrieval heads* (SRH) vote: the attention of the
  last ``window`` queries, pooled over ``kernel`` neighbours, averaged over those heads, shared by all KV heads of the
  layer (as the authors' code does); the window itself is kept.
- SRH are found offline, as heads that attend to a needle's span while the model reproduces it (the span, not only
  the copied token: "semantic" retrieval). :func:`calibrate` does this with a needle inserted into a calibration prompt
  and copied under teacher forcing.
- Layer budgets: :func:`calibrate` then runs the scorer at the target compression and measures, per layer, the
  relative Frobenius error of the attention output with the compressed cache against the full one over a few
  decoding steps; budgets are allocated in proportion to that error (at least ``min_tokens``, at most ``max_factor``
  times the mean budget, summing to ``layers x budget``), as the authors' ``error_aware_layer_budget_allocation``.

Calibrated parameters go into the spec: ``compresskv(heads=((3, 7), ...), layer_weights=(0.02, ...))``.

Simplifications: without calibration (``heads=None``) the SRH of a layer are chosen online, per pass, as the heads whose
window attention puts the most mass outside the first ``n_sink`` tokens and the window itself (heads that retrieve
from the body of the text rather than attend to sinks or locally), and budgets are uniform; the eviction error is
measured on the attention output before the output projection, on a calibration prompt of the caller's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import AttentionRequest
from ..compat import cache_kwargs
from ..errors import KVSieveError
from . import register
from .base import LayerContext, Method, Observation, hp, pool_in_stream_order, recent_mask

KEPT = "compresskv_kept"


@register
@dataclass
class CompressKV(Method):
    """SnapKV-style votes of the semantic retrieval heads only; error-aware layer budgets when calibrated.

    window, kernel: observation window and pooling size (the authors: 8 and 5). n_heads: SRH per layer (4). heads:
    calibrated SRH (query-head indices) per layer, or None for online selection. layer_weights: calibrated per-layer
    error shares, or None for uniform budgets. min_tokens, max_factor: bounds of a layer's budget (32 and 3x).
    n_sink: leading tokens ignored when choosing heads online.
    """

    window: int = hp(8, ge=1)
    kernel: int = hp(5, ge=1, odd=True)
    n_heads: int = hp(4, ge=1)
    heads: tuple | None = None
    layer_weights: tuple | None = None
    min_tokens: int = hp(32, ge=1)
    max_factor: float = hp(3.0, ge=1.0)
    n_sink: int = hp(4, ge=0)

    name = "compresskv"
    paper = "Lin et al. 2025, arXiv:2508.02401"
    needs = "attention (observation window), per query head"
    simplifications = (
        "semantic retrieval heads and per-layer budgets come from `compresskv.calibrate(model, ids)`; without "
        "calibration, heads are chosen online per pass (most window attention outside sinks and the window) and budgets"
        " are uniform"
    )

    def validate(self) -> None:
        if self.layer_weights is not None and (min(self.layer_weights) < 0 or sum(self.layer_weights) <= 0):
            raise KVSieveError("layer_weights must be non-negative shares with a positive sum (from calibrate())")

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return AttentionRequest(last=self.window) if evicting else None

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        n_layers = ctx.n_layers
        if self.layer_weights is None:
            return budget
        if len(self.layer_weights) != n_layers:
            raise KVSieveError(
                f"compresskv was calibrated for {len(self.layer_weights)} layers, this model has "
                f"{n_layers}; run compresskv.calibrate on this model"
            )
        budgets = error_aware_budgets(
            self.layer_weights, budget, min(self.min_tokens, budget), max(budget, int(self.max_factor * budget))
        )
        return budgets[ctx.layer_idx]

    def retrieval_heads(self, obs: Observation) -> torch.Tensor:
        """Indices of this segment's query heads that vote, ``(n,)``."""
        hq = obs.queries.shape[1]
        first = obs.head_start * obs.group_size
        if self.heads is not None:
            if obs.layer_idx >= len(self.heads):
                raise KVSieveError(
                    f"compresskv has SRH for {len(self.heads)} layers, not layer {obs.layer_idx}; "
                    "run compresskv.calibrate on this model"
                )
            mine = [q - first for q in self.heads[obs.layer_idx] if first <= q < first + hq]
            if mine:
                return torch.tensor(mine, device=obs.queries.device)
            return torch.arange(hq, device=obs.queries.device)
        body = (obs.positions[:, :1] >= self.n_sink) & ~recent_mask(obs.positions[:, :1], self.window)
        mass = (obs.attention * body).sum(dim=(0, 2))  # (hq,)
        return mass.topk(min(self.n_heads, hq)).indices

    def score(self, obs: Observation) -> torch.Tensor:
        votes = obs.attention  # (B, hq, T), window queries
        b, hq, t = votes.shape
        positions = obs.positions[:, :1].expand(b, hq, t)
        valid = None if obs.valid is None else obs.valid[:, :1]
        pooled = pool_in_stream_order(votes, positions, self.kernel, "avg", valid)
        srh = self.retrieval_heads(obs)
        scores = pooled[:, srh].mean(dim=1, keepdim=True).expand(-1, obs.keys.shape[1], -1).clone()
        return scores.masked_fill(recent_mask(obs.positions, min(self.window, obs.n_new)), float("inf"))


def error_aware_budgets(weights, budget: int, min_tokens: int, max_tokens: int) -> list[int]:
    """Per-layer budgets summing to ``len(weights) x budget``: ``min_tokens`` each plus the rest in proportion to the
    weights, clipped to ``[min_tokens, max_tokens]``, the rounding remainder given to (or taken from) the layers with
    the largest (smallest) weights."""
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    w = w / w.sum()
    n = len(w)
    total = n * budget
    out = (min_tokens + torch.round(w * (total - n * min_tokens))).clamp(min_tokens, max_tokens).long().tolist()
    diff = total - sum(out)
    order = w.argsort(descending=diff > 0).tolist()
    while diff != 0:
        moved = False
        for i in order:
            if diff > 0 and out[i] < max_tokens:
                out[i], diff, moved = out[i] + 1, diff - 1, True
            elif diff < 0 and out[i] > min_tokens:
                out[i], diff, moved = out[i] - 1, diff + 1, True
            if diff == 0:
                break
        if not moved:
            break
    return out


class _HeadProbe(Method):
    """Keeps every token; during teacher-forced decoding, adds up each query head's attention on a span."""

    name = "compresskv-head-probe"
    own_kind = "keep-all"

    def __init__(self, span: slice):
        self.span = span
        self.mass: dict[int, torch.Tensor] = {}

    def attention_request(self, evicting: bool) -> AttentionRequest:
        return AttentionRequest(last=1)

    def observe(self, obs: Observation) -> None:
        if obs.n_new != 1:
            return
        mass = obs.attention[..., self.span].sum(dim=(0, 2))  # (hq,)
        prev = self.mass.get(obs.layer_idx)
        self.mass[obs.layer_idx] = mass if prev is None else prev + mass

    def spec(self) -> str:
        return self.name


class _ErrorProbe(Method):
    """Keeps every token; at the prompt, marks what ``method`` would keep at ``compression``; while decoding, adds up
    each layer's relative error of the attention output with only the marked (and new) tokens."""

    name = "compresskv-error-probe"
    own_kind = "keep-all"

    def __init__(self, method: CompressKV, compression: float):
        self.method, self.compression = method, compression
        self.errors: dict[int, float] = {}
        self.prompt_tokens = 0

    def attention_request(self, evicting: bool) -> AttentionRequest:
        return AttentionRequest(last=self.method.window)

    def observe(self, obs: Observation) -> None:
        if obs.n_new > 1:
            t = obs.keys.shape[2]
            self.prompt_tokens = t
            budget = max(1, int(t * (1.0 - self.compression)))
            ctx = LayerContext(obs.layer_idx, obs.n_layers, obs.seen, obs.n_new)
            obs.budget = self.method.layer_budget(budget, ctx)
            keep = self.method.score(obs).topk(min(obs.budget, t), dim=-1).indices
            kept = torch.zeros(obs.positions.shape, dtype=torch.float32, device=keep.device).scatter_(2, keep, 1.0)
            obs.state[KEPT] = kept
            return
        visible = (obs.state[KEPT] > 0) | (obs.positions >= self.prompt_tokens)  # (B, h, T)
        b, hq, _, d = obs.queries.shape
        h = obs.keys.shape[1]
        q = obs.queries.to(torch.float32).view(b, h, hq // h, d)
        logits = q @ obs.keys.to(torch.float32).transpose(-1, -2) * obs.scaling  # (B, h, g, T)
        values = obs.values.to(torch.float32)
        full = logits.softmax(dim=-1) @ values
        kept = logits.masked_fill(~visible[:, :, None], float("-inf")).softmax(dim=-1) @ values
        error = float((kept - full).norm() / (full.norm() + 1e-5))
        self.errors[obs.layer_idx] = self.errors.get(obs.layer_idx, 0.0) + error

    def spec(self) -> str:
        return self.name


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    compression: float = 0.5,
    n_heads: int = 4,
    needle: int = 16,
    steps: int = 8,
    seed: int = 0,
    **fields,
) -> CompressKV:
    """A :class:`CompressKV` with SRH and layer weights measured on ``model`` with the prompt ``input_ids`` ``(1, T)``.

    SRH: a needle of ``needle`` tokens (a random span of the prompt, seeded) is inserted in the middle of the prompt
    and repeated at the end; while the model is teacher-forced through the repeat, each query head's attention on the
    inserted span is added up; the ``n_heads`` highest per layer are its SRH. Layer weights: the relative attention
    output error of each layer over ``steps`` greedy decoding steps when only the tokens the SRH scorer keeps at
    ``compression`` are visible, normalised to sum to 1.
    """
    from ..sieve import Sieve  # here: the sieve module imports the method registry

    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 4 * needle:
        raise KVSieveError(f"calibrate takes one prompt (1, T) with T >= {4 * needle} tokens")
    ids = input_ids.to(model.device)
    n = ids.shape[1]
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(0, n - needle, (1,), generator=gen))
    span_ids = ids[:, start : start + needle]
    half = n // 2
    prompt = torch.cat([ids[:, :half], span_ids, ids[:, half:], span_ids[:, :1]], dim=1)
    head_probe = _HeadProbe(slice(half, half + needle))
    with Sieve(head_probe).attach(model) as cache:
        model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True)
        for i in range(1, needle):
            model(input_ids=span_ids[:, i : i + 1], **cache_kwargs(model, cache), use_cache=True)
    n_layers = model.config.get_text_config().num_hidden_layers
    n_heads = min(n_heads, model.config.get_text_config().num_attention_heads)
    # layers kvsieve does not compress (sliding windows) get no SRH: all their heads would vote
    heads = tuple(
        tuple(sorted(head_probe.mass[i].topk(n_heads).indices.tolist())) if i in head_probe.mass else ()
        for i in range(n_layers)
    )
    method = CompressKV(n_heads=n_heads, heads=heads, **fields)

    error_probe = _ErrorProbe(method, compression)
    with Sieve(error_probe).attach(model) as cache:
        logits = model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(input_ids=nxt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits
    measured = error_probe.errors
    mean = sum(measured.values()) / max(1, len(measured))
    errors = [measured.get(i, mean) for i in range(n_layers)]  # uncompressed layers: an average share
    total = sum(errors)
    weights = tuple(e / total for e in errors) if total > 0 else None
    return CompressKV(n_heads=n_heads, heads=heads, layer_weights=weights, **fields)
