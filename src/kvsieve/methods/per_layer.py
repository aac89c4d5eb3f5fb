"""``per_layer``: explicit per-layer compression ratios around any scorer.

kvpress's ``PerLayerCompressionPress``: layer ``l`` removes the share ``ratios[l]`` of its tokens. In kvsieve the
sieve's budget sets the total and the ratios its shape: with the sieve removing the share ``c`` of the tokens seen
(``compression=c``, or ``c = 1 - N / seen`` for ``budget=N``), layer ``l`` removes ``c x ratios[l] / mean(ratios)``
of them. So ``Sieve("per_layer(ratios=...):snapkv", compression=mean(ratios))`` is kvpress's press (layer ``l``
keeps ``seen x (1 - ratios[l])``, within one token of rounding), ``compression=0`` removes nothing, and the layers
keep the sieve's budget on average (a layer never removes more than all but one token).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import KVSieveError
from . import register
from .base import LayerContext, Wrapper


@register
@dataclass
class PerLayer(Wrapper):
    """Wraps ``inner`` (default SnapKV): its scores, with one compression ratio per layer.

    ratios: one compression ratio in [0, 1) per decoder layer (full-attention layers use their own index).
    """

    ratios: tuple | None = None

    name = "per_layer"
    family = "budget wrapper"
    paper = "kvpress PerLayerCompressionPress"
    needs = "the wrapped method's needs"
    simplifications = (
        "ratios shape the sieve's compression c (layer l removes c r_l / mean r); compression = mean(ratios) is "
        "kvpress's press within one token of rounding"
    )
    own_kind = "evict"
    default_inner = "snapkv"
    batch = "unpadded"  # a layer's budget depends on the tokens seen, which a padded row does not say

    def validate(self) -> None:
        if not self.ratios:
            raise KVSieveError(
                "per_layer needs one compression ratio per layer, e.g. per_layer(ratios=(0.2, 0.6)):snapkv"
            )
        for r in self.ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r < 1.0:
                raise KVSieveError(f"per_layer: every ratio must be a number in [0, 1), got {r!r}")

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        budget = self._in.layer_budget(budget, ctx)
        if len(self.ratios) != ctx.n_layers:
            raise KVSieveError(
                f"per_layer has {len(self.ratios)} ratios but the model has {ctx.n_layers} layers; give one per layer"
            )
        mean = sum(self.ratios) / len(self.ratios)
        if mean == 0 or ctx.seen <= 0:
            return budget
        removed = (1.0 - budget / ctx.seen) * self.ratios[ctx.layer_idx] / mean
        return max(1, round(ctx.seen * (1.0 - min(removed, 1.0))))
