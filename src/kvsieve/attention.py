"""Attention compute for kvsieve: sdpa output over the kept tokens, and attention statistics chunk by chunk.

The function registered with transformers' ``AttentionInterface`` (``sieve_attention``) only finds the active
:class:`~kvsieve.sieve.Session` and hands the call over; everything here is pure tensor code.

Layout convention: the new ``q`` tokens of a forward pass are the *last* ``q`` entries of the ``T`` keys a layer
holds. Key ``j`` is visible to new query ``i`` when ``j <= T - q + i`` (every held token is in the past), the key is
a real token (not left padding), or it is the query's own token (so a padding query never has an empty row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

ATTENTION_NAME = "kvsieve"
STATS_CHUNK = 256  # query rows per block when computing statistics: memory O(STATS_CHUNK * T) per head


@dataclass(frozen=True)
class AttentionRequest:
    """Attention statistics a method asks for in one forward pass.

    ``last``: sum only over the last ``last`` new queries (SnapKV's observation window, TOVA's last query);
    ``None`` sums over every new query. ``decay``: query ``i`` of ``q`` is weighted ``decay ** (q - 1 - i)``, which
    is A2SF's forgetting factor applied within one forward pass (``1.0`` gives plain sums, as H2O).
    """

    last: int | None = None
    decay: float = 1.0


def causal_allowed(
    q: int, t: int, valid: torch.Tensor | None, rows: slice | None = None, device=None
) -> torch.Tensor:
    """Boolean visibility ``(B|1, h|1, r, T)`` of ``T`` keys for new queries ``rows`` (default: all ``q``).

    ``valid``: ``(B, h, T)`` flags of real tokens, or None when there is no padding.
    """
    rows = rows or slice(0, q)
    qi = torch.arange(rows.start, rows.stop, device=device)[:, None]
    kj = torch.arange(t, device=device)[None, :]
    own = kj == (t - q + qi)
    causal = kj <= (t - q + qi)
    if valid is None:
        return causal[None, None]
    return causal[None, None] & (valid[:, :, None, :] | own[None, None])


def sliding_allowed(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, k_valid: torch.Tensor | None
) -> torch.Tensor:
    """Visibility ``(B|1, 1, q, K)`` from sequence indices (for transformers' sliding-window layers)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= (q_pos[:, None] - k_pos[None, :]) < window
    allowed = allowed[None, None]
    if k_valid is not None:
        own = k_pos[None, :] == q_pos[:, None]
        allowed = allowed & (k_valid[:, None, None, :] | own[None, None])
    return allowed


def sdpa_output(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output ``(B, q, Hq, D)`` for query ``(B, Hq, q, D)`` over keys/values ``(B, h, T, D)``.

    ``allowed=None`` means plain causal attention with the queries last, where transformers' own sdpa path takes
    exactly the same kernel route as an uncompressed model (so compression 0 is bitwise identical). A mask that
    differs per KV head, or an additive logit ``bias`` ``(B|1, Hq|1, q, T)`` (calibration), goes to sdpa directly
    as a float mask over the query heads.
    """
    if bias is None and (allowed is None or allowed.shape[1] == 1):
        out, _ = sdpa_attention_forward(module, query, keys, values, allowed, dropout=dropout, scaling=scaling)
        return out
    groups = query.shape[1] // keys.shape[1]
    mask = allowed.repeat_interleave(groups, dim=1) if allowed is not None and allowed.shape[1] > 1 else allowed
    if bias is not None:
        bias = bias.to(torch.float32 if query.dtype == torch.float32 else query.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(
        query, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous()


def needs_mask(q: int, t: int, valid: torch.Tensor | None) -> bool:
    """Whether plain causal sdpa (no mask) would be wrong: padding present, or held tokens before a chunk."""
    return valid is not None or (q > 1 and t != q)


def column_sums(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    valid: torch.Tensor | None,
    request: AttentionRequest,
    chunk: int = STATS_CHUNK,
) -> torch.Tensor:
    """Attention probability each key receives, summed over the requested new queries: ``(B, Hq, T)``.

    query ``(B, h*g, q, D)``; keys ``(B, h, T, D)`` (the new tokens last); valid ``(B, h, T)`` or None. Rows are
    processed ``chunk`` at a time, so memory is ``O(chunk * T)`` per head, never ``O(T^2)``. Keys are shared by the
    ``g`` query heads of a group without being copied.
    """
    b, hq, q, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    first = 0 if request.last is None else max(0, q - request.last)
    total = torch.zeros(b, h, g, t, dtype=torch.float32, device=query.device)
    k_t = keys.to(torch.float32).transpose(-1, -2)  # (B, h, D, T)
    for start in range(first, q, chunk):
        stop = min(start + chunk, q)
        r = stop - start
        limit = t - q + stop  # keys past this are in every row's future: skip them entirely
        q_blk = query[:, :, start:stop].to(torch.float32).reshape(b, h, g * r, d)
        logits = (q_blk @ k_t[..., :limit]).view(b, h, g, r, limit) * scaling
        # only the last r columns can be in some row's future (the causal diagonal block)
        future = torch.ones(r, r, dtype=torch.bool, device=query.device).triu(1)
        logits[..., limit - r :].masked_fill_(future, float("-inf"))
        if valid is not None:
            hidden = ~valid[:, :, None, None, :limit]  # padding, except a query's own token
            own = torch.zeros(r, limit, dtype=torch.bool, device=query.device)
            own[:, limit - r :] = torch.eye(r, dtype=torch.bool, device=query.device)
            logits.masked_fill_(hidden & ~own, float("-inf"))
        probs = logits.softmax(dim=-1)
        if request.decay != 1.0:
            weights = request.decay ** torch.arange(q - 1 - start, q - 1 - stop, -1, device=query.device)
            probs = probs * weights.to(torch.float32)[:, None]
        total[..., :limit] += probs.sum(dim=3)
    return total.reshape(b, hq, t)
