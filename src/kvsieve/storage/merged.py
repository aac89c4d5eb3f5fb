"""MiniCache's storage: two adjacent layers sharing one table of token directions, each keeping its magnitudes.

For each pair of layers the merged tokens' unit directions (SLERP of the two layers' directions) and the
merged/retained flags live in one :class:`MergedPair` that both layers' :class:`MergedSegment` reference; each layer
keeps its own magnitudes and its retained (unmerged) vectors. The deeper layer's ``nbytes()`` counts the pair, the
other's does not, so the cache's byte count is what is really held. See :mod:`kvsieve.methods.minicache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quantized import PackedSegment, shadow
from .segment import Segment


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
        # own copies: the segment's buffers may hold spare room
        self.dense: tuple[torch.Tensor, torch.Tensor] | None = (seg.keys.clone(), seg.values.clone())
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
