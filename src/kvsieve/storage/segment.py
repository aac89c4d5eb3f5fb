"""Token storage of one cache layer: buffers that grow like a vector and shrink by filling holes.

A :class:`Segment` holds the tokens of a contiguous range of KV heads, every head with the same number of tokens.
Keys and values live in preallocated ``(B, h, capacity, D)`` buffers; the first ``length`` slots are held:

* **append** writes new tokens into spare room; when the room runs out the buffer grows to ``need + need / 8``
  (at least 16 more slots), so appending a token costs O(1) amortised, never a copy of the layer;
* **keep** (eviction) frees the slots of evicted tokens and moves the kept tokens that sit beyond the new length
  into those holes: a decoding step that evicts one token moves at most one row per head. Slot order is then no
  longer stream order; every token carries its stream ``position``, which is what methods use for order
  ("recent", "neighbour", "sink"). ``gather`` is the order-preserving variant (used after a prefill pass, where a
  stable layout costs no more than the moves);
* after an eviction the buffer shrinks when its spare room exceeds ``max(32, length / 4)`` slots.

So the spare room of a segment never exceeds ``max(32, length / 4)`` slots after a forward pass: ``nbytes()`` is what
is held (``length`` tokens), ``reserved_nbytes()`` what is allocated, and ``reserved <= held x 1.25 + 32 slots``.

Beside keys and values a segment holds, per token: the stream position, whether the token is real or left padding
(``valid``, None while all are real), the re-rotation shift of layers that re-index positions (``shift``, None
otherwise; see :mod:`kvsieve.cache`) and the method's per-token state (``state``: ``name -> (B, h, T, ...)``).
Eviction moves all of them together, so they never fall out of step.
"""

from __future__ import annotations

import torch

GROW_MIN = 16  # slots added at least when a buffer grows
SHRINK_MIN = 32  # spare slots always tolerated before shrinking


