"""``zipcache``: mixed-precision KV quantisation, more bits for tokens salient by normalised attention.

He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification" (NeurIPS 2024).

- Saliency: accumulated attention divided by the number of queries that could see the token, ``p_j = sum_i A_ij /
  nnz(A_:j)``. Plain accumulated attention favours early tokens, which every later query sees (the lower-triangular
  attention matrix); the normalisation removes that bias. As in the paper, the statistics come from *probe* queries:
  the most recent ``probes / 2`` of each pass and as many chosen at random (seeded), computed chunk by chunk.
- Mixed precision: of the tokens quantised together, the ``salient`` fraction with the highest saliency (per head)
  gets ``high_bits`` (4), the rest ``low_bits`` (2).
- Channel-separable tokenwise quantisation: each channel is divided by ``sqrt(max |x|)`` (over the tokens), then each
  token is quantised with one scale and zero point; dequantisation multiplies the normaliser back.

Storage is :class:`~kvsieve.quant.MixedSegment` (packed ``uint8`` codes, fp16 scales, zero points and normalisers,
one class byte per token and head), so bytes held really drop. Tokens are quantised once ``block`` of them are in
full precision: the prompt at once, then ``block`` decoded tokens at a time (the paper's streaming buffer).

Composition: ``zipcache`` alone keeps every token; ``zipcache:<method>`` evicts with the inner method, then quantises
what it keeps (e.g. ``zipcache:snapkv``).

Simplifications: scales and zero points are per (token, KV head) rather than per token across heads; the channel
normalisers are computed on the first tokens quantised (the prompt) and reused for later blocks; saliency is averaged
over the query heads sharing a KV head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVSieveError
from ..storage import Segment
from ..storage.quantized import FP, MixedSegment, PackedSegment
from . import register
from .base import LayerContext, Observation, Wrapper, hp, overrides

ATTN, SEEN = "zipcache_attention", "zipcache_queries"
CHUNK = 256  # probe rows per block: memory O(CHUNK * T) per head


@register
@dataclass
class ZipCache(Wrapper):
    """Quantise tokens to ``high_bits`` (the ``salient`` fraction by normalised attention) or ``low_bits``.

    salient: fraction of tokens at high precision. block: full-precision tokens quantised together. probes: fraction
    of each pass's queries used to measure saliency (half the most recent, half random; the paper uses 10%).
    """

    high_bits: int = hp(4, choices=(2, 4, 8))
    low_bits: int = hp(2, choices=(2, 4, 8))
    salient: float = hp(0.5, ge=0.0, le=1.0)
    block: int = hp(64, ge=1)
    probes: float = hp(0.1, gt=0.0, le=1.0)
    seed: int = 0

    name = "zipcache"
    family = "quantization"
    paper = "He et al. 2024, arXiv:2405.14256"
    needs = "queries and keys (probe attention)"
    simplifications = (
        "scales and zero points per (token, KV head) rather than per token across heads; channel normalisers computed "
        "on the first tokens quantised and reused; saliency averaged over the query heads of a KV head; refuses left-"
        "padded batches"
    )
    batch = "unpadded"  # blocks and channel normalisers are counted in slots, which left padding would shift

    def validate(self) -> None:
        if overrides(self.inner, "pack"):
            raise KVSieveError(
                "zipcache quantises plain storage; it cannot wrap another storage method (kivi, "
                "zipcache, minicache). Put the evicting method inside: zipcache:snapkv"
            )

    def observe(self, obs: Observation) -> None:
        super().observe(obs)
        sums, counts = probe_attention(obs, self.probes, self.seed)
        b, h, t = obs.positions.shape
        attn = obs.state.get(ATTN)
        if attn is None:
            attn = torch.zeros(b, h, t, dtype=torch.float32, device=obs.keys.device)
            obs.state[SEEN] = torch.zeros_like(attn)
        obs.state[ATTN] = attn + sums
        obs.state[SEEN] = obs.state[SEEN] + counts.expand(b, h, t)

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        segment = super().pack(segment, ctx)
        if not isinstance(segment, MixedSegment):
            if isinstance(segment, PackedSegment):
                raise KVSieveError(f"zipcache cannot quantise a {type(segment).__name__}")
            d = segment.keys.shape[-1]
            if d * min(self.high_bits, self.low_bits) % 8:
                raise KVSieveError(f"head dimension {d} cannot be packed at {self.low_bits} bits")
            segment = MixedSegment(segment, self.high_bits, self.low_bits)
        pending = segment.cls == FP
        if int(pending.sum(dim=-1).max()) < self.block:
            return segment
        segment.quantize_tokens(pending, self.salient_mask(segment, pending))
        return segment

    def salient_mask(self, segment: Segment, pending: torch.Tensor) -> torch.Tensor:
        """The top ``salient`` fraction of ``pending`` tokens of each (batch, head) by normalised attention."""
        state = segment.state
        # never observed (a cache built elsewhere): fall back to recency
        saliency = state[ATTN] / state[SEEN].clamp(min=1.0) if ATTN in state else segment.positions.to(torch.float32)
        saliency = saliency.masked_fill(~pending, float("-inf"))
        n_high = torch.round(pending.sum(dim=-1, keepdim=True) * self.salient).long()
        rank = saliency.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        return pending & (rank < n_high)


def probe_attention(obs: Observation, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention the probe queries give each held token, ``(B, h, T)`` (mean over the GQA group), and how many probe
    queries could see each token, ``(T,)``.

    Probes: the most recent ``ceil(fraction * q / 2)`` new queries and as many random others (seeded by ``seed`` and
    the layer and position, so runs repeat).
    """
    queries, keys = obs.queries, obs.keys
    b, hq, q, d = queries.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    n_half = max(1, math.ceil(fraction * q / 2))
    recent = torch.arange(max(0, q - n_half), q)
    rest = torch.arange(0, max(0, q - n_half))
    if rest.numel():
        gen = torch.Generator().manual_seed(_seed(seed, obs))
        rest = rest[torch.randperm(rest.numel(), generator=gen)[:n_half]]
    rows = torch.cat([rest, recent]).sort().values.to(queries.device)
    k_t = keys.to(torch.float32).transpose(-1, -2)  # (B, h, D, T)
    sums = torch.zeros(b, h, g, t, dtype=torch.float32, device=queries.device)
    kj = torch.arange(t, device=queries.device)
    counts = torch.zeros(t, dtype=torch.float32, device=queries.device)
    for start in range(0, rows.numel(), CHUNK):
        blk = rows[start : start + CHUNK]
        r = blk.numel()
        q_blk = queries[:, :, blk].to(torch.float32).reshape(b, h, g * r, d)
        logits = (q_blk @ k_t).view(b, h, g, r, t) * obs.scaling
        visible = kj[None, :] <= (t - q + blk)[:, None]  # (r, T)
        allowed = visible[None, None, None]
        if obs.valid is not None:
            own = kj[None, :] == (t - q + blk)[:, None]
            allowed = allowed & (obs.valid[:, :, None, None, :] | own[None, None, None])
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        sums += probs.sum(dim=3)
        counts += visible.sum(dim=0).to(torch.float32)
    return sums.mean(dim=2), counts


def _seed(seed: int, obs: Observation) -> int:
    first = int(obs.positions[0, 0, -obs.n_new]) if obs.n_new else 0
    return (seed * 1_000_003 + obs.layer_idx * 10_007 + obs.head_start * 101 + first) % (2**63)


def zipcache_nbytes(
    n_fp: int, n_high: int, n_low: int, head_dim: int, high_bits: int, low_bits: int, elt: int, normalised_heads: int
) -> int:
    """Bytes a MixedSegment promises for ``n_*`` (token, head) rows per class.

    Per row: one class byte; full-precision rows hold key and value at ``elt`` bytes per element; quantised rows hold
    key and value codes plus an fp16 scale and zero point each. Per (batch, head) in ``normalised_heads``: an fp16
    channel normaliser of ``head_dim`` for keys and one for values.
    """
    rows = n_fp + n_high + n_low
    fp = n_fp * 2 * head_dim * elt
    high = n_high * 2 * (head_dim * high_bits // 8 + 4)
    low = n_low * 2 * (head_dim * low_bits // 8 + 4)
    return rows + fp + high + low + normalised_heads * 2 * head_dim * 2
