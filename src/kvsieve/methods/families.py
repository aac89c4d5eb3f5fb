"""Family bases: what several methods share, each in one place.

- :class:`SelectiveMethod`: methods that keep the cache but read a budget of tokens per decoding step (``quest``,
  ``tokenselect``, ``tidaldecode``, ``recycled_attention``), optionally around an evicting method.
- :class:`Calibration`: attention calibrations that add a logit bias (``zerotuning``, ``act``), optionally around an
  evicting method.
- :class:`HeadwiseRetention`: retrieval heads keep everything, the others sinks and recent tokens (``duoattention``,
  ``razorattention``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import BudgetError, KVSieveError
from .base import LayerContext, Method, Observation, Wrapper, check_sinks_fit, hp, top_slots


# --- selective reads ------------------------------------------------------------------------------------------------
@dataclass
class SelectiveMethod(Wrapper):
    """Base of the methods that keep the whole cache but read only some tokens per decoding step.

    read_budget: tokens read per step (an int >= 1) or a fraction of the held tokens (a float in (0, 1)); None
    takes the sieve's budget (``Sieve(..., budget=N)`` or ``compression=r``, which reads ``int(T * (1 - r))``).
    inner: an evicting method to compose with (``"quest(read_budget=256):snapkv"``): the sieve's budget is then the
    inner method's eviction budget, and ``read_budget`` (required) the number of held tokens read per step.

    A method returns None from ``reads`` (attend to every held token) whenever the read budget covers them, so with a
    budget at least the context length every method is exactly full attention.
    """

    read_budget: int | float | None = None

    family: ClassVar[str] = "selection"
    needs: ClassVar[str] = "queries and keys at decode time"
    own_kind: ClassVar[str] = "read"

    def validate(self) -> None:
        check_read_budget(self.read_budget, self.name)
        if self.inner is not None:
            if self.inner.selects or not self.inner.evicts:
                raise KVSieveError(
                    f"{self.name} composes with an evicting method (e.g. {self.name}:snapkv); "
                    f"{self.inner.name} does not evict. Use one selective-read method at a time."
                )
            if self.read_budget is None:
                raise KVSieveError(
                    f"{self.name}:{self.inner.name} evicts to the sieve's budget and reads within it: give the "
                    f"read budget, e.g. {self.name}(read_budget=256):{self.inner.spec()} (tokens) or read_budget=0.25"
                )

    def _check_inner(self, inner: Method) -> None:
        """The inner method is checked in :meth:`validate` (an evicting method, or none)."""

    def _state(self, obs: Observation, key: str) -> dict[str, Any]:
        """This method's per-layer state for the segment of ``obs`` (a layer may hold one segment per head)."""
        return obs.layer_state.setdefault((self.name, key, obs.head_start, obs.keys.shape[1]), {})


def check_read_budget(read_budget: int | float | None, name: str) -> None:
    """BudgetError unless ``read_budget`` is None, an int >= 1 or a fraction in (0, 1)."""
    if read_budget is None:
        return
    if isinstance(read_budget, bool) or not isinstance(read_budget, (int, float)):
        raise BudgetError(f"{name}: read_budget must be a token count or a fraction, got {read_budget!r}")
    if isinstance(read_budget, float) and not read_budget.is_integer() and not (0.0 < read_budget < 1.0):
        raise BudgetError(f"{name}: a fractional read_budget must be in (0, 1), got {read_budget}")
    if read_budget <= 0:
        raise BudgetError(f"{name}: read_budget must be positive (tokens >= 1 or a fraction in (0, 1))")


def held_unchanged(previous: torch.Tensor | None, positions: torch.Tensor) -> bool:
    """True if the tokens held when ``previous`` ``(B, h, T0)`` was recorded are still the first ``T0`` held now.

    Without eviction the cache only grows, so this holds; after an eviction (composed methods) indices shifted.
    """
    if previous is None or previous.shape[:2] != positions.shape[:2] or previous.shape[2] > positions.shape[2]:
        return False
    return torch.equal(previous, positions[..., : previous.shape[2]])


