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

Merging needs both layers of a pair at once, which ``pack(segment)`` alone does not give: ``observe`` records the
layer index and the cache's shared dict (``obs.shared``), and ``pack`` of the first layer of a pair leaves its segment
there for the second, which merges both (per cache, so a new cache starts clean). Each pass, both layers append their
new tokens in full precision and the pair is merged again; merged tokens re-merge to themselves (identical directions),
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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cache import Segment
from ..errors import KVSieveError
from ..quant import PackedSegment, shadow
from . import register
from .base import Observation
from .pyramidkv import Wrapper, packs

PENDING = "minicache_pending"


@dataclass
class MergedPair:
    """What two merged layers share: per-token merged flags ``(B, h, T)`` and unit directions ``(N, D)`` for keys and
    for values (rows in (batch, head, token) order of the merged tokens)."""

    mask_k: torch.Tensor
    mask_v: torch.Tensor
    dir_k: torch.Tensor
    dir_v: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (self.mask_k, self.mask_v, self.dir_k, self.dir_v))


class MergedSegment(PackedSegment):
    """One layer's side of a merged pair, or (before merging) plain dense storage.

    Merged: ``pair`` (shared), magnitudes ``mag_k``/``mag_v`` ``(N, 1)`` of the merged tokens and retained vectors
    ``ret_k``/``ret_v`` ``(M, D)`` of the others, this layer's own. ``owner``: whether this side counts the pair.
    """

    def __init__(self, seg: Segment):
        super().__init__(shadow(seg), seg.keys.dtype)
        self.dense: tuple[torch.Tensor, torch.Tensor] | None = (seg.keys, seg.values)
        self.pair: MergedPair | None = None
        self.owner = False
        self.mag_k = self.mag_v = self.ret_k = self.ret_v = None

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dense is not None:
            return self.dense
        p = self.pair
        return (
            _rebuild(p.mask_k, p.dir_k, self.mag_k, self.ret_k, self.dtype),
            _rebuild(p.mask_v, p.dir_v, self.mag_v, self.ret_v, self.dtype),
        )

    def nbytes(self) -> int:
        if self.dense is not None:
            return sum(t.nelement() * t.element_size() for t in self.dense)
        own = sum(t.nelement() * t.element_size() for t in (self.mag_k, self.mag_v, self.ret_k, self.ret_v))
        return own + (self.pair.nbytes() if self.owner else 0)

    def materialize(self) -> None:
        """Back to dense storage (before new tokens arrive or tokens are evicted); drops this side's pair reference."""
        if self.dense is None:
            self.dense = self.read()
            self.pair, self.owner = None, False
            self.mag_k = self.mag_v = self.ret_k = self.ret_v = None

    def set_merged(self, pair: MergedPair, owner: bool, mag_k, mag_v, ret_k, ret_v) -> None:
        self.dense, self.pair, self.owner = None, pair, owner
        self.mag_k, self.mag_v, self.ret_k, self.ret_v = mag_k, mag_v, ret_k, ret_v

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.materialize()
        k, v = self.dense
        self.dense = (torch.cat([k, keys.to(self.dtype)], dim=2), torch.cat([v, values.to(self.dtype)], dim=2))

    def _gather(self, index: torch.Tensor) -> None:
        self.materialize()
        k, v = self.dense
        idx = index[..., None].expand(-1, -1, -1, k.shape[-1])
        self.dense = (k.gather(2, idx), v.gather(2, idx))

    def _head(self, h: int, meta: Segment) -> Segment:
        keys, values = self.read()
        out = MergedSegment.__new__(MergedSegment)
        PackedSegment.__init__(out, meta, self.dtype)
        out.dense = (keys[:, h : h + 1].clone(), values[:, h : h + 1].clone())
        out.pair, out.owner = None, False
        out.mag_k = out.mag_v = out.ret_k = out.ret_v = None
        return out

    def _assign_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.set_merged(None, False, None, None, None, None)
        self.dense = (keys.to(self.dtype), values.to(self.dtype))


