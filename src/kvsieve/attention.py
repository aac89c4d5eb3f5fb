"""Attention compute for kvsieve: the attention-compute action point, masks, and attention statistics.

Everything here is pure tensor code. An :class:`AttentionCall` is what one layer's attention needs for one storage
segment in one forward pass; :func:`dense` computes it with sdpa (transformers' own sdpa function whenever the mask
is plain causal, so an uncompressed run is bitwise identical to transformers), :func:`read_selected` attends to a
subset of the held slots (selective reads), and prefill methods (``Sieve(..., prefill=...)``) replace ``dense`` for
prefill passes. :func:`block_sparse` computes only the selected query/key blocks.

Layout convention: the new ``q`` tokens of a forward pass are the *last* ``q`` entries of the ``T`` keys a layer
holds. Key ``j`` is visible to new query ``i`` when ``j <= T - q + i`` (every held token is in the past), the key is
a real token (not left padding), or it is the query's own token (so a padding query never has an empty row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def causal_allowed(q: int, t: int, valid: torch.Tensor | None, rows: slice | None = None, device=None) -> torch.Tensor:
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
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    k_valid: torch.Tensor | None,
    together: torch.Tensor | None = None,
) -> torch.Tensor:
    """Visibility ``(B|1, 1, q, K)`` from sequence indices ``(q,)``/``(K,)``, or per batch row ``(B, q)``/``(B, K)``
    (for transformers' sliding-window layers): causal, or within one image (``together``, see
    :func:`with_groups`; the new tokens are the last ``q`` keys), and within the window."""
    qp, kp = (q_pos[None], k_pos[None]) if q_pos.dim() == 1 else (q_pos, k_pos)
    allowed = kp[:, None, :] <= qp[:, :, None]
    if together is not None:
        allowed = with_groups(allowed[:, None], together, kp.shape[1])[:, 0]
    if window is not None:
        allowed &= (qp[:, :, None] - kp[:, None, :]) < window
    allowed = allowed[:, None]
    if k_valid is not None:
        own = kp[:, None, :] == qp[:, :, None]
        allowed = allowed & (k_valid[:, None, None, :] | own[:, None])
    return allowed


def with_groups(allowed: torch.Tensor, together: torch.Tensor, t: int) -> torch.Tensor:
    """``allowed`` ``(B|1, h|1, q, T)`` with the new queries and the new keys (the last ``q`` of ``T``) of one image
    made visible to each other: ``together`` ``(B, q)`` is each new token's image (-1: none), as Gemma 3's
    bidirectional attention within an image (transformers' ``blockwise_overlay`` of ``token_type_ids``)."""
    q = together.shape[1]
    same = (together[:, :, None] == together[:, None, :]) & (together[:, :, None] >= 0)  # (B, q, q)
    out = allowed.expand(together.shape[0], *allowed.shape[1:]).clone()
    out[..., t - q :] |= same[:, None].to(out.device)
    return out


def sdpa_output(
    module: torch.nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    bias: torch.Tensor | None = None,
    packed: bool = False,
) -> torch.Tensor:
    """Attention output ``(B, q, Hq, D)`` for query ``(B, Hq, q, D)`` over keys/values ``(B, h, T, D)``.

    ``allowed=None`` means plain causal attention with the queries last, where transformers' own sdpa path takes
    exactly the same kernel route as an uncompressed model (so compression 0 is bitwise identical). A mask that
    differs per KV head, or an additive logit ``bias`` ``(B|1, Hq|1, q, T)`` (calibration), goes to sdpa directly
    as a float mask over the query heads. ``packed``: a decoding query (``q == 1``, no dropout) goes to
    :func:`decode_packed` (where no uncompressed run takes this path).
    """
    if packed and query.shape[2] == 1 and dropout == 0.0:
        return decode_packed(query, keys, values, allowed, scaling, bias)
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


def decode_packed(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: torch.Tensor | None,
    scaling: float | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding query per head ``(B, h*g, 1, D)`` over keys/values ``(B, h, T, D)``: ``(B, 1, h*g, D)``.

    The ``g`` query heads of a KV head become ``g`` query rows of that head (transformers' ``pack_gqa``), so keys and
    values are neither repeated nor broadcast per query head: about twice as fast as sdpa's ``enable_gqa`` on CPU.
    Same attention as :func:`sdpa_output` up to rounding, not bit for bit, so it serves only paths that no
    uncompressed run takes (selected reads, per-head segments). ``allowed`` ``(B|1, h|1, 1, T)`` and ``bias``
    ``(B|1, h*g|1, 1, T)`` as in :func:`sdpa_output`.
    """
    b, hq, _, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    rows = query.reshape(b, h, hq // h, d)
    mask = allowed
    if bias is not None:
        f32 = torch.float32 if query.dtype == torch.float32 else query.dtype
        bias = bias.to(f32).reshape(bias.shape[0], h, hq // h, t) if bias.shape[1] > 1 else bias.to(f32)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(b, 1, hq, values.shape[-1])


def needs_mask(q: int, t: int, valid: torch.Tensor | None) -> bool:
    """Whether plain causal sdpa (no mask) would be wrong: padding present, or held tokens before a chunk."""
    return valid is not None or (q > 1 and t != q)


@dataclass
class AttentionCall:
    """One layer's attention for one storage segment in one forward pass.

    ``query`` ``(B, h*g, q, D)`` (the ``q`` new tokens); ``keys``/``values`` ``(B, h, T, D)``, the new tokens in the
    last ``q`` slots; ``valid`` ``(B, h, T)`` or None; ``positions`` ``(B, h, T)``; ``bias`` an additive logit bias
    ``(B|1, h*g|1, q, T)`` or None; ``together`` ``(B, q)``: each new token's image where the tokens of one image
    attend to each other in both directions (Gemma 3; -1: none), or None. Output of every compute: ``(B, q, h*g, D)``.
    """

    module: torch.nn.Module
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor | None
    positions: torch.Tensor
    scaling: float
    dropout: float = 0.0
    bias: torch.Tensor | None = None
    together: torch.Tensor | None = None
    layer_idx: int = 0
    n_layers: int = 1
    # decoding may pack query heads as rows (:func:`decode_packed`): set where no uncompressed run takes this path
    packed: bool = False
    # run state a compute method may keep (``layer_state``: this layer; ``shared``: this cache, e.g. its statistics)
    layer_state: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    @property
    def n_new(self) -> int:
        return self.query.shape[2]


def dense(call: AttentionCall) -> torch.Tensor:
    """Dense causal attention over every held slot (the reference compute); the new tokens of one image see each
    other when ``call.together`` says so."""
    q, t = call.n_new, call.keys.shape[2]
    valid = call.valid
    allowed = None
    if needs_mask(q, t, valid) or call.bias is not None or call.together is not None:
        if valid is not None and valid.shape[1] > 1 and bool((valid == valid[:, :1]).all()):
            valid = valid[:, :1]
        allowed = causal_allowed(q, t, valid, device=call.query.device)
        if call.together is not None:
            allowed = with_groups(allowed, call.together, t)
    return sdpa_output(call.module, call.query, call.keys, call.values, allowed, call.scaling, call.dropout, call.bias,
                       call.packed)  # fmt: skip


def decode_with_probs(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding query's attention output and its probabilities ``(B, h*g, T)``, from one pass over the keys.

    Used when a method evicts at a decoding step and needs that step's attention: computing the probabilities
    beside sdpa would read every key twice. Logits and softmax in fp32; the output in the query's dtype.
    """
    query, keys, values = call.query, call.keys, call.values
    b, hq, _, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    q = query.view(b, h, g, d)
    f32 = torch.float32
    logits = (q.to(f32) @ keys.to(f32).transpose(-1, -2)) * call.scaling  # (B, h, g, T)
    if call.bias is not None:  # (B|1, Hq|1, 1, T) -> (B|1, h|1, g|1, T)
        bias = call.bias.to(f32)
        shape = (bias.shape[0], h, g, t) if bias.shape[1] > 1 else (bias.shape[0], 1, 1, t)
        logits = logits + bias.reshape(shape)
    if call.valid is not None:
        allowed = call.valid.clone()
        allowed[..., -1] = True  # the query's own token
        logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    probs = logits.softmax(dim=-1)
    out = (probs @ values.to(f32)).to(query.dtype)  # (B, h, g, D)
    return out.reshape(b, 1, hq, values.shape[-1]), probs.reshape(b, hq, t)


def read_selected(call: AttentionCall, index: torch.Tensor) -> torch.Tensor:
    """Dense attention of one decoding query over the slots ``index`` ``(B, h, k)`` and the newest slot only."""
    keys, values, valid, bias = gather_reads(index, call.keys, call.values, call.valid, call.bias)
    t = keys.shape[2]
    allowed = None
    if valid is not None or bias is not None:
        allowed = causal_allowed(1, t, valid, device=call.query.device)
    return sdpa_output(call.module, call.query, keys, values, allowed, call.scaling, call.dropout, bias, packed=True)


def gather_reads(index, keys, values, valid, bias):
    """Rows ``index`` ``(B, h, k)`` of the held slots (distinct slots, any order), plus the newest slot (``T - 1``).

    The newest slot is added to the rows that do not list it; where only some rows list it, the others' copy is
    masked out (so nothing is attended to twice). Gathers with ``index_select`` on rows of the storage, several times
    faster than ``gather`` on CPU; one query attends to the rows whatever their order, so nothing is sorted.
    """
    b, h, t, _ = keys.shape
    listed = (index == t - 1).any(dim=-1, keepdim=True)
    repeated = None
    if not bool(listed.all()):
        index = torch.cat([index, torch.full((b, h, 1), t - 1, dtype=index.dtype, device=index.device)], dim=-1)
        if bool(listed.any()):
            repeated = torch.zeros(index.shape, dtype=torch.bool, device=index.device)
            repeated[..., -1:] = listed
    valid, bias = gather_valid_and_bias(index, valid, bias)
    if repeated is not None:
        valid = ~repeated if valid is None else valid & ~repeated
    keys, values = _as_rows(keys), _as_rows(values)
    rows = _rows_of(keys, index)
    value_rows = rows if values.stride() == keys.stride() else _rows_of(values, index)
    return _take(keys, index, rows), _take(values, index, value_rows), valid, bias


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, h, T, D)`` if its storage is rows of ``D`` contiguous elements (cache storage always is; it may be a
    view of a larger buffer), else a contiguous copy."""
    b, h, _, d = x.shape
    s0, s1, s2, s3 = x.stride()
    s0, s1 = (0 if b == 1 else s0), (0 if h == 1 else s1)  # strides of size-1 dimensions are arbitrary
    return x if s3 == 1 and s2 == d and s0 % d == 0 and s1 % d == 0 else x.contiguous()


def _rows_of(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Row numbers of ``x[b, h, index[b, h, j]]`` in ``x``'s storage seen as rows of ``D`` elements (``x`` as from
    :func:`_as_rows`), and how many rows that view spans."""
    b, h, t, d = x.shape
    s0, s1 = (0 if b == 1 else x.stride(0)), (0 if h == 1 else x.stride(1))
    base = torch.arange(0, h * s1 // d, s1 // d, device=index.device) if s1 else index.new_zeros(h)
    if b > 1:
        base = torch.arange(b, device=index.device)[:, None] * (s0 // d) + base
    return (index + base[..., None]).flatten(), ((b - 1) * s0 + (h - 1) * s1) // d + t


def _take(x: torch.Tensor, index: torch.Tensor, rows: tuple[torch.Tensor, int]) -> torch.Tensor:
    """``x[b, h, index[b, h, j]]`` ``(B, h, k, D)`` by ``index_select`` on rows of ``x``'s storage: no copy of ``x``
    and several times faster than ``gather`` on CPU."""
    b, h, _, d = x.shape
    flat, span = rows
    return x.as_strided((span, d), (d, 1)).index_select(0, flat).view(b, h, index.shape[-1], d)


def gather_valid_and_bias(index, valid, bias):
    """Padding flags ``(B, h, T)`` and logit bias ``(B|1, h*g|1, q, T)`` of the read slots ``index`` ``(B, h, k)``."""
    if valid is not None:
        valid = valid.gather(2, index)
    if bias is not None:
        g = bias.shape[1] // index.shape[1] if bias.shape[1] > 1 else 1
        idx = index.repeat_interleave(g, dim=1) if bias.shape[1] > 1 else index[:, :1]
        bias = bias.expand(index.shape[0], -1, -1, -1).gather(3, idx[:, :, None, :].expand(-1, -1, bias.shape[2], -1))
    return valid, bias


def block_sparse(
    call: AttentionCall, blocks: torch.Tensor, block_size: int, key_order: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention computed only on the selected (query block, key block) pairs: the entry point of
    :mod:`kvsieve.sparse` (its docstring gives the semantics and the two kernels).

    ``blocks``: ``(B, h*g, nq, nk)`` bool over query blocks of the pass's ``q`` new tokens and key blocks of the ``T``
    held slots (block ``j`` = slots ``[j * block_size, (j + 1) * block_size)``); the causal mask and padding still
    apply inside selected blocks, and the key blocks holding a query block's own tokens (the diagonal) are always
    computed, so no row is empty. Held slots must be in stream order (prefill). With every block selected it equals
    :func:`dense`. ``key_order`` ``(B, h, T)``: the key axis of ``blocks`` is this permutation of the slots (PBS-Attn).
    """
    from .sparse import block_sparse as kernel

    return kernel(call, blocks, block_size, key_order)


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
