"""``lukv``: head- and layer-wise budgets from a profiled utility curve, around any scorer.

Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV Cache Eviction"
(LU-KV, 2026), as kvpress's ``LUKVPress``. Heads differ in how well their scorer's ranking predicts what is used
*later*, so budgets should go where keeping one more token preserves the most future utility. Offline, per head, the
utility of keeping its best ``b`` tokens (by the scorer) is measured; the allocation maximising the total utility
under a global budget is found by a greedy on marginal utility over the concave hull of each head's curve (the
paper's convex-hull relaxation). The result is a *budget curve*: for each compression ratio 1..99 %, each (layer,
head)'s share of tokens kept. Online, each head keeps its share (sinks and the newest tokens protected).

kvpress downloads a curve made for Llama-3.1-8B; nothing is downloaded here. :func:`calibrate` profiles the model on
local text: a calibration text's first part is the context, the rest plays the future: a head's utility of ``b``
tokens is the attention the future queries give to the ``b`` context tokens its scorer ranks best (the paper's
oracle importance, measured on the profiling text). It writes a JSON curve: ``lukv(curve='curve.json'):snapkv``.
``shares=((...), ...)`` gives fixed per-(layer, head) keep shares instead (for experiments and tests).

In kvsieve the sieve's budget is the total: at ratio ``r`` of the tokens seen, layer ``l`` keeps ``b x L x S_l / S``
tokens per head on average and head ``h`` its ``s_lh / S_l`` part of the layer's (``s`` the curve's shares at ``r``),
so ``compression=r`` keeps ``seen x s_lh`` per head as kvpress does; a head never keeps more than it holds (the
surplus goes to the other heads of the layer).

Simplifications: the utility measure (future attention mass on the kept tokens, on a profiling text) and the greedy
on hull segments are ours from the paper's description (its code was not available); batch size 1; original
positions.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attention import AttentionRequest, column_sums
from ..errors import KVSieveError
from . import build, register
from .base import LayerContext, Method, Observation, Wrapper, hp, overrides, recent_mask, top_slots

SHARES = "lukv_shares"


@register
@dataclass
class LUKV(Wrapper):
    """Wraps ``inner`` (default SnapKV): per-(layer, head) budgets from a profiled LU-KV curve.

    curve: path of a curve JSON written by :func:`calibrate`. shares: fixed keep shares ``((s_00, s_01, ...), ...)``
    per layer and KV head instead of a curve. sink: initial tokens protected (kvpress: 4). window: newest tokens
    protected (kvpress: 1).
    """

    curve: str | None = None
    shares: tuple | None = None
    sink: int = hp(4, ge=0)
    window: int = hp(1, ge=0)

    name = "lukv"
    family = "budget wrapper"
    paper = "Tang et al. 2026, arXiv:2602.08585"
    needs = "the wrapped method's needs + a profiled curve (lukv.calibrate)"
    simplifications = (
        "curve profiled locally by lukv.calibrate (future attention mass on a profiling text, greedy on hull "
        "segments), never downloaded; the sieve's budget is the total; batch size 1"
    )
    own_kind = "evict"
    default_inner = "snapkv"
    batch = "single"

    def validate(self) -> None:
        if (self.curve is None) == (self.shares is None):
            raise KVSieveError(
                "lukv needs a budget curve: lukv(curve='curve.json'):snapkv (kvsieve.methods.lukv.calibrate writes "
                "one) or fixed shares, lukv(shares=((1.5, 0.5), (1.0, 1.0))):snapkv"
            )
        if self.curve is not None:
            path = Path(self.curve)
            if not path.is_file():
                raise KVSieveError(f"lukv: no curve file at {self.curve!r}; write one with lukv.calibrate(...)")
            data = json.loads(path.read_text())
            self._keep = torch.tensor(data["keep"], dtype=torch.float64)  # (99, L, H), parsed once
        else:
            try:
                self._keep = torch.tensor(self.shares, dtype=torch.float64)[None]
            except (TypeError, ValueError) as err:
                raise KVSieveError("lukv: shares must be one tuple of numbers per layer, as many per KV head") from err
            if self._keep.dim() != 3 or bool((self._keep < 0).any()) or float(self._keep.sum()) <= 0:
                raise KVSieveError("lukv: shares must be non-negative numbers, one tuple per layer, one per KV head")

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        if inner.rerotate:
            raise KVSieveError("lukv gives heads different lengths, which position re-rotation cannot index")
        if overrides(inner, "reads"):
            raise KVSieveError(f"lukv allocates what an evicting method keeps; {inner.spec()} selects reads instead")

    def shares_at(self, budget: int, ctx: LayerContext) -> torch.Tensor:
        """The (L, H) keep shares at this budget's compression ratio (1 - budget / seen)."""
        keep = self._keep
        if keep.shape[1] != ctx.n_layers:
            raise KVSieveError(f"lukv: the curve has {keep.shape[1]} layers, the model {ctx.n_layers}; calibrate it")
        if keep.shape[0] == 1:
            return keep[0]
        ratio = 1.0 - budget / max(ctx.seen, 1)
        return keep[max(0, min(98, round(ratio * 100) - 1))]

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        budget = self._in.layer_budget(budget, ctx)
        s = self.shares_at(budget, ctx)
        ctx.layer_state[SHARES] = s[ctx.layer_idx]  # for select: the heads' shares at the model-wide ratio
        return max(1, round(budget * s.shape[0] * float(s[ctx.layer_idx].sum()) / float(s.sum())))

    def score(self, obs: Observation) -> torch.Tensor:
        scores = self._in.score(obs)
        protected = obs.positions < self.sink
        if self.window:
            protected = protected | recent_mask(obs.positions, self.window)
        return scores.masked_fill(protected, float("inf"))

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        if scores[0].shape[0] != 1:
            raise KVSieveError("lukv allocates budgets per head for one sequence at a time; use batch size 1")
        per_head = [s[:, h : h + 1] for s in scores for h in range(s.shape[1])]
        s = ctx.layer_state.get(SHARES)
        if s is None:
            s = self.shares_at(budget, ctx)[ctx.layer_idx]
        if s.numel() != len(per_head):
            raise KVSieveError(f"lukv: the curve has {s.numel()} KV heads per layer, the model {len(per_head)}")
        counts = allocate(s, budget * len(per_head), [p.shape[-1] for p in per_head])
        return [top_slots(p, k).sort(dim=-1).values for p, k in zip(per_head, counts, strict=True)]


