"""Key-channel-pruned storage (ThinK): the keys of pruned tokens hold only the kept channels; memory really drops.

A :class:`ChannelPrunedSegment` holds, per KV head, the keys of its first ``Tp`` tokens as ``(B, h, Tp, Dk)`` with
the channel index of each kept channel ``(B, h, Dk)`` (one channel set per head, chosen once), the keys of later tokens
(the *residual*, appended since the last pruning) in full width, and every value in full. Attention reads keys
rebuilt with zeros in the pruned channels, which is what ThinK computes (``q . k`` over the kept channels).

Eviction keeps slot order (``gather``). Heads that keep different numbers of pruned tokens return the surplus to the
residual as their zero-filled reconstruction (exact, since those channels are zero), so the pruned part stays
rectangular; :meth:`prune` moves the residual into the pruned part with the same channels.
"""

from __future__ import annotations

import torch

from .quantized import PackedSegment, shadow
from .segment import Segment


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)


class ChannelPrunedSegment(PackedSegment):
    """Keys ``pk`` ``(B, h, Tp, Dk)`` on channels ``channels`` ``(B, h, Dk)`` (int16, sorted), full-width residual keys
    ``rk`` ``(B, h, Tr, D)``, values ``v`` ``(B, h, T, D)`` with ``T = Tp + Tr``."""

    def __init__(self, seg: Segment, channels: torch.Tensor):
        super().__init__(shadow(seg), seg.keys.dtype)
        self.d = seg.keys.shape[-1]
        self.channels = channels.sort(dim=-1).values.to(torch.int16)
        b, h, _, _ = seg.keys.shape
        self.pk = seg.keys.new_empty((b, h, 0, channels.shape[-1]))
        self.rk = seg.keys.clone()  # own copies, without the spare room
        self.v = seg.values.clone()
        self.prune()

    @property
    def n_pruned(self) -> int:
        return self.pk.shape[2]

    def _index(self, n: int) -> torch.Tensor:
        return self.channels.long()[:, :, None, :].expand(-1, -1, n, -1)

    def prune(self) -> None:
        """Move every residual token into the pruned part (its kept channels only)."""
        if self.rk.shape[2] == 0:
            return
        self.pk = torch.cat([self.pk, self.rk.gather(-1, self._index(self.rk.shape[2]))], dim=2)
        self.rk = self.rk[:, :, :0].clone()

    def _pruned_full(self) -> torch.Tensor:
        b, h, tp, _ = self.pk.shape
        full = self.pk.new_zeros((b, h, tp, self.d))
        return full.scatter_(-1, self._index(tp), self.pk)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n_pruned == 0:
            return self.rk, self.v
        return torch.cat([self._pruned_full(), self.rk], dim=2), self.v

    def nbytes(self) -> int:
        return _nbytes(self.pk, self.rk, self.v, self.channels)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.rk = torch.cat([self.rk, keys.to(self.dtype)], dim=2)
        self.v = torch.cat([self.v, values.to(self.dtype)], dim=2)

    def _gather(self, index: torch.Tensor) -> None:
        tp, d = self.n_pruned, self.d
        in_p = (index < tp).sum(dim=-1)  # pruned tokens kept per (batch, head)
        keep_p = int(in_p.min()) if in_p.numel() else 0
        if int(in_p.max()) > keep_p:  # surplus pruned tokens go back to the residual, zero-filled (exact)
            full, offset = torch.cat([self._pruned_full(), self.rk], dim=2), 0
        else:
            full, offset = self.rk, tp
        rest = index[..., keep_p:] - offset
        self.rk = full.gather(2, rest[..., None].expand(-1, -1, -1, d))
        dk = self.pk.shape[-1]
        self.pk = self.pk.gather(2, index[..., :keep_p, None].expand(-1, -1, -1, dk))
        self.v = self.v.gather(2, index[..., None].expand(-1, -1, -1, self.v.shape[-1]))

    def _head(self, h: int, meta: Segment) -> Segment:
        out = ChannelPrunedSegment.__new__(ChannelPrunedSegment)
        PackedSegment.__init__(out, meta, self.dtype)
        out.d = self.d
        sl = slice(h, h + 1)
        out.channels = self.channels[:, sl].clone()
        out.pk, out.rk, out.v = self.pk[:, sl].clone(), self.rk[:, sl].clone(), self.v[:, sl].clone()
        return out

    def _assign_dense(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """After a merge wrote rows: everything is residual until the next :meth:`prune` (same channels)."""
        self.pk = self.pk[:, :, :0]
        self.rk, self.v = keys.to(self.dtype), values.to(self.dtype)