def query_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per batch row of two queries ``(B, Hq, 1, D)``, all heads flattened: ``(B,)``."""
    return F.cosine_similarity(a.flatten(1).to(torch.float32), b.flatten(1).to(torch.float32), dim=-1)


def remap_by_position(
    wanted: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None,
    forced: torch.Tensor | None,
    k: int,
) -> torch.Tensor:
    """Held-token indices ``(B, h, k)`` for a selection recorded as positions, after the cache changed (eviction).

    ``wanted``: ``(B, h, k0)`` stream positions chosen earlier; ``positions``: ``(B, h, T)`` held now; ``forced``:
    ``(B|1, h|1, T)`` tokens that must be read (sinks, recent window, the newest). Ranking: forced tokens, then the
    wanted ones still held, then the most recent of the rest (to fill slots of evicted tokens); padding never.
    """
    b, h, t = positions.shape
    real = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
    key = positions * 2 + real.long()  # unique for real tokens even where padding repeats a position
    sorted_key, order = key.sort(dim=-1)
    want = wanted * 2 + 1
    loc = torch.searchsorted(sorted_key.contiguous(), want.contiguous()).clamp(max=t - 1)
    hit = sorted_key.gather(-1, loc) == want
    score = torch.arange(t, device=positions.device, dtype=torch.float32).div(t).expand(b, h, t).clone()
    score.scatter_reduce_(-1, order.gather(-1, loc), hit.to(torch.float32) * 2.0, reduce="sum")
    score = score.clamp(max=3.0)
    if forced is not None:
        score = score.masked_fill(forced.expand(b, h, t), 4.0)
    score = score.masked_fill(~real, float("-inf"))
    return top_slots(score, k)


def edge_mask(positions: torch.Tensor, valid: torch.Tensor | None, n_init: int, n_local: int) -> torch.Tensor:
    """True for the ``n_init`` oldest and the ``n_local`` newest real tokens by stream position: ``(B, h, T)``."""
    t = positions.shape[-1]
    key = positions.to(torch.float64)
    out = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
    for sign, n in ((-1.0, n_init), (1.0, n_local)):
        if n > 0:
            ranked = key * sign if valid is None else (key * sign).masked_fill(~valid, float("-inf"))
            out.scatter_(-1, ranked.topk(min(n, t), dim=-1).indices, True)
    return out


# --- calibrations ---------------------------------------------------------------------------------------------------
_HEAD_ENTRY = re.compile(r"^(\d+)(?:-(\d+))?(?:\.(\d+))?$")


def parse_heads(heads: Any) -> list[tuple[int, int, int | None]] | None:
    """``"all"`` -> None; else entries ``"L"``, ``"A-B"`` (layers A..B), ``"L.H"`` or ``"A-B.H"`` (query head H)."""
    if isinstance(heads, str) and heads == "all":
        return None
    entries = [heads] if isinstance(heads, str) else heads
    if not isinstance(entries, (list, tuple)) or not entries:
        raise KVSieveError(f"heads must be 'all' or a list such as ['12', '20-25', '14.3'], got {heads!r}")
    out = []
    for entry in entries:
        m = _HEAD_ENTRY.match(str(entry).strip())
        if m is None:
            raise KVSieveError(
                f"bad heads entry {entry!r}: write a layer '12', a layer range '10-15' or a query head '12.3' "
                "(layers and query heads count from 0)"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise KVSieveError(f"bad heads entry {entry!r}: the range {lo}-{hi} is empty")
        out.append((lo, hi, int(m.group(3)) if m.group(3) is not None else None))
    return out


@dataclass
class Calibration(Wrapper):
    """A non-evicting attention calibration, optionally wrapping an evicting ``inner`` method.

    heads: ``"all"`` or a list of layers / layer ranges / query heads the calibration applies to, e.g.
    ``['0-9']`` or ``['14.3', '20.1']`` (query heads; with GQA, query heads ``g*k .. g*k+g-1`` share KV head ``k``).
    The cache hooks are the inner method's; the bias is this method's plus the inner one's.
    """

    heads: Any = "all"

    family: ClassVar[str] = "calibration"

    def validate(self) -> None:
        parse_heads(self.heads)

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        """This method's bias plus the inner method's; None when neither has one (so attention is unchanged)."""
        own = self.calibration_bias(obs)
        inner = self.inner.logit_bias(obs) if self.inner is not None else None
        if own is None or inner is None:
            return own if inner is None else inner
        return own + inner

    # --- the calibration ------------------------------------------------------------------------------------------
    def calibration_bias(self, obs: Observation) -> torch.Tensor | None:
        """The additive logit bias ``(B, Hq, q, T)`` of this calibration, or None where it changes nothing."""
        raise NotImplementedError

    def selected_heads(self, obs: Observation) -> torch.Tensor:
        """``(Hq_segment,)`` bool: the segment's query heads this calibration applies to."""
        hq = obs.queries.shape[1]
        first = obs.head_start * obs.group_size
        heads = parse_heads(self.heads)
        if heads is None:
            return torch.ones(hq, dtype=torch.bool, device=obs.queries.device)
        chosen = torch.zeros(hq, dtype=torch.bool, device=obs.queries.device)
        for lo, hi, head in heads:
            if lo >= obs.n_layers:
                raise KVSieveError(f"{self.name}: heads names layer {lo}, but the model has {obs.n_layers} layers")
            if not lo <= obs.layer_idx <= hi:
                continue
            if head is None:
                chosen[:] = True
            elif first <= head < first + hq:
                chosen[head - first] = True
        return chosen