def allocate(shares: torch.Tensor, total: int, caps: list[int]) -> list[int]:
    """Integer budgets proportional to ``shares`` summing to ``min(total, sum(caps))``, each at most its cap (the
    surplus of a capped head goes to the others), each at least 1; largest remainders round."""
    n = len(caps)
    out = [0] * n
    free = list(range(n))
    left = min(total, sum(caps))
    while free and left > 0:
        weights = torch.tensor([float(shares[i]) for i in free], dtype=torch.float64)
        if float(weights.sum()) <= 0:
            weights = torch.ones_like(weights)
        exact = weights / weights.sum() * left
        capped = [i for i, x in zip(free, exact.tolist(), strict=True) if out[i] + x >= caps[i]]
        if not capped:
            base = [int(x) for x in exact.tolist()]
            rest = left - sum(base)
            order = sorted(range(len(free)), key=lambda j: exact[j].item() - base[j], reverse=True)
            for j in order[:rest]:
                base[j] += 1
            for j, i in enumerate(free):
                out[i] += base[j]
            left = 0
            break
        for i in capped:
            left -= caps[i] - out[i]
            out[i] = caps[i]
        free = [i for i in free if i not in capped]
    return [max(1, min(c, k)) for c, k in zip(caps, out, strict=True)]


# --- offline profiling ------------------------------------------------------------------------------------------------
class _Profiler(Method):
    """Keeps every token; records the scorer's scores of the context pass and the attention of the future pass."""

    name = "lukv-profiler"
    own_kind = "keep-all"

    def __init__(self, scorer: Method, context: int, sink: int, window: int):
        self.scorer, self.context, self.sink, self.window = scorer, context, sink, window

    def observe(self, obs: Observation) -> None:
        records = obs.shared.setdefault("lukv_profile", {})
        if obs.n_new == self.context:  # the context pass: the scorer's ranking
            request = self.scorer.attention_request(True)
            if request is not None:
                obs.attention = column_sums(obs.queries, obs.keys, obs.scaling, obs.valid, request)
            self.scorer.observe(obs)
            s = self.scorer.score(obs).to(torch.float32)
            s = s.masked_fill(obs.positions < self.sink, float("inf"))
            if self.window:
                s = s.masked_fill(recent_mask(obs.positions, self.window), float("inf"))
            records[obs.layer_idx] = {"scores": s[0]}
        else:  # the future pass: attention each context token receives (per KV head, mean over its query heads)
            attn = column_sums(obs.queries, obs.keys, obs.scaling, obs.valid, AttentionRequest(last=None))
            b, hq, _ = attn.shape
            h = obs.keys.shape[1]
            future = attn[..., : self.context].view(b, h, hq // h, self.context).mean(dim=2)
            records[obs.layer_idx]["future"] = future[0]

    def spec(self) -> str:
        return self.name


def _hull_segments(utility: torch.Tensor) -> list[tuple[float, float]]:
    """Segments (slope, length) of the upper concave hull of the points ``(b, utility[b])``, b = 0..C."""
    pts: list[tuple[float, float]] = []
    for x, y in enumerate(utility.tolist()):
        while len(pts) >= 2:
            (x1, y1), (x2, y2) = pts[-2], pts[-1]
            if (y2 - y1) * (x - x1) <= (y - y1) * (x2 - x1):  # the middle point is under the chord: not on the hull
                pts.pop()
            else:
                break
        pts.append((float(x), y))
    return [((y2 - y1) / (x2 - x1), x2 - x1) for (x1, y1), (x2, y2) in itertools.pairwise(pts)]


def allocation_curve(utilities: list[torch.Tensor], n_tokens: int) -> torch.Tensor:
    """Keep shares ``(99, n_heads)`` for ratios 1..99 %: the greedy on marginal utility over the hulls."""
    segments = [(slope, length, h) for h, u in enumerate(utilities) for slope, length in _hull_segments(u)]
    segments.sort(key=lambda s: -s[0])
    lengths = torch.tensor([s[1] for s in segments], dtype=torch.float64)
    heads = torch.tensor([s[2] for s in segments], dtype=torch.long)
    ends = lengths.cumsum(0)
    out = torch.zeros(99, len(utilities), dtype=torch.float64)
    for i in range(99):
        total = (1.0 - (i + 1) / 100.0) * n_tokens * len(utilities)
        taken = (total - (ends - lengths)).clamp(min=0.0).minimum(lengths)  # how much of each segment is bought
        out[i] = torch.zeros(len(utilities), dtype=torch.float64).index_add_(0, heads, taken) / n_tokens
    return out


def calibrate(
    model: torch.nn.Module,
    samples: list[torch.Tensor],
    path: str | Path,
    scorer: str = "snapkv",
    context: float = 0.75,
    sink: int = 4,
    window: int = 1,
) -> Path:
    """Profile ``model`` on token-id tensors ``samples`` ``(1, n)`` and write an LU-KV curve JSON to ``path``.

    Per sample, the first ``context`` share of the tokens is the context, the rest the future. Returns the path; use
    it as ``lukv(curve=path):<scorer>``.
    """
    from ..compat import cache_kwargs
    from ..sieve import Sieve

    if not samples:
        raise KVSieveError("lukv.calibrate needs at least one profiling sample (a (1, n) tensor of token ids)")
    curves = []
    for ids in samples:
        n_ctx = int(ids.shape[1] * context)
        if n_ctx < 2 or n_ctx >= ids.shape[1]:
            raise KVSieveError(f"lukv.calibrate: a sample of {ids.shape[1]} tokens leaves no context or no future")
        profiler = _Profiler(build(scorer), n_ctx, sink, window)
        with Sieve(profiler).attach(model) as cache, torch.no_grad():
            model(ids[:, :n_ctx], **cache_kwargs(model, cache))
            model(ids[:, n_ctx:], **cache_kwargs(model, cache))
            records = cache.shared["lukv_profile"]
        utilities, shape = [], None
        for layer in sorted(records):
            scores, future = records[layer]["scores"], records[layer]["future"]
            shape = (len(records), scores.shape[0])
            for h in range(scores.shape[0]):
                order = scores[h].sort(descending=True, stable=True).indices
                gained = future[h][order].to(torch.float64).cumsum(0)
                utilities.append(torch.cat([torch.zeros(1, dtype=torch.float64), gained]))
        curves.append(allocation_curve(utilities, n_ctx).view(99, *shape))
    keep = torch.stack(curves).mean(dim=0)
    out = Path(path)
    out.write_text(json.dumps({"scorer": scorer, "sink": sink, "window": window, "keep": keep.tolist()}))
    return out