def _rebuild(mask, direction, magnitude, retained, dtype) -> torch.Tensor:
    out = torch.empty(*mask.shape, direction.shape[-1], dtype=dtype, device=mask.device)
    out[mask] = (direction * magnitude).to(dtype)
    out[~mask] = retained.to(dtype)
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors ``a`` and ``b`` (``t = 0`` gives ``a``); unit vectors out."""
    cos = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    near = sin.abs() < 1e-4  # (anti)parallel: normalised linear interpolation
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(near, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    return F.normalize(wa * a + wb * b, dim=-1)


def merge_states(shallow: torch.Tensor, deep: torch.Tensor, t: float, gamma: float, valid: torch.Tensor | None):
    """Merge two layers' states ``(B, h, T, D)``.

    Returns ``(merged flags (B, h, T), directions (N, D), shallow magnitudes (N, 1), deep magnitudes (N, 1),
    shallow retained (M, D), deep retained (M, D))`` with ``N + M = B x h x T``.
    """
    a, b = shallow.to(torch.float32), deep.to(torch.float32)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ea, eb = a / na.clamp(min=1e-30), b / nb.clamp(min=1e-30)
    # angle from the chord (accurate near 0, exactly 0 for equal directions), as a share of pi: (B, h, T) in [0, 1]
    distance = 2.0 * torch.asin(((ea - eb).norm(dim=-1) / 2.0).clamp(max=1.0)) / math.pi
    usable = (na[..., 0] > 0) & (nb[..., 0] > 0)
    if valid is not None:
        usable = usable & valid
    big, small = torch.finfo(torch.float32).max, torch.finfo(torch.float32).min
    d_min = distance.masked_fill(~usable, big).amin(dim=-1, keepdim=True)
    d_max = distance.masked_fill(~usable, small).amax(dim=-1, keepdim=True)
    threshold = d_min + gamma * (d_max - d_min)
    merged = usable & ~(distance > threshold)
    direction = slerp(ea[merged], eb[merged], t).to(shallow.dtype)
    return (merged, direction, na[merged].to(shallow.dtype), nb[merged].to(deep.dtype), shallow[~merged], deep[~merged])


def merge_pair(shallow: MergedSegment, deep: MergedSegment, t: float, gamma: float) -> None:
    """Merge two dense segments holding the same tokens; the deeper one owns the shared part."""
    (ka, va), (kb, vb) = shallow.read(), deep.read()
    mk, dk, mag_ka, mag_kb, rka, rkb = merge_states(ka, kb, t, gamma, shallow.valid)
    mv, dv, mag_va, mag_vb, rva, rvb = merge_states(va, vb, t, gamma, shallow.valid)
    pair = MergedPair(mk, mv, dk, dv)
    shallow.set_merged(pair, False, mag_ka, mag_va, rka, rva)
    deep.set_merged(pair, True, mag_kb, mag_vb, rkb, rvb)


@register
@dataclass
class MiniCache(Wrapper):
    """Merge layer pairs ``(start, start+1), (start+2, start+3), ...``: SLERP directions shared, magnitudes per layer.

    start: first layer merged (None: the middle, ``n_layers // 2``). t: SLERP parameter, weight of the deeper layer
    (the paper: 0.6). gamma: retention threshold, as a share of each row's angular-distance range above its minimum.
    """

    start: int | None = None
    t: float = 0.6
    gamma: float = 0.05

    name = "minicache"
    family = "cross-layer merging"
    paper = "Liu et al. 2024, arXiv:2405.14366"
    needs = "keys and values of adjacent layers"
    evicts = False
    default_inner = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.t <= 1.0:
            raise KVSieveError(f"t (SLERP parameter) must be in [0, 1], got {self.t}")
        if not 0.0 <= self.gamma <= 1.0:
            raise KVSieveError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.start is not None and self.start < 0:
            raise KVSieveError(f"start layer must be >= 0, got {self.start}")
        if packs(self.inner):
            raise KVSieveError(
                "minicache merges plain storage; it cannot wrap a storage method (kivi, zipcache). "
                "Put the evicting method inside: minicache:streaming_llm(rerotate=False)"
            )
        self.evicts = self.inner is not None and self.inner.evicts
        self._ctx: tuple | None = None  # (layer index, layers, the cache's shared dict) of the last observation

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        self._ctx = (obs.layer_idx, obs.n_layers, obs.shared)

    def pack(self, segment: Segment) -> Segment:
        segment = super().pack(segment)
        if self._ctx is None:
            return segment
        layer_idx, n_layers, shared = self._ctx
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