# --- head-wise retention -------------------------------------------------------------------------------------------
@dataclass
class HeadwiseRetention(Method):
    """Retrieval KV heads keep every token; the others keep ``n_sink`` sinks and the most recent tokens.

    The sieve's budget (``budget=N`` or ``compression=r``) is what each *streaming* head holds; retrieval heads hold
    everything, so the bytes held are ``share x full + (1 - share) x budget``, measured from the per-head tensors.
    Retrieval heads are the ``round(ratio x layers x KV heads)`` KV heads with the highest diagnosed retrieval scores
    across the whole model; with GQA a KV head's score is the maximum over the query heads that share it.

    profile: path of a head profile JSON (``kvsieve diagnose ... --task niah_single_number`` writes one); None uses
    the profile shipped for the embedded smollm2-135m. ratio: share of KV heads kept in full. n_sink: sink tokens.
    """

    profile: str | None = None
    ratio: float = hp(0.5, ge=0.0, le=1.0)
    n_sink: int = hp(4, ge=0)

    family: ClassVar[str] = "head-wise"
    needs: ClassVar[str] = "head profile (diagnosed retrieval scores), positions"
    extra_slots: ClassVar[int] = 0  # tokens a streaming head keeps besides sinks and recent ones (razorattention: 1)

    def validate(self) -> None:
        from ..diagnose.profile import load_profile

        # derived from the hyperparameters once (the profile file is read here, so a bad path fails at once)
        self._profile = load_profile(self.profile)
        self._retrieval: torch.Tensor = self._profile.top_kv_heads(float(self.ratio))  # (L, H_kv) bool

    def check_budget(self, tokens: int) -> None:
        check_sinks_fit(tokens, self.n_sink + self.extra_slots, self.name)

    def retrieval_heads(self, obs: Observation) -> torch.Tensor:
        """``(h,)`` bool: which KV heads of this segment are retrieval heads (checks the profile fits the model)."""
        h = obs.keys.shape[1]
        prof = self._profile
        if (
            obs.n_layers != prof.n_layers
            or obs.group_size != prof.group
            or obs.keys.shape[-1] != prof.head_dim
            or obs.head_start + h > prof.n_kv_heads
            or (obs.head_start == 0 and h > 1 and h != prof.n_kv_heads)
        ):
            n_kv = h if obs.head_start == 0 and h > 1 else obs.head_start + h
            prof.check(obs.n_layers, n_kv, obs.group_size, obs.keys.shape[-1])
        return self._retrieval[obs.layer_idx, obs.head_start : obs.head_start + h].to(obs.keys.device)

    def score(self, obs: Observation) -> torch.Tensor:
        """+inf for every token of a retrieval head and for sinks; otherwise the position (newer is higher)."""
        check_sinks_fit(obs.budget, self.n_sink + self.extra_slots, self.name)
        retrieval = self.retrieval_heads(obs)
        scores = obs.positions.to(torch.float32)
        scores = scores.masked_fill(obs.positions < self.n_sink, float("inf"))
        return scores.masked_fill(retrieval[None, :, None], float("inf"))

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """A head whose scores are all infinite (a retrieval head) keeps every token; others their top ``budget``.

        One multi-head segment whose heads keep different numbers of tokens comes back as one ``(B, 1, k_h)`` tensor
        per head, which splits the layer into per-head storage.
        """
        out = []
        for s in scores:
            heads = [_keep_head(s[:, h], budget) for h in range(s.shape[1])]
            same = len({i.shape[-1] for i in heads}) == 1
            if same:
                out.append(torch.cat(heads, dim=1))
            elif len(scores) == 1:
                return heads
            else:
                raise KVSieveError(f"{self.name} cannot split one of several multi-head segments")
        return out


def _keep_head(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices ``(B, 1, k)`` (sorted) kept by one head with scores ``(B, T)``."""
    b, t = scores.shape
    if not bool(torch.isfinite(scores).any()):
        return torch.arange(t, device=scores.device).expand(b, 1, t)
    return top_slots(scores, budget).sort(dim=-1).values[:, None, :]
