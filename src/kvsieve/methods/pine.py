"""``pine``: position-invariant inference over independent segments (documents), by bidirectional attention between
segments and positions re-assigned by attention.

Wang et al., "Eliminating Position Bias of Language Models: A Mechanistic Approach" (2024, arXiv:2407.01100). A
prompt made of independent segments (retrieved documents, answer options) should not depend on their order, but
causal attention and RoPE make it do so. PINE, per layer, in the prefill pass:

- **bidirectional attention between segments**: a segment's tokens see every token of every other segment (and,
  causally, their own); the tokens before the segments (the prefix) and after them (the question) attend as usual;
- **positions by attention**: for the queries of each segment (and for the question after them), the other segments
  are put in order of how much attention those queries give them, computed *without* position encoding (so the input
  order plays no part), the most attended closest to the queries; the querying segment itself comes last. Keys and
  queries are re-rotated to those positions (RoPE is a rotation: rotating an already rotated key by ``new - old``
  places it at ``new``).

Segments are given per prompt, as token ranges of the stream (``set_segments(cache, model, [(start, end), ...])``,
``kvsieve.tasks.multidoc`` gives them for its samples); with none given the method is plain dense attention (so it
is bitwise ``dense`` in the registry-wide tests).

Simplifications: one segment order per layer and query segment, from the attention averaged over the layer's heads
(the paper orders per head); decoding steps attend at the original positions over what the prefill cached (the
prefill, which includes the question, is position-invariant; the generated tokens see the documents in input order);
the whole prompt must be prefilled in one pass without padding (a chunked or padded prefill is refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv

from ..attention import AttentionCall, dense
from ..errors import KVSieveError, UnsupportedModelError
from ..rope import find_inv_freq, rotate
from . import register
from .base import PrefillMethod

SHARED_KEY = "pine"


def set_segments(cache, model: torch.nn.Module, spans: list[tuple[int, int]]) -> None:
    """Declare the independent segments of the next prefill: token ranges ``[start, end)`` in stream order, not
    overlapping. Call it inside ``with Sieve(..., prefill="pine").attach(model) as cache:`` before the prefill."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        raise UnsupportedModelError(
            "pine re-positions segments on full-attention layers only, and this model has sliding-window layers "
            "(which would keep the input order); use a model whose layers are all full attention"
        )
    spans = [(int(a), int(b)) for a, b in spans]
    if len(spans) < 2:
        raise KVSieveError(f"pine needs at least two segments to reorder, got {len(spans)}; pass [(start, end), ...]")
    for (a, b), (c, _) in zip(spans, [*spans[1:], (None, None)], strict=True):
        if not 0 <= a < b or (c is not None and c != b):
            raise KVSieveError(
                f"pine segments must be non-empty, contiguous [start, end) ranges in order (each document with its "
                f"separator), got {spans}"
            )
    cache.shared[SHARED_KEY] = {"spans": spans, "inv_freq": find_inv_freq(model)}


def _views(prefix: int, spans: list[tuple[int, int]], total: int) -> list[tuple[int, int, int | None]]:
    """Query groups ``(start, end, segment index or None)``: the prefix, each segment, the suffix."""
    groups = [(0, prefix, None)] if prefix else []
    groups += [(a, b, i) for i, (a, b) in enumerate(spans)]
    if spans[-1][1] < total:
        groups.append((spans[-1][1], total, None))
    return groups


