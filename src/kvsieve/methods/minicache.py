"""``minicache``: merge the KV cache of adjacent layers from the middle of the model down, in depth.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models" (NeurIPS 2024). KV states
of adjacent middle-to-deep layers are similar. For each pair of layers ``(l-1, l)`` from layer ``start`` on (the
middle by default), each token's key (and value) vectors are split into magnitude and direction; the two directions
are interpolated by SLERP with parameter ``t`` (``t`` weighs the deeper layer; the paper uses 0.6) and stored once for
both layers, while each layer keeps its own magnitudes. Token pairs whose directions differ too much are *retention
tokens*: both layers keep their own vectors, unmerged. A token is retained when its angular distance ``d`` (angle /
pi) exceeds ``d_min + gamma (d_max - d_min)``, the extremes taken over the (batch, head) row (the paper's relative
threshold, ``gamma = 0.05``): where adjacent layers are similar, most distances are near ``d_min`` and few tokens are
retained; where they are not, most are.

Storage (:class:`MergedSegment`): the shared directions and the merged/retained flags live in one
:class:`MergedPair` object both layers reference; the deeper layer's ``nbytes()`` counts it, the other's does not, so
the cache's byte count is what is really held. Reads rebuild ``direction x magnitude`` (and the retained vectors).

Merging needs both layers of a pair at once: ``pack`` of the first layer of a pair leaves its segment in the cache's
shared dict (``ctx.shared``) for the second, which merges both (per cache, so a new cache starts clean). Each pass,
both layers append their new tokens in full precision and the pair is merged again; merged tokens re-merge to
themselves (identical directions),
so nothing drifts.

Composition: ``minicache`` alone keeps every token; ``minicache:<method>`` evicts with the inner method first, and a
pair is merged only where both layers keep the same tokens (e.g. a position-based method such as
``streaming_llm(rerotate=False)``); otherwise its layers stay unmerged.

Simplifications: merging restarts from the dense states at every pass (simple and exact, ``O(T)`` per pass);
magnitudes are kept in the model's dtype. On the embedded SmolLM2-135M, keys of adjacent layers are nearly orthogonal
(mean cosine about 0 from layer 14 on, unlike the paper's 7B+ models), so at ``gamma = 0.05`` only about 1% of tokens
merge and the saving is small; larger ``gamma`` merges more at a visible cost in quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from ..storage import Segment
from ..storage.merged import MergedSegment, merge_pair
from ..storage.quantized import PackedSegment
from . import register
from .base import LayerContext, Wrapper, hp, overrides

PENDING = "minicache_pending"


@register
@dataclass
class MiniCache(Wrapper):
    """Merge layer pairs ``(start, start+1), (start+2, start+3), ...``: SLERP directions shared, magnitudes per layer.

    start: first layer merged (None: the middle, ``n_layers // 2``). t: SLERP parameter, weight of the deeper layer
    (the paper: 0.6). gamma: retention threshold, as a share of each row's angular-distance range above its minimum.
    """

    start: int | None = hp(None, ge=0)
    t: float = hp(0.6, ge=0.0, le=1.0)
    gamma: float = hp(0.05, ge=0.0, le=1.0)

    name = "minicache"
    family = "cross-layer merging"
    paper = "Liu et al. 2024, arXiv:2405.14366"
    needs = "keys and values of adjacent layers"
    simplifications = (
        "merging restarts from the dense states each pass; magnitudes kept in the model dtype; with eviction, a pair "
        "merges only where both layers keep the same tokens; on SmolLM2-135M adjacent layers' keys are nearly "
        "orthogonal, so at `gamma=0.05` about 1% of tokens merge"
    )

    def validate(self) -> None:
        if overrides(self.inner, "pack"):
            raise KVSieveError(
                "minicache merges plain storage; it cannot wrap a storage method (kivi, zipcache). "
                "Put the evicting method inside: minicache:streaming_llm(rerotate=False)"
            )

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        segment = super().pack(segment, ctx)
        layer_idx, n_layers, shared = ctx.layer_idx, ctx.n_layers, ctx.shared
        start = n_layers // 2 if self.start is None else self.start
        if layer_idx < start or (isinstance(segment, PackedSegment) and not isinstance(segment, MergedSegment)):
            return segment
        seg = segment if isinstance(segment, MergedSegment) else MergedSegment(segment)
        seg.materialize()
        pending = shared.setdefault(PENDING, {})
        key = (seg.head_start, seg.n_heads)
        if (layer_idx - start) % 2 == 0:
            pending[key] = (layer_idx, seg)
            return seg
        layer, partner = pending.pop(key, (None, None))
        if layer != layer_idx - 1 or partner.length != seg.length or not torch.equal(partner.positions, seg.positions):
            return seg
        partner.materialize()
        merge_pair(partner, seg, self.t, self.gamma)
        return seg
