"""``adakv``: adaptive budget allocation across the heads of a layer, around any scorer.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference" (2024).
The layer's budget (``budget x heads`` tokens) goes to the highest-scoring tokens across *all* its heads, so heads
with concentrated attention keep few tokens and diffuse heads keep many. A safeguard keeps at least
``alpha_safeguard x budget`` tokens in every head (as in kvpress). Heads then hold tensors of different lengths, and
the memory saved is real: a head keeping 40 tokens holds 40 tokens' tensors.

Limits: batch size 1 (a per-head allocation shared across a batch would not be the paper's); inner methods must keep
original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from . import register
from .base import LayerContext, Method, Wrapper, hp, overrides, top_set, top_slots


@register
@dataclass
class AdaKV(Wrapper):
    """Wraps ``inner``: its scores, compared across heads; the top ``budget x heads`` tokens of the layer kept.

    alpha_safeguard: fraction of the per-head budget every head keeps whatever its scores (kvpress: 0.2).
    """

    alpha_safeguard: float = hp(0.2, ge=0.0, le=1.0)

    name = "adakv"
    family = "budget wrapper"
    paper = "Feng et al. 2024, arXiv:2407.11550"
    needs = "the wrapped method's needs"
    simplifications = (
        "top budget x heads scores across a layer's heads with kvpress's safeguard (0.2 of the per-head budget); "
        "the wrapped method's merging, packing and bias are kept (per head); batch size 1"
    )
    own_kind = "evict"
    batch = "single"

    def validate(self) -> None:
        if self.inner is None:
            raise KVSieveError("adakv wraps a scorer: write adakv:<method>, e.g. adakv:snapkv")

    def _check_inner(self, inner: Method) -> None:
        if overrides(inner, "reads"):
            raise KVSieveError(
                f"adakv allocates what an evicting method keeps; {inner.spec()} selects reads instead. Compose "
                f"the other way round, e.g. quest(read_budget=256):adakv:snapkv"
            )
        super()._check_inner(inner)
        if inner.rerotate:
            raise KVSieveError(
                "adakv gives heads different lengths, which position re-rotation cannot index; "
                "wrap a method that keeps original positions, e.g. adakv:streaming_llm(rerotate=False)"
            )

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """One ``(1, 1, k_h)`` index tensor per KV head, the ``k_h`` summing to ``budget x heads``."""
        if scores[0].shape[0] != 1:
            raise KVSieveError("adakv allocates budgets per head for one sequence at a time; use batch size 1")
        per_head = [s[:, h].to(torch.float32) for s in scores for h in range(s.shape[1])]  # each (1, T_h)
        guaranteed = max(1, int(self.alpha_safeguard * budget))
        if guaranteed <= min(s.shape[-1] for s in per_head) and not any(
            bool(torch.isneginf(s).any()) for s in per_head
        ):
            return _select_padded(per_head, guaranteed, budget)
        return _select_each(per_head, guaranteed, budget)


def _select_each(per_head: list[torch.Tensor], guaranteed: int, budget: int) -> list[torch.Tensor]:
    """The allocation head by head, from each head's scores ``(1, T_h)``: the reference, for any scores."""
    boosted = []
    for s in per_head:
        s = s.clone()
        top = top_slots(s, guaranteed)
        # a finite boost above every real score: guaranteed tokens win, and keep their order among themselves
        s.scatter_(-1, top, s.gather(-1, top) + _boost(s))
        boosted.append(s)
    flat = torch.cat(boosted, dim=-1)
    chosen = top_slots(flat, budget * len(per_head))[0]
    bounds = torch.tensor([0] + [s.shape[-1] for s in per_head]).cumsum(0)
    out = []
    for h in range(len(per_head)):
        mine = chosen[(chosen >= bounds[h]) & (chosen < bounds[h + 1])] - bounds[h]
        out.append(mine.view(1, 1, -1))
    return out


def _select_padded(per_head: list[torch.Tensor], guaranteed: int, budget: int) -> list[torch.Tensor]:
    """:func:`_select_each` for every head at once: the heads' scores ``(1, T_h)`` as rows of one table padded with
    -inf, so the safeguard, the boost and the choice are a few tensor ops instead of a loop of them per head (this
    runs at every eviction of every layer). The same tokens as the loop: no real score is -inf (the caller checks),
    so padding never outranks a real token, and the rows in order keep the loop's tie order (head, then slot)."""
    lengths = [s.shape[-1] for s in per_head]
    n, longest = len(per_head), max(lengths)
    table = torch.nn.utils.rnn.pad_sequence([s[0] for s in per_head], batch_first=True, padding_value=float("-inf"))
    finite = torch.isfinite(table)
    high = table.masked_fill(~finite, float("-inf")).amax(dim=-1)
    low = table.masked_fill(~finite, float("inf")).amin(dim=-1)
    span = torch.where(finite.any(dim=-1), (high - low).abs() + 1.0, torch.ones_like(high)) * 4.0  # as _boost
    top = top_set(table, guaranteed)  # (n, guaranteed): real tokens only, since guaranteed <= every T_h
    table.scatter_(-1, top, table.gather(-1, top) + span[:, None])
    chosen = top_set(table.view(1, n * longest), min(budget * n, sum(lengths)))[0]
    # chosen is in slot order of the table, so each head's slots are one run of it
    counts = torch.bincount(chosen // longest, minlength=n).tolist()
    return [slots.view(1, 1, -1) for slots in (chosen % longest).split(counts)]


def _boost(s: torch.Tensor) -> torch.Tensor:
    finite = s[torch.isfinite(s)]
    span = (finite.max() - finite.min()).abs() + 1.0 if finite.numel() else torch.tensor(1.0)
    return span * 4.0
