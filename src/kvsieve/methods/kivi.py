"""``kivi``: uniform low-bit KV quantisation, keys per channel and values per token, with a full-precision residual.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024). Keys have outlier channels,
so they are quantised per channel over groups of ``group`` tokens; values are quantised per token. The newest tokens
stay in full precision until a whole group can be quantised: the residual holds ``residual`` to
``residual + group - 1`` tokens. Storage is :class:`~kvsieve.quant.KiviSegment`: codes packed into ``uint8`` (four
2-bit or two 4-bit codes per byte), fp16 scales and zero points; attention reads the dequantised tensors.

Composition: ``kivi`` alone keeps every token; ``kivi:<method>`` evicts with the inner method, then quantises what it
keeps (e.g. ``kivi:snapkv`` at compression 0.5).

Simplifications: values are quantised per token over the whole head dimension (KIVI groups channels of long heads);
when eviction leaves heads with different numbers of quantised tokens, the surplus returns to the residual as the
values it decodes to (and is quantised again later), so the quantised part stays rectangular across heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import KVSieveError
from ..storage import Segment
from ..storage.quantized import KiviSegment, PackedSegment
from . import register
from .base import LayerContext, Wrapper, hp, overrides


@register
@dataclass
class KIVI(Wrapper):
    """Quantise keys per channel (groups of ``group`` tokens) and values per token to ``bits`` bits.

    bits: 2 or 4 (8 allowed). group: tokens per key quantisation group (KIVI: 32). residual: newest tokens kept in
    full precision (KIVI: 128).
    """

    bits: int = hp(2, choices=(2, 4, 8))
    group: int = hp(32, ge=1)
    residual: int = hp(128, ge=0)

    name = "kivi"
    family = "quantization"
    paper = "Liu et al. 2024, arXiv:2402.02750"
    needs = "keys and values"
    simplifications = (
        "values quantised per token over the whole head dimension; when eviction leaves heads with different numbers of"
        " quantised tokens, the surplus returns to the full-precision residual as the values it decodes to; refuses "
        "left-padded batches (groups are counted in slots)"
    )
    batch = "unpadded"  # quantisation groups and the residual are counted in slots, which left padding would shift

    def validate(self) -> None:
        if overrides(self.inner, "pack"):
            raise KVSieveError(
                "kivi quantises plain storage; it cannot wrap another storage method (kivi, zipcache, "
                "minicache). Put the evicting method inside: kivi:snapkv"
            )

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        segment = super().pack(segment, ctx)
        if not isinstance(segment, KiviSegment):
            if isinstance(segment, PackedSegment):
                raise KVSieveError(f"kivi cannot quantise a {type(segment).__name__}")
            if segment.keys.shape[-1] * self.bits % 8:
                raise KVSieveError(f"head dimension {segment.keys.shape[-1]} cannot be packed at {self.bits} bits")
            segment = KiviSegment(segment, self.bits, self.group, self.residual)
        segment.compress()
        return segment


def kivi_nbytes(tokens: int, heads: int, head_dim: int, bits: int, group: int, residual: int, elt: int) -> int:
    """Bytes KIVI promises for ``tokens`` tokens of one layer (one sequence, no eviction after quantisation).

    Quantised tokens: whole groups beyond the residual; each token-head holds key and value codes
    (``head_dim * bits / 8`` bytes each) and a value scale and zero point (fp16); each group of keys a scale and a zero
    point per channel (fp16) and its size (int32). Residual tokens: keys and values at ``elt`` bytes per element.
    """
    n_q = max(0, (tokens - residual) // group * group)
    n_groups = n_q // group
    codes = 2 * n_q * head_dim * bits // 8
    value_params = n_q * 2 * 2
    key_tables = n_groups * (2 * head_dim * 2 + 4)
    fp = 2 * (tokens - n_q) * head_dim * elt
    return heads * (codes + value_params + key_tables + fp)
