"""``zerotuning``: head-specific scaling of the attention the initial token receives, then renormalisation.

Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without Training"
(2025). In the selected heads, the attention probability on the initial token (the attention sink) is multiplied by
``gamma`` and the row renormalised: ``a0' = gamma a0 / D``, ``ai' = ai / D`` with ``D = 1 - a0 + gamma a0``. Lowering
it (``gamma < 1``) sharpens attention over the other tokens; raising it flattens it. That is exactly adding
``log gamma`` to token 0's logit, which is how it is applied here (:meth:`Method.logit_bias`): no weights change and
the KV cache is untouched.

A calibration keeps every token on its own, or wraps an evicting method (``zerotuning:snapkv``), whose cache hooks
then apply (:class:`~kvsieve.methods.families.Calibration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import register
from .base import Observation, hp
from .families import Calibration


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

    gamma: float = hp(0.5, gt=0.0)

    name = "zerotuning"
    paper = "Han et al. 2025, arXiv:2505.11739"
    needs = "positions (initial token)"
    simplifications = (
        "`gamma` and the heads are given (default 0.5, all heads) rather than profiled on validation examples or by "
        "minimising output entropy"
    )

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
