"""``power_attention``: the static exponential pattern of PowerAttention (Chen et al. 2025, arXiv:2503.03588).

Each query block attends to a local window of ``window`` key blocks (its own included), the first ``sink`` key
blocks, and the key blocks at distances that are powers of two (1, 2, 4, 8, ... blocks back). One layer reaches
``log2`` of the context in blocks; stacked layers compose these hops, so the receptive field doubles with every layer
(``2^d`` tokens after ``d`` layers) and every earlier token is reachable, unlike a sliding window whose field grows
linearly. The pattern is static: it reads neither queries nor keys, so choosing it costs nothing, and it is the
input-independent baseline the dynamic methods (flexprefill, xattention, minference) must beat at equal density.

Simplifications: the pattern is applied at block granularity (distances in blocks of ``block_size`` tokens, the unit of
the block-sparse kernel; the paper defines it on tokens and implements it on blocks as well).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import sparse
from ..attention import AttentionCall, block_sparse
from . import register
from .base import PrefillMethod, hp


def power_pattern(nq: int, nk: int, offset_blocks: int, window: int, sink: int, device=None) -> torch.Tensor:
    """``(nq, nk)`` bool: local window, sinks and power-of-two distances (in blocks) from each query block."""
    qb = torch.arange(nq, device=device)[:, None] + offset_blocks
    kb = torch.arange(nk, device=device)[None, :]
    distance = qb - kb
    power = (distance > 0) & ((distance & (distance - 1)) == 0)
    return (distance >= 0) & ((distance < window) | (kb < sink) | power)


@register
@dataclass
class PowerAttention(PrefillMethod):
    """Static pattern: local window, sink blocks and key blocks at power-of-two distances.

    block_size: tokens per block. window: local key blocks per query block (its own included; a window at least the
    number of blocks computes everything). sink: initial key blocks always attended.
    """

    block_size: int = hp(128, ge=1)
    window: int = hp(2, ge=1)
    sink: int = hp(1, ge=0)

    name = "power_attention"
    paper = "Chen et al. 2025, PowerAttention (arXiv:2503.03588)"
    needs = "nothing (static pattern)"
    simplifications = "applied at block granularity (distances in blocks of block_size tokens)"

    def attend(self, call: AttentionCall) -> torch.Tensor:
        q, t, bs = call.n_new, call.keys.shape[2], self.block_size
        first, _ = sparse.own_blocks(q, t, bs)
        nq, nk = sparse.n_blocks(q, bs), sparse.n_blocks(t, bs)
        pattern = power_pattern(nq, nk, int(first[0]), self.window, self.sink, call.query.device)
        return block_sparse(call, pattern[None, None], bs)
