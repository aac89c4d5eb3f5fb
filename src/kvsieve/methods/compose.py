"""``compose``: methods applied in sequence, each on what the previous one kept (kvpress's ``ComposedPress``).

``compose(methods=('snapkv', 'knorm'))``: at each eviction the first method keeps part of the held tokens, the second
scores only those and keeps the budget, and so on; a storage method (``think``, ``kivi``) may come last and transforms
what the evicting stages kept, e.g. ``compose(methods=('snapkv', 'think'))`` (SnapKV, then ThinK's key channel
pruning). The stages' retained fractions multiply to the sieve's: with ``ratios`` the compression ratio of every
evicting stage but the last (kvpress's per-press ratios; the last stage makes up the sieve's budget), otherwise every
evicting stage removes the same share. ``compose(methods=('snapkv', 'knorm'), ratios=(0.3,))`` with
``compression=0.44`` is ``ComposedPress([SnapKVPress(0.3), KnormPress(0.2)])``.

Each later stage scores a view of the held tokens restricted to what the previous stage kept (keys, values,
positions, attention statistics and per-token state gathered). The decision is written as a ranking score (the last
stage's kept tokens first), so the core's top-k keeps exactly the final tokens.

Limits: stages share one set of attention statistics, so the evicting stages must request the same statistics (or
none); stages that choose per head (``adakv``), set layer budgets (``pyramidkv``), merge, read selectively or bias
attention are refused (put budget wrappers outside: ``pyramidkv:compose(...)``); one storage stage at most, last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..attention import AttentionRequest
from ..errors import KVSieveError
from ..storage import Segment
from . import build, register
from .base import LayerContext, Method, Observation, overrides, top_slots

REFUSED = ("select", "layer_budget", "merge", "reads", "logit_bias")


@register
@dataclass
class Compose(Method):
    """Stages applied in order: each evicting stage keeps a share of what the previous one kept; storage last.

    methods: stage specs, e.g. ('snapkv', 'knorm') or ('snapkv(window=16)', 'think'). ratios: compression ratio of
    each evicting stage but the last, or None (equal shares).
    """

    methods: tuple = ()
    ratios: tuple | None = None

    name = "compose"
    family = "composition"
    paper = "kvpress ComposedPress"
    needs = "the stages' needs"
    simplifications = (
        "stages share one attention request; later stages score the tokens the previous one kept (a gathered view); "
        "at most one storage stage, last"
    )

    def validate(self) -> None:
        if len(self.methods) < 2:
            raise KVSieveError("compose needs two stages or more, e.g. compose(methods=('snapkv', 'knorm'))")
        stages = []
        for spec in self.methods:
            if not isinstance(spec, str):
                raise KVSieveError(f"compose: stages are method specs (strings), got {spec!r}")
            stages.append(build(spec))
        evicting = [s for s in stages if s.evicts]
        storage = [s for s in stages if not s.evicts]
        if not evicting:
            raise KVSieveError("compose needs an evicting stage, e.g. compose(methods=('snapkv', 'think'))")
        if len(storage) > 1 or (storage and stages[-1] is not storage[0]):
            raise KVSieveError("compose takes one storage stage at most (think, kivi, ...), as the last stage")
        for s in stages:
            bad = [hook for hook in REFUSED if overrides(s, hook)]
            if bad or getattr(s, "selects", False):
                raise KVSieveError(
                    f"compose: {s.spec()} decides {', '.join(bad) or 'reads'} itself; compose scorers and one storage "
                    "method, and put budget wrappers outside, e.g. pyramidkv:compose(...)"
                )
            if s.rerotate:
                raise KVSieveError(f"compose: {s.spec()} re-indexes positions; use rerotate:compose(...) instead")
        requests = {r for s in evicting if (r := s.attention_request(True)) is not None}
        if len(requests) > 1:
            raise KVSieveError(
                "compose: the evicting stages request different attention statistics "
                f"({', '.join(s.spec() for s in evicting)}); compose stages that need the same or none"
            )
        if len({s.spec() for s in stages}) < len(stages):
            raise KVSieveError("compose: a stage appears twice (their run state would collide)")
        if self.ratios is not None:
            if len(self.ratios) != len(evicting) - 1:
                raise KVSieveError(
                    f"compose: ratios gives the compression of every evicting stage but the last: "
                    f"{len(evicting) - 1} number(s), got {len(self.ratios)}"
                )
            if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1 for r in self.ratios):
                raise KVSieveError(f"compose: ratios must be in [0, 1), got {self.ratios!r}")
        # derived from the hyperparameters once (like a parsed profile), never run state
        self._evicting, self._storage = evicting, (storage[0] if storage else None)

    @property
    def kind(self) -> str:
        return "evict"

    def check_budget(self, tokens: int) -> None:
        for s in self._evicting:
            s.check_budget(tokens)

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        requests = [r for s in self._evicting if (r := s.attention_request(evicting)) is not None]
        return requests[0] if requests else None

    def observe(self, obs: Observation) -> None:
        for s in [*self._evicting, *([self._storage] if self._storage else [])]:
            s.observe(obs)

    def stage_budgets(self, held: int, budget: int) -> list[int]:
        """Tokens each evicting stage keeps, the last one ``budget``."""
        n = len(self._evicting)
        if self.ratios is not None:
            out, left = [], held
            for r in self.ratios:
                left = max(budget, int(left * (1.0 - r)))
                out.append(left)
        else:
            share = budget / held
            out = [max(budget, int(held * share ** ((i + 1) / n))) for i in range(n - 1)]
        return [*out, budget]

    def score(self, obs: Observation) -> torch.Tensor:
        """A ranking: the last stage's kept tokens first (by its score), then each earlier stage's evicted ones."""
        b, h, t = obs.positions.shape
        combined = torch.empty(b, h, t, dtype=torch.float32, device=obs.positions.device)
        subset = torch.arange(t, device=obs.positions.device).expand(b, h, t)
        view = obs
        # the real tokens held (a padded batch is decided row by row, each row with its own padding)
        held = t if obs.valid is None else int(obs.valid[0, 0].sum())
        stages = list(zip(self._evicting, self.stage_budgets(held, min(obs.budget, held)), strict=True))
        for level, (stage, keep) in enumerate(stages):
            s = stage.score(replace(view, budget=keep)).to(torch.float32)
            if view.valid is not None:
                s = s.masked_fill(~view.valid, float("-inf"))
            rank = torch.empty_like(s)  # position in this stage's order: best = largest
            order = s.sort(dim=-1, descending=True, stable=True).indices
            rank.scatter_(-1, order, torch.arange(s.shape[-1], 0, -1, device=s.device, dtype=s.dtype).expand_as(s))
            last = level == len(stages) - 1
            chosen = top_slots(s, min(keep, s.shape[-1]))
            dropped = torch.ones_like(s, dtype=torch.bool).scatter_(-1, chosen, False)
            value = rank + level * (t + 1)  # a stage's dropped tokens rank below everything a later stage sees
            bonus = t + 1 if last else 0  # the last stage's kept tokens above all
            combined.scatter_(-1, subset, torch.where(dropped, value, value + bonus))
            if last:
                break
            chosen = chosen.sort(dim=-1).values
            subset = subset.gather(-1, chosen)
            view = _restrict(view, chosen)
        return combined

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        return self._storage.pack(segment, ctx) if self._storage is not None else segment


def _restrict(obs: Observation, slots: torch.Tensor) -> Observation:
    """``obs`` restricted to the held slots ``slots`` ``(B, h, k)`` (sorted); the kept new tokens stay last."""
    t = obs.keys.shape[2]

    def rows(x):
        return x.gather(2, slots[..., None].expand(*slots.shape, x.shape[-1]))

    def cols(x):
        if x is None:
            return None
        if x.dim() == 3 and x.shape[1] != slots.shape[1]:  # per query head (attention)
            g = x.shape[1] // slots.shape[1]
            return x.gather(2, slots.repeat_interleave(g, dim=1))
        extra = x.shape[3:]
        idx = slots.view(*slots.shape, *([1] * len(extra))).expand(*slots.shape, *extra)
        return x.gather(2, idx)

    n_new = int((slots >= t - obs.n_new).sum(dim=-1).min())
    return replace(
        obs, keys=rows(obs.keys), values=rows(obs.values), positions=cols(obs.positions), valid=cols(obs.valid),
        attention=cols(obs.attention), state={k: cols(v) for k, v in obs.state.items()}, n_new=max(1, n_new),
    )  # fmt: skip
