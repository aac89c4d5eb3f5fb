"""Packed low-bit storage for the KV cache: segments whose bytes really drop, dequantised when attention reads them.

Building blocks:

- :func:`pack_bits` / :func:`unpack_bits`: integer codes of 2, 4 or 8 bits, packed along the last dimension into
  ``uint8`` (four 2-bit or two 4-bit codes per byte).
- :func:`quantize`: asymmetric min-max quantisation over one dimension. Scale and zero point are stored in fp16
  (fp32 where a value is beyond fp16's range), rounded outward so that every input lies inside the quantisation grid:
  the error of each element is at most half a step, ``scale / 2``.
- :class:`PackedSegment`: a :class:`~kvsieve.storage.Segment` whose keys and values are held in another form. Token
  bookkeeping (positions, padding flags, method state, re-rotation shifts) lives in a shadow ``Segment`` with
  zero-width keys, so ``append``/``gather``/``split_heads`` keep the core's exact semantics for it; subclasses store
  the tensors. Packed storage keeps tokens in slot order: its ``keep`` is the order-preserving ``gather``.
- :class:`KiviSegment`: KIVI's layout. Keys are quantised per channel in groups of ``group`` tokens, values per token;
  the most recent ``residual`` (to ``residual + group - 1``) tokens stay in full precision.
- :class:`MixedSegment`: ZipCache's layout. Every token of every head is in one of three classes, full precision,
  low-bit or high-bit, held as flat row tables (one row per token and head, in (batch, head, token) order), so heads
  may hold different numbers of tokens in each class. Quantisation is channel-separable and tokenwise: each channel
  is divided by ``sqrt(max |x|)`` over the tokens first quantised, then each (token, head) row is quantised.

``nbytes()`` counts every tensor a segment holds for its keys and values: codes, scales, zero points, normalisers,
group tables, class flags and full-precision rows. Position and method-state bookkeeping is ``aux_nbytes()``.
"""

from __future__ import annotations

import torch

from .segment import Segment

PARAM_DTYPE = torch.float16
FP16_MAX = 60000.0  # beyond this a scale or zero point is kept in fp32


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors if t is not None)


