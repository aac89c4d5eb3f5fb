"""``transprune``: progressive pruning by Token Transition Variation plus instruction-guided attention.

Liao et al., "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model" (2025). How much a
token's representation changes in a block says how much it matters: for every attention and MLP block, TTV weighs
the ratio of the output's norm to the input's norm by a softmax (over the tokens) of ``1 - cos(input, output)``;
TTV is accumulated over the blocks since pruning began. Instruction-guided attention (IGA) is the attention the
instruction tokens give each candidate in the first layer after the stage. Score = TTV / sum + IGA / sum; several
stages prune progressively (the authors' LLaVA-1.5 setting: stages after layers 6, 8 and 11 of 32, keeping 87.5%,
62.5% and 12.5% of the image tokens; TTV accumulated from layer 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sequence import Pruner, Stage, StageView
from . import register
from .base import hp

# the authors' stage profile: layer offsets from the first stage and the share of the final drop done by each stage
_OFFSETS = (0, 2, 5)
_DROP_SHARE = (0.125 / 0.875, 0.375 / 0.875, 1.0)


def transition_weight(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """TTV of one block, ``(B, k)``: ``|after| / |before|`` x softmax over tokens of ``1 - cos(before, after)``."""
    ratio = after.float().norm(dim=-1) / before.float().norm(dim=-1).clamp(min=1e-12)
    turn = 1.0 - F.cosine_similarity(before.float(), after.float(), dim=-1)
    return ratio * turn.softmax(dim=-1)


@register
@dataclass
class TransPrune(Pruner):
    """Progressive pruning after layers ``layer``, ``layer + 2``, ``layer + 5`` down to ``keep`` of the candidates.

    layer: the first stage (pruning from layer ``layer + 1``). keep: share of the candidates left after the last
    stage; the stages before it drop 14% and 43% of what the last one drops (the authors' 87.5/62.5/12.5 profile).
    stages: how many of the three stages to run (1: a single stage at ``layer``). iga: add instruction-guided
    attention to TTV (the paper's default; False: TTV alone, which the paper finds about as good).
    """

    stages_used: int = hp(3, ge=1, le=3)
    iga: bool = hp(True)

    name = "transprune"
    paper = "Liao et al. 2025, TransPrune: Token Transition Pruning"
    needs = "hidden states around every attention/MLP block; instruction attention at each stage"
    simplifications = (
        "stage layers and shares follow the authors' 32-layer profile shifted to start at `layer` and scaled to end "
        "at `keep`; TTV is accumulated from the first stage's layer; IGA is recomputed over this pass's tokens; "
        "text prompts: the instruction is the protected question (or the last token)"
    )
    sublayers = True

    def stages(self, n_layers: int) -> list[Stage]:
        used = _OFFSETS[: self.stages_used]
        shares = _DROP_SHARE[3 - self.stages_used :] if self.stages_used < 3 else _DROP_SHARE
        out = [
            Stage(min(self.layer + off, n_layers - 2), 1.0 - (1.0 - self.keep) * s)
            for off, s in zip(used, shares, strict=True)
        ]
        out[-1] = Stage(out[-1].after, self.keep)
        return out

    def observe_sublayer(self, scratch: dict, layer: int, kind: str, before, after) -> None:
        if layer < self.layer:
            return
        w = transition_weight(before, after)
        scratch["ttv"] = w if "ttv" not in scratch else scratch["ttv"] + w

    def rank(self, view: StageView) -> torch.Tensor:
        cand = view.candidates
        ttv = view.scratch.get("ttv")
        score = torch.zeros(cand.shape, dtype=torch.float32, device=cand.device)
        if ttv is not None:
            t = ttv.float().masked_fill(~cand, 0.0)
            score += t / (t.sum(dim=1, keepdim=True) + 1e-8)
        if self.iga or ttv is None:
            a = view.attention("instruction", layer="next").masked_fill(~cand, 0.0)
            score += a / (a.sum(dim=1, keepdim=True) + 1e-8)
        return score