def grown_capacity(need: int) -> int:
    """Capacity allocated when ``need`` slots do not fit: 1/8 more, at least ``GROW_MIN`` more."""
    return need + max(GROW_MIN, need // 8)


def max_spare(length: int) -> int:
    """Spare slots a segment may keep after a forward pass: ``max(SHRINK_MIN, length / 4)``."""
    return max(SHRINK_MIN, length // 4)


class Segment:
    """Tokens of KV heads ``head_start .. head_start + h - 1`` with the same count per head.

    Shapes (``T`` = ``length``): ``keys``/``values`` ``(B, h, T, D)``; ``positions`` ``(B, h, T)`` int64; ``valid``
    ``(B, h, T)`` bool or None; ``shift`` ``(B, h, T)`` int64 or None; each ``state`` tensor ``(B, h, T, ...)``.
    The properties are views of the held part of the buffers.
    """

    def __init__(
        self,
        head_start: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        state: dict[str, torch.Tensor] | None = None,
        shift: torch.Tensor | None = None,
    ):
        self.head_start = head_start
        self.length = 0
        b, h, t, _ = keys.shape
        self._k = keys.new_empty((b, h, t, keys.shape[-1]))
        self._v = values.new_empty((b, h, t, values.shape[-1]))
        self._pos = positions.new_empty((b, h, t))
        self._valid: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None
        # re-indexing layers: ((batch, head, slot) of each row held rotated by its shift, its pristine key)
        self.side: tuple[torch.Tensor, torch.Tensor] | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.append(keys, values, positions, valid, shift=shift)
        if state:
            self.state = dict(state)

    # --- views ------------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self._pos[:, :, : self.length]

    @property
    def valid(self) -> torch.Tensor | None:
        return None if self._valid is None else self._valid[:, :, : self.length]

    @property
    def shift(self) -> torch.Tensor | None:
        return None if self._shift is None else self._shift[:, :, : self.length]

    @property
    def n_heads(self) -> int:
        return self._k.shape[1]

    @property
    def heads(self) -> slice:
        return slice(self.head_start, self.head_start + self.n_heads)

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys and values for attention. Storage subclasses (quantised, merged) reconstruct them here."""
        return self.keys, self.values

    def rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The key buffer as ``(B * h * capacity, D)`` rows (a view)."""
        return self._k.view(-1, self._k.shape[-1])

    def flat_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Row numbers in :meth:`rows` of ``(batch, head, slot)`` triples ``index`` ``(N, 3)``."""
        h, cap = self._k.shape[1], self._k.shape[2]
        return (index[:, 0] * h + index[:, 1]) * cap + index[:, 2]

    # --- growth -----------------------------------------------------------------------------------------------------
    def _resize(self, capacity: int) -> None:
        """Move the held tokens into buffers of ``capacity`` slots."""
        n = self.length

        def moved(buf: torch.Tensor | None) -> torch.Tensor | None:
            if buf is None:
                return None
            out = buf.new_empty((*buf.shape[:2], capacity, *buf.shape[3:]))
            out[:, :, :n] = buf[:, :, :n]
            return out

        self._k, self._v, self._pos = moved(self._k), moved(self._v), moved(self._pos)
        self._valid, self._shift = moved(self._valid), moved(self._shift)

    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        shift: torch.Tensor | None = None,
    ) -> None:
        """Write new tokens ``(B, h, q, D)`` after the held ones; new per-token state starts at 0.

        ``positions``/``valid``/``shift`` are ``(B, h, q)``; ``valid`` None means all real; ``shift`` None means 0.
        """
        n, q = self.length, keys.shape[2]
        if n + q > self.capacity:
            self._resize(grown_capacity(n + q))
        end = n + q
        self._k[:, :, n:end] = keys
        self._v[:, :, n:end] = values
        self._pos[:, :, n:end] = positions
        if valid is not None and self._valid is None:
            self._valid = torch.ones(self._pos.shape, dtype=torch.bool, device=self._pos.device)
        if self._valid is not None:
            self._valid[:, :, n:end] = True if valid is None else valid
        if shift is not None and self._shift is None:
            self._shift = torch.zeros(self._pos.shape, dtype=torch.int64, device=self._pos.device)
        if self._shift is not None:
            self._shift[:, :, n:end] = 0 if shift is None else shift
        for name, tensor in self.state.items():
            pad = tensor.new_zeros((*tensor.shape[:2], q, *tensor.shape[3:]))
            self.state[name] = torch.cat([tensor, pad], dim=2)
        self.length = end

    def track_shift(self) -> None:
        """Start recording re-rotation shifts (all 0) for a segment made without them."""
        if self._shift is None:
            self._shift = torch.zeros(self._pos.shape, dtype=torch.int64, device=self._pos.device)

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length`` (the rollback of appends made without eviction)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate {self.length} tokens to {length}")
        self.length = length
        self.state = {name: t[:, :, :length] for name, t in self.state.items()}

    # --- eviction ---------------------------------------------------------------------------------------------------
    def keep(self, index: torch.Tensor) -> None:
        """Keep the tokens at ``index`` ``(B, h, k)`` (any order), moving as few rows as possible (see module doc)."""
        k, n = index.shape[-1], self.length
        if n - k == 1:  # one token goes (a decoding step): the last slot, if kept, moves into its place
            self.drop_one(n * (n - 1) // 2 - index.sum(dim=-1, keepdim=True))  # the one slot index does not list
            return
        kept = torch.zeros(self.positions.shape, dtype=torch.bool, device=index.device).scatter_(2, index, True)
        movers = kept[..., k:]  # kept tokens beyond the new length ...
        holes = ~kept[..., :k]  # ... go to the freed slots before it; per row there are as many of each
        m = int(movers.sum(dim=-1).max()) if movers.numel() else 0
        if m:
            # per row: the first m holes and movers (True first, stably), padded where a row has fewer, with a no-op
            dst = holes.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :m]
            src = movers.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :m] + k
            real = movers.gather(2, src - k)
            src = torch.where(real, src, dst)
            self._move(src, dst)
        self._finish(k)

    def gather(self, index: torch.Tensor) -> None:
        """Keep the tokens at ``index`` ``(B, h, k)`` in stream order of their slots (sorted)."""
        index = index.sort(dim=-1).values
        k = index.shape[-1]
        self._move(index, torch.arange(k, device=index.device).expand_as(index))
        self._finish(k)

    def drop_one(self, victim: torch.Tensor) -> None:
        """Evict one token per (batch, head): the slots ``victim`` ``(B, h, 1)``; the last slot takes its place."""
        self._move(torch.full_like(victim, self.length - 1), victim)
        self._finish(self.length - 1)

    def _move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the rows at slots ``src`` to slots ``dst`` (both ``(B, h, m)``); all rows are read before writing."""
        b, h, cap = self._pos.shape
        base = torch.arange(b * h, device=src.device).view(b, h, 1) * cap  # first row of each (batch, head)
        src_rows, dst_rows = (src + base).flatten(), (dst + base).flatten()
        for buf in (self._k, self._v, self._pos, self._valid, self._shift):
            if buf is not None:  # buffers are contiguous: rows of (batch, head, slot) are rows of a flat view
                flat = buf.view(b * h * cap, -1)
                flat.index_copy_(0, dst_rows, flat.index_select(0, src_rows))
        for name, tensor in self.state.items():
            t = tensor.clone()
            shape = (*src.shape, *t.shape[3:])
            s = src.view(*src.shape, *([1] * (t.dim() - 3))).expand(shape)
            d = dst.view(*dst.shape, *([1] * (t.dim() - 3))).expand(shape)
            t.scatter_(2, d, tensor.gather(2, s))
            self.state[name] = t

    def _finish(self, k: int) -> None:
        self.length = k
        self.state = {name: t[:, :, :k] for name, t in self.state.items()}
        if self._valid is not None and bool(self.valid.all()):
            self._valid = None
        if self.capacity - k > max_spare(k):
            self._resize(grown_capacity(k))

    def write(self, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, head: int | None = None) -> None:
        """Overwrite the keys and values at slots ``index`` ``(B, h, k)`` with ``(B, h, k, D)`` tensors (merging);
        ``head``: write into that one head of this segment (``index`` ``(B, 1, k)``)."""
        k_view, v_view = self.keys, self.values
        if head is not None:
            k_view, v_view = k_view[:, head : head + 1], v_view[:, head : head + 1]
        k_view.scatter_(2, index[..., None].expand(*index.shape, keys.shape[-1]), keys.to(self._k.dtype))
        v_view.scatter_(2, index[..., None].expand(*index.shape, values.shape[-1]), values.to(self._v.dtype))

    def split_heads(self) -> list[Segment]:
        """One segment per head (copies, so each head's storage can shrink on its own)."""
        out = []
        for h in range(self.n_heads):
            sl = slice(h, h + 1)
            out.append(
                Segment(
                    self.head_start + h,
                    self.keys[:, sl],
                    self.values[:, sl],
                    self.positions[:, sl],
                    None if self._valid is None else self.valid[:, sl],
                    {k: v[:, sl].clone() for k, v in self.state.items()},
                    None if self._shift is None else self.shift[:, sl],
                )
            )
        return out

    def clone(self) -> Segment:
        """An independent copy holding the same tokens (tight capacity)."""
        out = Segment(
            self.head_start, self.keys, self.values, self.positions, self.valid,
            {k: v.clone() for k, v in self.state.items()}, self.shift,
        )  # fmt: skip
        out.side = None if self.side is None else (self.side[0].clone(), self.side[1].clone())
        return out

    # --- bytes ------------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the keys and values held (``length`` tokens)."""
        return _nbytes(self.keys) + _nbytes(self.values)

    def reserved_nbytes(self) -> int:
        """Bytes allocated for keys and values, spare room included."""
        return _nbytes(self._k) + _nbytes(self._v)

    def aux_nbytes(self) -> int:
        """Bytes of the per-token bookkeeping held (positions, padding flags, shifts, method state)."""
        tensors = [self.positions, self.valid, self.shift, *self.state.values()]
        if self.side is not None:
            tensors += list(self.side)
        return sum(_nbytes(t) for t in tensors if t is not None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(heads={self.heads}, tokens={self.length}, capacity={self.capacity})"


def _nbytes(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()
