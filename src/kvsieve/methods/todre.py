"""``todre``: diverse visual tokens by greedy k-center before the LLM, then task-irrelevant ones removed inside it.

Li et al., "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models"
(2025). Stage 1 keeps a diverse subset of each image's tokens: greedy k-center (each next token is the one farthest,
by cosine distance, from those already kept). Stage 2, inside the LLM: information migrates from the image into the
text tokens, so after ``layer`` only the visual tokens the instruction attends to most stay (``relevant`` of the
kept ones), and after ``drop_layer`` none do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KVSieveError
from ..sequence import Stage, StageView
from ..vision import PRE_LLM, VisionChoice, VisionPruner, VisionView
from . import register
from .base import hp


def k_center(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center by cosine distance, from the token farthest from the mean; sorted indices of ``k`` tokens."""
    x = F.normalize(features.float(), dim=-1)
    n = x.shape[0]
    k = min(k, n)
    first = int((x @ F.normalize(x.mean(dim=0), dim=0)).argmin())
    chosen = [first]
    dist = 1.0 - x @ x[first]
    for _ in range(k - 1):
        dist[chosen] = -1.0
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = torch.minimum(dist, 1.0 - x @ x[nxt])
    return torch.tensor(sorted(chosen), dtype=torch.long)


@register
@dataclass
class ToDRE(VisionPruner):
    """Stage 1: keep ``keep`` of each image's tokens by greedy k-center. Stage 2: after ``layer``, keep the
    ``relevant`` share of them the instruction attends to most; after ``drop_layer`` (None: none), drop them all.
    """

    relevant: float = hp(0.5, ge=0.0, le=1.0)
    drop_layer: int | None = hp(None)

    name = "todre"
    paper = "Li et al. 2025, ToDRE"
    needs = "projected visual features; instruction attention inside the LLM"
    simplifications = (
        "k-center runs on the projected features the LLM receives (the paper: the encoder's outputs); task relevance "
        "is the instruction's attention at `layer`, recomputed over this pass's tokens; the removal layers are "
        "hyperparameters (the paper finds them by analysing information migration)"
    )

    def validate(self) -> None:
        if self.drop_layer is not None and self.drop_layer <= self.layer:
            raise KVSieveError(f"todre: drop_layer ({self.drop_layer}) must be deeper than layer ({self.layer})")

    def stages(self, n_layers: int) -> list[Stage]:
        out = [Stage(PRE_LLM, self.keep)]
        if self.relevant < 1.0:
            out.append(Stage(self.layer, self.keep * self.relevant))
        if self.drop_layer is not None:
            out.append(Stage(self.drop_layer, 0.0))
        return out

    def encoder_layers(self, n: int) -> list[int]:
        return []

    def select_vision(self, view: VisionView) -> VisionChoice:
        return VisionChoice([k_center(f, view.count(u)) for u, f in enumerate(view.features)])

    def rank(self, view: StageView) -> torch.Tensor:
        return view.attention("instruction")