@register
@dataclass
class Pine(PrefillMethod):
    """Bidirectional attention between declared segments, segment positions re-assigned by attention (see module).

    No hyperparameters: the segments are per prompt (:func:`set_segments`); without them attention is dense.
    """

    name: ClassVar[str] = "pine"
    family: ClassVar[str] = "position bias"
    paper: ClassVar[str] = "Wang et al. 2024, arXiv:2407.01100"
    needs: ClassVar[str] = "segment spans per prompt, queries and keys"
    simplifications: ClassVar[str] = (
        "one segment order per layer (attention averaged over heads; the paper orders per head); decoding attends at "
        "the original positions; the prompt is prefilled in one pass without padding"
    )

    def attend(self, call: AttentionCall) -> torch.Tensor:
        setup = call.shared.get(SHARED_KEY)
        if setup is None:
            return dense(call)
        b, hq, q, _ = call.query.shape
        t = call.keys.shape[2]
        if t != q or call.valid is not None:
            raise KVSieveError(
                "pine reorders segments within one prefill pass: prefill the whole prompt at once, without padding "
                "(no chunk_size, batch size 1 or equal lengths)"
            )
        spans = setup["spans"]
        if spans[-1][1] > t:
            raise KVSieveError(
                f"pine segments end at token {spans[-1][1]}, beyond the prompt's {t} tokens; give spans within it"
            )
        inv_freq = setup["inv_freq"].to(call.query.device)
        pos = call.positions[0, 0].to(torch.float32)  # stream positions of the slots (0..T-1 in a prefill)
        g = hq // call.keys.shape[1]
        keys = repeat_kv(call.keys, g)
        values = repeat_kv(call.values, g)
        raw_k = rotate(keys, -pos, inv_freq)  # position-free keys and queries
        raw_q = rotate(call.query, -pos, inv_freq)
        prefix = spans[0][0]
        seg_of = torch.full((t,), -1, dtype=torch.long)
        for i, (a, e) in enumerate(spans):
            seg_of[a:e] = i
        out = torch.empty(b, q, hq, values.shape[-1], dtype=call.query.dtype, device=call.query.device)
        for start, end, own in _views(prefix, spans, t):
            rows = slice(start, end)
            if start < prefix:  # the prefix attends causally as usual
                out[:, rows] = self._attend(call, call.query[:, :, rows], keys[:, :, :end], values[:, :, :end], start)
                continue
            order = self._order(raw_q[:, :, rows], raw_k, call.scaling, spans, own)
            new_pos = pos.clone()
            at = prefix
            for j in order:  # least attended first, most attended last (closest to the queries)
                a, e = spans[j]
                new_pos[a:e] = torch.arange(at, at + e - a, dtype=torch.float32)
                at += e - a
            if own is not None:
                a, e = spans[own]
                new_pos[a:e] = torch.arange(at, at + e - a, dtype=torch.float32)
            visible = torch.arange(t) < end
            if own is not None:  # a segment sees the prefix and every other segment, not what follows them
                visible = (torch.arange(t) < spans[-1][1]) & ((seg_of != own) | (torch.arange(t) < end))
            cols = visible.nonzero().flatten()
            k = rotate(raw_k[:, :, cols], new_pos[cols], inv_freq)
            qr = rotate(raw_q[:, :, rows], new_pos[rows], inv_freq)
            mask = torch.ones(end - start, cols.numel(), dtype=torch.bool)
            in_group = (cols >= start) & (cols < end)  # causal among the queries' own tokens
            mask[:, in_group] = torch.ones(end - start, int(in_group.sum()), dtype=torch.bool).tril()
            if own is None:  # the prefix, gaps and suffix are causal over everything before them
                mask &= (cols[None, :] < end) & ((cols[None, :] < start) | in_group[None, :])
            o = F.scaled_dot_product_attention(qr, k, values[:, :, cols], attn_mask=mask, scale=call.scaling)
            out[:, rows] = o.transpose(1, 2)
        return out

    @staticmethod
    def _attend(call: AttentionCall, query, keys, values, start: int) -> torch.Tensor:
        q, t = query.shape[2], keys.shape[2]
        mask = torch.ones(q, t, dtype=torch.bool).tril(diagonal=t - q)
        o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=call.scaling)
        return o.transpose(1, 2)

    @staticmethod
    def _order(raw_q, raw_k, scaling: float, spans, own: int | None) -> list[int]:
        """Other segments by the position-free attention the queries give them, least attended first."""
        lo, hi = spans[0][0], spans[-1][1]
        logits = (raw_q.float() @ raw_k[:, :, lo:hi].float().transpose(-1, -2)) * scaling  # (B, Hq, r, S)
        probs = logits.softmax(dim=-1).mean(dim=(0, 1, 2))  # mean over batch, heads and queries: (S,)
        mass = [float(probs[a - lo : e - lo].sum()) for a, e in spans]
        others = [j for j in range(len(spans)) if j != own]
        return sorted(others, key=lambda j: (mass[j], -j))
