"""``zerotuning``: head-specific scaling of the attention the initial token receives, then renormalisation.

Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without Training"
(2025). In the selected heads, the attention probability on the initial token (the attention sink) is multiplied by
``gamma`` and the row renormalised: ``a0' = gamma a0 / D``, ``ai' = ai / D`` with ``D = 1 - a0 + gamma a0``. Lowering
it (``gamma < 1``) sharpens attention over the other tokens; raising it flattens it. That is exactly adding
``log gamma`` to token 0's logit, which is how it is applied here (:meth:`Method.logit_bias`): no weights change and
the KV cache is untouched.

The module also holds :class:`Calibration`, the wrapper base shared with ``act``: a calibration method keeps every
token on its own, or wraps an evicting method (``zerotuning:snapkv``) and delegates every cache hook to it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import AttentionRequest
from ..cache import Segment
from ..errors import KVSieveError
from . import register
from .base import Method, Observation

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
class Calibration(Method):
    """A non-evicting attention calibration, optionally wrapping an evicting ``inner`` method.

    heads: ``"all"`` or a list of layers / layer ranges / query heads the calibration applies to, e.g.
    ``['0-9']`` or ``['14.3', '20.1']`` (query heads; with GQA, query heads ``g*k .. g*k+g-1`` share KV head ``k``).
    """

    inner: Method | None = None
    heads: Any = "all"

    family = "calibration"
    delegates = ("select", "reads", "merge", "pack")  # the cache is the inner method's; the bias is this method's

    def __post_init__(self) -> None:
        self._heads = parse_heads(self.heads)
        if self.inner is not None:
            # the cache behaviour is the inner method's (instance attributes shadow the class flags, which stay
            # False: on its own a calibration keeps every token)
            self.evicts = self.inner.evicts
            self.selects = self.inner.selects
            self.rerotate = self.inner.rerotate
            if getattr(self.inner, "read_budget", None) is not None:
                self.read_budget = self.inner.read_budget

    # --- wrapper plumbing: the cache hooks belong to the inner method ---------------------------------------------
    evicts = False
    selects = False
    rerotate = False

    def check_budget(self, tokens: int) -> None:
        if self.inner is not None:
            self.inner.check_budget(tokens)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        return self.inner.layer_budget(budget, layer_idx, n_layers) if self.inner is not None else budget

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return self.inner.attention_request(evicting) if self.inner is not None else None

    def observe(self, obs: Observation) -> None:
        if self.inner is not None:
            self.inner.observe(obs)

    def score(self, obs: Observation) -> torch.Tensor:
        if self.inner is None:
            raise KVSieveError(
                f"{self.name} keeps every token; wrap an evicting method to evict, e.g. {self.name}:snapkv"
            )
        return self.inner.score(obs)

    def select(self, scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
        return self.inner.select(scores, budget) if self.inner is not None else super().select(scores, budget)

    def reads(self, obs: Observation) -> torch.Tensor | None:
        return self.inner.reads(obs) if self.inner is not None else None

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.merge(obs, keep) if self.inner is not None else None

    def pack(self, segment: Segment) -> Segment:
        return self.inner.pack(segment) if self.inner is not None else segment

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
        if self._heads is None:
            return torch.ones(hq, dtype=torch.bool, device=obs.queries.device)
        chosen = torch.zeros(hq, dtype=torch.bool, device=obs.queries.device)
        for lo, hi, head in self._heads:
            if lo >= obs.n_layers:
                raise KVSieveError(f"{self.name}: heads names layer {lo}, but the model has {obs.n_layers} layers")
            if not lo <= obs.layer_idx <= hi:
                continue
            if head is None:
                chosen[:] = True
            elif first <= head < first + hq:
                chosen[head - first] = True
        return chosen


@register
@dataclass
class ZeroTuning(Calibration):
    """Attention on the initial token scaled by ``gamma`` in the selected heads, rows renormalised.

    gamma: > 0; 1 changes nothing (and then attention is bitwise that of the wrapped method or of ``full``).
    heads: ``"all"`` or layers / query heads (see :class:`Calibration`). The initial token is the one at original
    position 0; once it is evicted there is nothing to scale.

    Simplifications: the paper profiles heads on a few validation examples (or minimises output entropy) to choose
    which heads to scale up or down and by how much; here ``gamma`` and the heads are given, and
    ``benchmarks/calibration.py`` measures a sweep of them on the bench tasks.
    """

    gamma: float = 0.5

    name = "zerotuning"
    paper = "Han et al. 2025, arXiv:2505.11739"
    needs = "positions (initial token)"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0 and math.isfinite(self.gamma)):
            raise KVSieveError(f"gamma must be a finite number > 0 (1 changes nothing), got {self.gamma!r}")

    def calibration_bias(self, obs: Observation) -> torch.Tensor | None:
        if self.gamma == 1.0:
            return None
        initial = obs.positions == 0  # (B, h, T); padding never sits at position 0
        if obs.valid is not None:
            initial &= obs.valid
        if not bool(initial.any()):
            return None
        chosen = self.selected_heads(obs)
        if not bool(chosen.any()):
            return None
        mask = initial.repeat_interleave(obs.group_size, dim=1) & chosen[None, :, None]  # (B, Hq, T)
        bias = mask.to(torch.float32) * math.log(self.gamma)
        b, hq, t = bias.shape
        return bias[:, :, None, :].expand(b, hq, obs.n_new, t)