# --- bit packing ----------------------------------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., D)`` (values < 2**bits) into ``uint8`` ``(..., D * bits // 8)``."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    d = codes.shape[-1]
    if d % per:
        raise ValueError(f"the last dimension ({d}) must be a multiple of {per} to pack {bits}-bit codes")
    grouped = codes.reshape(*codes.shape[:-1], d // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` ``(..., D * bits // 8)`` to codes ``(..., D)``."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], d)


# --- quantisation ---------------------------------------------------------------------------------------------------
def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, never above ``x``."""
    y = x.to(dtype)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, never below ``x``."""
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def quantize(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max quantisation of ``x`` over ``dim``.

    Returns ``(packed codes, scale, zero)``: codes packed along the last dimension, ``scale``/``zero`` with ``dim``
    reduced to size 1. Dequantised value = ``code * scale + zero``; each element is within ``scale / 2`` of ``x``.
    """
    x = x.to(torch.float32)
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    peak = float(x.abs().max()) if x.numel() else 0.0
    dtype = PARAM_DTYPE if peak < FP16_MAX else torch.float32  # nan/inf peaks fail the test too
    zero = _round_down(lo, dtype)
    scale = _round_up((hi - zero.float()) / levels, dtype)
    step = scale.float()
    codes = torch.round((x - zero.float()) / torch.where(step > 0, step, torch.ones_like(step)))
    codes = codes.clamp(0, levels)
    return pack_bits(codes, bits), scale, zero


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """``code * scale + zero`` in float32, codes unpacked to last dimension ``d``."""
    return unpack_bits(packed, bits, d).to(torch.float32) * scale.float() + zero.float()


# --- segments -------------------------------------------------------------------------------------------------------
class PackedSegment(Segment):
    """A segment whose keys and values are stored in another form (quantised, shared across layers).

    ``meta`` is a plain :class:`Segment` holding the token bookkeeping with zero-width keys and values; positions,
    padding flags, per-token method state and re-rotation shifts are read through it, so the core's
    ``append``/``gather``/``split_heads`` semantics apply to them unchanged. Reading ``keys``/``values`` returns the
    dense tensors :meth:`read` reconstructs; :meth:`write` (merging) replaces the storage with dense tensors in full
    precision, to be packed again after the pass.
    """

    def __init__(self, meta: Segment, dtype: torch.dtype):
        self.meta = meta
        self.dtype = dtype

    # bookkeeping lives in the shadow segment
    head_start = property(lambda self: self.meta.head_start, lambda self, v: setattr(self.meta, "head_start", v))
    positions = property(lambda self: self.meta.positions)
    valid = property(lambda self: self.meta.valid)
    shift = property(lambda self: self.meta.shift)
    state = property(lambda self: self.meta.state, lambda self, v: setattr(self.meta, "state", v))
    length = property(lambda self: self.meta.length)
    n_heads = property(lambda self: self.meta.n_heads)
    capacity = property(lambda self: self.meta.length)

    @property
    def keys(self) -> torch.Tensor:
        return self.read()[0]

    @property
    def values(self) -> torch.Tensor:
        return self.read()[1]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(heads={self.n_heads}, tokens={self.length}, nbytes={self.nbytes()})"

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions, valid, shift=None) -> None:
        """Append new tokens ``(B, h, q, D)`` in full precision; bookkeeping arguments as ``Segment.append``."""
        self.meta.append(keys[..., :0], values[..., :0], positions, valid, shift=shift)
        self._append(keys, values)

    def keep(self, index: torch.Tensor) -> None:
        self.gather(index)

    def drop_one(self, victim: torch.Tensor) -> None:
        """Evict the slot ``victim`` ``(B, h, 1)`` of every (batch, head), keeping slot order."""
        slots = torch.arange(self.length - 1, device=victim.device).expand(*victim.shape[:2], -1)
        self.gather(slots + (slots >= victim).to(slots.dtype))

    def gather(self, index: torch.Tensor) -> None:
        """Keep the tokens at ``index`` ``(B, h, k)``, in slot order."""
        index = index.sort(dim=-1).values
        self._gather(index)
        self.meta.gather(index)

    def truncate(self, length: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot roll back appended tokens")

    def write(self, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, head: int | None = None) -> None:
        """Overwrite the tokens at ``index``: the storage becomes dense until it is packed again."""
        k, v = (t.clone() for t in self.read())
        kk, vv = (k, v) if head is None else (k[:, head : head + 1], v[:, head : head + 1])
        kk.scatter_(2, index[..., None].expand(*index.shape, k.shape[-1]), keys.to(k.dtype))
        vv.scatter_(2, index[..., None].expand(*index.shape, v.shape[-1]), values.to(v.dtype))
        self._assign_dense(k, v)

    def split_heads(self) -> list[Segment]:
        metas = self.meta.split_heads()
        return [self._head(h, meta) for h, meta in enumerate(metas)]

    def clone(self) -> Segment:
        raise NotImplementedError(f"{type(self).__name__} cannot be cloned")

    def reserved_nbytes(self) -> int:
        return self.nbytes()

    def aux_nbytes(self) -> int:
        return self.meta.aux_nbytes()

    # storage interface for subclasses
    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def _gather(self, index: torch.Tensor) -> None:
        raise NotImplementedError

    def _head(self, h: int, meta: Segment) -> Segment:
        raise NotImplementedError

    def _assign_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError


def shadow(seg: Segment) -> Segment:
    """The bookkeeping of a plain segment as a shadow segment with zero-width keys and values."""
    return Segment(
        seg.head_start, seg.keys[..., :0], seg.values[..., :0], seg.positions, seg.valid, dict(seg.state), seg.shift
    )


def _group_of_token(sizes: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Group index ``(B, h, T)`` of each token given group sizes ``(B, h, G)`` (tokens of a group are contiguous)."""
    ends = sizes.cumsum(dim=-1)
    t = torch.arange(n_tokens, device=sizes.device).expand(*sizes.shape[:2], n_tokens).contiguous()
    return torch.searchsorted(ends.contiguous(), t, right=True)


class KiviSegment(PackedSegment):
    """KIVI storage: keys quantised per channel in groups of ``group`` tokens, values per token; a recent residual.

    Shapes: ``kc``/``vc`` ``(B, h, Tq, D * bits / 8)`` uint8; key tables ``ks``/``kz`` ``(B, h, G, D)`` with group
    sizes ``kn`` ``(B, h, G)`` int32 (groups shrink when tokens are evicted); value parameters ``vs``/``vz``
    ``(B, h, Tq, 1)``; the full-precision residual ``rk``/``rv`` ``(B, h, R, D)`` holds the newest ``R`` tokens.
    """

    def __init__(self, seg: Segment, bits: int, group: int, residual: int):
        super().__init__(shadow(seg), seg.keys.dtype)
        b, h, _, d = seg.keys.shape
        self.bits, self.group, self.residual, self.d = bits, group, residual, d
        dev = seg.keys.device
        self.kc = torch.zeros(b, h, 0, d * bits // 8, dtype=torch.uint8, device=dev)
        self.vc = self.kc.clone()
        self.ks = torch.zeros(b, h, 0, d, dtype=PARAM_DTYPE, device=dev)
        self.kz = self.ks.clone()
        self.kn = torch.zeros(b, h, 0, dtype=torch.int32, device=dev)
        self.vs = torch.zeros(b, h, 0, 1, dtype=PARAM_DTYPE, device=dev)
        self.vz = self.vs.clone()
        self.rk, self.rv = seg.keys.clone(), seg.values.clone()  # own copies, without the spare room

    @property
    def n_quantized(self) -> int:
        return self.kc.shape[2]

    def compress(self) -> None:
        """Quantise the oldest residual tokens in whole groups, keeping at least ``residual`` in full precision."""
        n_move = (self.rk.shape[2] - self.residual) // self.group * self.group
        if n_move <= 0:
            return
        b, h, _, d = self.rk.shape
        n_groups = n_move // self.group
        keys = self.rk[:, :, :n_move].reshape(b, h, n_groups, self.group, d)
        kc, ks, kz = quantize(keys, self.bits, dim=-2)  # per channel within each group of tokens
        vc, vs, vz = quantize(self.rv[:, :, :n_move], self.bits, dim=-1)  # per token
        self.kc = torch.cat([self.kc, kc.reshape(b, h, n_move, -1)], dim=2)
        self.ks = _cat_param(self.ks, ks.reshape(b, h, n_groups, d))
        self.kz = _cat_param(self.kz, kz.reshape(b, h, n_groups, d))
        sizes = torch.full((b, h, n_groups), self.group, dtype=torch.int32, device=self.kn.device)
        self.kn = torch.cat([self.kn, sizes], dim=2)
        self.vc = torch.cat([self.vc, vc], dim=2)
        self.vs, self.vz = _cat_param(self.vs, vs), _cat_param(self.vz, vz)
        self.rk, self.rv = self.rk[:, :, n_move:].clone(), self.rv[:, :, n_move:].clone()

    def _dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        tq, d = self.n_quantized, self.d
        groups = _group_of_token(self.kn, tq)[..., None].expand(-1, -1, -1, d)
        ks, kz = self.ks.gather(2, groups), self.kz.gather(2, groups)
        keys = dequantize(self.kc, ks, kz, self.bits, d)
        values = dequantize(self.vc, self.vs, self.vz, self.bits, d)
        return keys.to(self.dtype), values.to(self.dtype)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_quantized == 0:
            return self.rk, self.rv
        keys, values = self._dequantized()
        return torch.cat([keys, self.rk], dim=2), torch.cat([values, self.rv], dim=2)

    def nbytes(self) -> int:
        return _nbytes(self.kc, self.vc, self.ks, self.kz, self.kn, self.vs, self.vz, self.rk, self.rv)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.rk = torch.cat([self.rk, keys.to(self.dtype)], dim=2)
        self.rv = torch.cat([self.rv, values.to(self.dtype)], dim=2)

    def _gather(self, index: torch.Tensor) -> None:
        tq = self.n_quantized
        in_q = (index < tq).sum(dim=-1)  # quantised tokens kept, per (batch, head)
        keep_q = int(in_q.min())
        # Heads that keep more quantised tokens than the fewest return the surplus to the residual, as the values
        # they decode to, so the quantised part stays rectangular across heads.
        if int(in_q.max()) > keep_q:
            dk, dv = self._dequantized()
            full_k, full_v, offset = torch.cat([dk, self.rk], dim=2), torch.cat([dv, self.rv], dim=2), 0
        else:
            full_k, full_v, offset = self.rk, self.rv, tq
        rest = index[..., keep_q:]
        d = self.d
        self.rk = full_k.gather(2, (rest - offset)[..., None].expand(-1, -1, -1, d))
        self.rv = full_v.gather(2, (rest - offset)[..., None].expand(-1, -1, -1, d))
        q_idx = index[..., :keep_q]
        groups = _group_of_token(self.kn, tq).gather(2, q_idx).long()
        counts = torch.zeros(self.kn.shape, dtype=torch.int32, device=self.kn.device)
        counts.scatter_add_(2, groups, torch.ones_like(groups, dtype=torch.int32))
        used = counts.sum(dim=(0, 1)) > 0  # drop groups that no head uses any more
        self.kn = counts[:, :, used]
        self.ks, self.kz = self.ks[:, :, used], self.kz[:, :, used]
        cw = self.kc.shape[-1]
        self.kc = self.kc.gather(2, q_idx[..., None].expand(-1, -1, -1, cw))
        self.vc = self.vc.gather(2, q_idx[..., None].expand(-1, -1, -1, cw))
        self.vs = self.vs.gather(2, q_idx[..., None])
        self.vz = self.vz.gather(2, q_idx[..., None])

    def _head(self, h: int, meta: Segment) -> Segment:
        out = KiviSegment.__new__(KiviSegment)
        PackedSegment.__init__(out, meta, self.dtype)
        out.bits, out.group, out.residual, out.d = self.bits, self.group, self.residual, self.d
        sl = slice(h, h + 1)
        for name in ("kc", "vc", "ks", "kz", "kn", "vs", "vz", "rk", "rv"):
            setattr(out, name, getattr(self, name)[:, sl].clone())
        used = out.kn.sum(dim=(0, 1)) > 0
        out.kn, out.ks, out.kz = out.kn[:, :, used], out.ks[:, :, used], out.kz[:, :, used]
        return out

    def _assign_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name in ("kc", "vc"):
            setattr(self, name, getattr(self, name)[:, :, :0])
        self.ks, self.kz = self.ks[:, :, :0], self.kz[:, :, :0]
        self.kn = self.kn[:, :, :0]
        self.vs, self.vz = self.vs[:, :, :0], self.vz[:, :, :0]
        self.rk, self.rv = keys.to(self.dtype), values.to(self.dtype)


def _cat_param(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Concatenate parameter tables along tokens/groups, promoting to the wider dtype if one is fp32."""
    if old.dtype != new.dtype:
        wide = torch.float32
        old, new = old.to(wide), new.to(wide)
    return torch.cat([old, new], dim=2)


FP, LOW, HIGH = 0, 1, 2  # MixedSegment token classes


def _interleave(rows_a: torch.Tensor, at_a: torch.Tensor, rows_b: torch.Tensor, at_b: torch.Tensor) -> torch.Tensor:
    """Rows of two tables merged in the order of their flat (batch, head, token) indices ``at_*``."""
    order = torch.cat([at_a, at_b]).argsort(stable=True)
    return torch.cat([rows_a, rows_b])[order]


class MixedSegment(PackedSegment):
    """ZipCache storage: per (token, head) a class, full precision, ``low_bits`` or ``high_bits``; flat row tables.

    ``cls`` ``(B, h, T)`` uint8 holds each token's class. Rows of each class are kept in (batch, head, token) order:
    full precision ``fk``/``fv`` ``(N0, D)``; quantised ``qk[c]``/``qv[c]`` = (codes ``(Nc, D*bits/8)``, scale
    ``(Nc, 1)``, zero ``(Nc, 1)``). ``ck``/``cv`` ``(B, h, 1, D)`` fp16 are the channel normalisers
    ``sqrt(max |x|)``, computed on the first tokens quantised and reused for later ones.
    """

    def __init__(self, seg: Segment, high_bits: int, low_bits: int):
        super().__init__(shadow(seg), seg.keys.dtype)
        b, h, t, d = seg.keys.shape
        self.bits = {LOW: low_bits, HIGH: high_bits}
        self.d = d
        self.cls = torch.zeros(b, h, t, dtype=torch.uint8, device=seg.keys.device)
        self.fk, self.fv = seg.keys.reshape(-1, d), seg.values.reshape(-1, d)
        empty = {c: _empty_rows(d, self.bits[c], seg.keys.device) for c in (LOW, HIGH)}
        self.qk = dict(empty)
        self.qv = {c: tuple(t.clone() for t in rows) for c, rows in empty.items()}
        self.ck: torch.Tensor | None = None
        self.cv: torch.Tensor | None = None

    def counts(self) -> dict[int, int]:
        """Token-head rows held per class."""
        return {c: int((self.cls == c).sum()) for c in (FP, LOW, HIGH)}

    def quantize_tokens(self, mask: torch.Tensor, salient: torch.Tensor) -> None:
        """Quantise the full-precision tokens in ``mask`` ``(B, h, T)``: ``salient`` ones at high bits, others low."""
        mask = mask & (self.cls == FP)
        if not bool(mask.any()):
            return
        dense_k, dense_v = self._dense_fp()
        if self.ck is None:
            self.ck, self.cv = _channel_norm(dense_k, mask), _channel_norm(dense_v, mask)
        b, h, t, d = dense_k.shape
        flat = torch.arange(b * h * t, device=mask.device).view(b, h, t)
        for c, chosen in ((HIGH, mask & salient), (LOW, mask & ~salient)):
            if not bool(chosen.any()):
                continue
            nk = self.ck.expand(b, h, t, d)[chosen].float()
            nv = self.cv.expand(b, h, t, d)[chosen].float()
            rows_k = quantize(dense_k[chosen].float() / nk, self.bits[c], dim=-1)
            rows_v = quantize(dense_v[chosen].float() / nv, self.bits[c], dim=-1)
            at_old, at_new = flat[self.cls == c], flat[chosen]
            self.qk[c] = tuple(_interleave(o, at_old, n, at_new) for o, n in zip(self.qk[c], rows_k, strict=True))
            self.qv[c] = tuple(_interleave(o, at_old, n, at_new) for o, n in zip(self.qv[c], rows_v, strict=True))
        keep_fp = ~mask[self.cls == FP]
        self.fk, self.fv = self.fk[keep_fp], self.fv[keep_fp]
        self.cls = torch.where(mask, torch.where(salient, HIGH, LOW).to(torch.uint8), self.cls)

    def _dense_fp(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, t = self.cls.shape
        k = torch.zeros(b, h, t, self.d, dtype=self.dtype, device=self.cls.device)
        v = torch.zeros_like(k)
        fp = self.cls == FP
        k[fp], v[fp] = self.fk, self.fv
        return k, v

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rebuild(self.fk, self.qk, self.ck), self._rebuild(self.fv, self.qv, self.cv)

    def _rebuild(self, fp_rows: torch.Tensor, q_rows: dict, norm: torch.Tensor | None) -> torch.Tensor:
        """Dense ``(B, h, T, D)``: full-precision rows as they are, quantised rows dequantised and de-normalised."""
        b, h, t = self.cls.shape
        flat = self.cls.reshape(-1)
        out = torch.empty(b * h * t, self.d, dtype=torch.float32, device=self.cls.device)
        out[flat == FP] = fp_rows.to(torch.float32)
        for c in (LOW, HIGH):
            rows = q_rows[c]
            if rows[0].shape[0]:
                out[flat == c] = dequantize(*rows, self.bits[c], self.d)
        out = out.view(b, h, t, self.d)
        if norm is not None:  # quantised rows live in the normalised domain
            out = torch.where((self.cls != FP)[..., None], out * norm.to(torch.float32), out)
        return out.to(self.dtype)

    def nbytes(self) -> int:
        quantized = [t for c in (LOW, HIGH) for rows in (self.qk[c], self.qv[c]) for t in rows]
        return _nbytes(self.cls, self.fk, self.fv, self.ck, self.cv, *quantized)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, h, q, d = keys.shape
        t_old = self.cls.shape[2]
        t_new = t_old + q
        flat = torch.arange(b * h * t_new, device=keys.device).view(b, h, t_new)
        at_old = flat[:, :, :t_old][self.cls == FP]
        at_new = flat[:, :, t_old:].reshape(-1)
        self.fk = _interleave(self.fk, at_old, keys.to(self.dtype).reshape(-1, d), at_new)
        self.fv = _interleave(self.fv, at_old, values.to(self.dtype).reshape(-1, d), at_new)
        self.cls = torch.cat([self.cls, torch.zeros(b, h, q, dtype=torch.uint8, device=keys.device)], dim=2)

    def _gather(self, index: torch.Tensor) -> None:
        keep = torch.zeros(self.cls.shape, dtype=torch.bool, device=index.device)
        keep.scatter_(2, index, True)
        sel = keep[self.cls == FP]
        self.fk, self.fv = self.fk[sel], self.fv[sel]
        for c in (LOW, HIGH):
            sel = keep[self.cls == c]
            self.qk[c] = tuple(t[sel] for t in self.qk[c])
            self.qv[c] = tuple(t[sel] for t in self.qv[c])
        self.cls = self.cls.gather(2, index)

    def _head(self, h: int, meta: Segment) -> Segment:
        out = MixedSegment.__new__(MixedSegment)
        PackedSegment.__init__(out, meta, self.dtype)
        out.bits, out.d = self.bits, self.d
        heads = torch.arange(self.cls.shape[1], device=self.cls.device)[None, :, None].expand_as(self.cls)
        mine = heads == h
        out.fk, out.fv = self.fk[mine[self.cls == FP]], self.fv[mine[self.cls == FP]]
        out.qk, out.qv = {}, {}
        for c in (LOW, HIGH):
            sel = mine[self.cls == c]
            out.qk[c] = tuple(t[sel].clone() for t in self.qk[c])
            out.qv[c] = tuple(t[sel].clone() for t in self.qv[c])
        out.cls = self.cls[:, h : h + 1].clone()
        out.ck = None if self.ck is None else self.ck[:, h : h + 1].clone()
        out.cv = None if self.cv is None else self.cv[:, h : h + 1].clone()
        return out

    def _assign_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        d = self.d
        self.cls = torch.zeros(keys.shape[:3], dtype=torch.uint8, device=keys.device)
        self.fk, self.fv = keys.to(self.dtype).reshape(-1, d), values.to(self.dtype).reshape(-1, d)
        for c in (LOW, HIGH):
            self.qk[c] = _empty_rows(d, self.bits[c], keys.device)
            self.qv[c] = _empty_rows(d, self.bits[c], keys.device)


def _empty_rows(d: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.zeros(0, d * bits // 8, dtype=torch.uint8, device=device),
        torch.zeros(0, 1, dtype=PARAM_DTYPE, device=device),
        torch.zeros(0, 1, dtype=PARAM_DTYPE, device=device),
    )


def _channel_norm(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ZipCache's channel normaliser ``sqrt(max |x|)`` over the tokens in ``mask``: ``(B, h, 1, D)`` fp16."""
    peak = x.float().abs().masked_fill(~mask[..., None], 0.0).amax(dim=2, keepdim=True)
    return peak.sqrt().clamp(min=1e-3, max=FP16_MAX).to(PARAM_DTYPE)
