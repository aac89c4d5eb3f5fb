"""Sparse attention kernels for prefill methods: only the selected (query block, key block) pairs are computed.

A prefill method (:class:`kvsieve.methods.base.PrefillMethod`) chooses, per head and query block, which key blocks to
compute; :func:`block_sparse` computes exactly those. Semantics (both kernels): query block ``i`` (rows
``[i * bs, (i + 1) * bs)`` of the pass's new tokens) attends to the keys of its selected key blocks and of its own
diagonal block(s) (the blocks holding its own slots: no row is ever empty), intersected with the causal mask and the
padding flags. ``key_order`` (PBS-Attn) says that the key axis of ``blocks`` is a permutation of the held slots:
position ``p`` of the permuted sequence is slot ``key_order[b, kv_head, p]``; causality is still by slot, and the
"diagonal" added is the permuted key blocks holding the query block's own slots (:func:`permuted_diagonal`).

Two kernels, chosen per call by what the call needs (the choice is recorded in ``stats["prefill_kernel"]``):

- ``flex``: :func:`torch.nn.attention.flex_attention` compiled (``torch.compile``: inductor's C++/OpenMP template on
  CPU, Triton on GPU) with a ``BlockMask``: unselected blocks are never read, nothing is copied, and blocks entirely in
  every query's past skip the mask. Used for passes of at least :data:`FLEX_MIN_QUERIES` new tokens with no padding,
  no logit bias, no dropout and nothing held before the pass (a plain prefill). Lengths are padded to a multiple of
  :data:`PAD_TO`, so one compiled kernel serves every prompt length of a bucket (the padded queries compute only
  their diagonal block; compiling costs ~10-40 s once per bucket and is cached on disk by inductor).
- ``gather``: eager PyTorch: per query block, the selected keys are gathered per head and attended with one masked
  sdpa. Any layout (padding, chunked prefill, a logit bias); slower (the gather is memory-bound), used for short
  passes, where compiling would cost more than it saves, and wherever ``flex`` cannot run.

Why these two: measured by ``benchmarks/prefill_speed.py --kernels`` (the README lists the figures). On 2 CPU cores,
sdpa's causal flash kernel is hard to beat: gathering blocks costs memory bandwidth, batched sdpa over many small
(query block x gathered keys) problems runs well below its large-problem throughput, and an LSE merge of a
diagonal and an off-diagonal part adds two passes; compiled flex reads blocks in place, so its time falls about linearly
with density (measured: 1.6-2.0x dense sdpa's time at full density; faster than sdpa below a density of about 0.6
at 4k-8k tokens, about 0.35 at 2k).

Every call adds its computed and causal (query, key) pair counts per layer and head to the cache's statistics
(``call.shared["stats"]``: ``prefill_density``, ``prefill_density_layers``, ``prefill_density_heads``).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .attention import AttentionCall

FLEX_MIN_QUERIES = 1024  # shorter passes use the eager kernel: compiling a kernel per length costs more than it saves
PAD_TO = 1024  # flex shapes are padded to a multiple of this (one compiled kernel per bucket of prompt lengths)

_flex_lock = threading.Lock()
_flex_state: dict = {}  # "fn": the compiled flex_attention, "error": why it cannot run here (then never retried)


def n_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def own_blocks(q: int, t: int, block_size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key block ``(nq,)`` holding each query block's own slots (the diagonal)."""
    starts = torch.arange(0, q, block_size, device=device)
    stops = torch.clamp(starts + block_size, max=q)
    return (t - q + starts) // block_size, (t - q + stops - 1) // block_size


def causal_blocks(q: int, t: int, block_size: int, device=None) -> torch.Tensor:
    """``(nq, nk)`` bool: key blocks holding at least one key visible to some query of the query block."""
    _, last = own_blocks(q, t, block_size, device)
    return torch.arange(n_blocks(t, block_size), device=device)[None, :] <= last[:, None]


def diagonal(q: int, t: int, block_size: int, device=None) -> torch.Tensor:
    """``(nq, nk)`` bool: each query block's own key block(s)."""
    first, last = own_blocks(q, t, block_size, device)
    kb = torch.arange(n_blocks(t, block_size), device=device)[None, :]
    return (kb >= first[:, None]) & (kb <= last[:, None])


def permuted_diagonal(key_order: torch.Tensor, q: int, block_size: int) -> torch.Tensor:
    """``(B, h, nq, nk)`` bool: the key blocks (on the permuted axis of ``key_order`` ``(B, h, T)``) holding each
    query block's own slots, so that every query sees at least itself whatever a method selects."""
    b, h, t = key_order.shape
    dev = key_order.device
    position = key_order.argsort(dim=-1)  # permuted position of each slot
    nq, nk = n_blocks(q, block_size), n_blocks(t, block_size)
    key_block = position[..., t - q :] // block_size  # (B, h, q): block of each query's own slot
    query_block = torch.arange(q, device=dev) // block_size
    flat = query_block * nk + key_block
    own = torch.zeros(b, h, nq * nk, dtype=torch.bool, device=dev)
    return own.scatter_(-1, flat, True).view(b, h, nq, nk)


def causal_pairs(q: int, t: int, block_size: int, device=None) -> torch.Tensor:
    """``(nq, nk)`` float: visible (query, key) pairs in each block pair (stream order, no padding)."""
    rows = torch.arange(q, device=device) + (t - q)  # slot of each query
    cols = torch.arange(t, device=device)
    nq, nk = n_blocks(q, block_size), n_blocks(t, block_size)
    # keys of block j visible to query at slot s: clamp(s + 1 - j * bs, 0, size_j)
    size = torch.clamp(t - torch.arange(nk, device=device) * block_size, max=block_size)
    seen = torch.clamp(rows[:, None] + 1 - (cols[::block_size])[None, :], min=0)
    seen = torch.minimum(seen, size[None, :]).to(torch.float32)  # (q, nk)
    pad = nq * block_size - q
    return F.pad(seen, (0, 0, 0, pad)).view(nq, block_size, nk).sum(1)


def block_sparse(
    call: AttentionCall, blocks: torch.Tensor, block_size: int, key_order: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention ``(B, q, Hq, D)`` on the selected blocks only (see the module docstring).

    ``blocks``: ``(B|1, Hq|1, nq, nk)`` bool over query blocks of the pass's ``q`` new tokens and key blocks of the
    ``T`` held slots (in ``key_order`` when given, ``(B, h, T)``). Held slots must be in stream order (prefill). With
    every block selected it equals :func:`kvsieve.attention.dense` to fp32 rounding.
    """
    query, keys = call.query, call.keys
    b, hq, q, _ = query.shape
    t = keys.shape[2]
    nq, nk = n_blocks(q, block_size), n_blocks(t, block_size)
    if blocks.shape[-2:] != (nq, nk):
        raise ValueError(f"block mask {tuple(blocks.shape)} does not match {nq} query x {nk} key blocks")
    blocks = blocks.expand(b, hq, nq, nk)
    if key_order is None:
        blocks = (blocks | diagonal(q, t, block_size, query.device)) & causal_blocks(q, t, block_size, query.device)
    else:
        blocks = blocks | permuted_diagonal(key_order, q, block_size).repeat_interleave(hq // keys.shape[1], dim=1)
    kernel = "flex" if _flex_fits(call) else "gather"
    out = None
    if kernel == "flex":
        out = _flex(call, blocks, block_size, key_order)
        if out is None:
            kernel = "gather"
    if out is None:
        out = _gather(call, blocks, block_size, key_order)
    _record(call, blocks, block_size, key_order, kernel)
    return out


# --- the compiled kernel ------------------------------------------------------------------------------------------
def _flex_fits(call: AttentionCall) -> bool:
    q, t = call.n_new, call.keys.shape[2]
    return (
        q >= FLEX_MIN_QUERIES
        and q == t
        and call.valid is None
        and call.bias is None
        and call.dropout == 0.0
        and "error" not in _flex_state
    )


def _compiled_flex():
    with _flex_lock:
        if "fn" not in _flex_state and "error" not in _flex_state:
            try:
                from torch.nn.attention.flex_attention import flex_attention

                _flex_state["fn"] = torch.compile(flex_attention, dynamic=False)
            except Exception as err:  # no compiler backend in this build: the eager kernel does the work
                _flex_state["error"] = f"{type(err).__name__}: {err}"
        return _flex_state.get("fn")


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def _flex(call: AttentionCall, blocks: torch.Tensor, bs: int, key_order: torch.Tensor | None) -> torch.Tensor | None:
    """The compiled flex path, or None (the caller falls back) when it cannot run here."""
    fn = _compiled_flex()
    if fn is None:
        return None
    from torch.nn.attention.flex_attention import BlockMask

    query, keys, values = call.query, call.keys, call.values
    b, hq, q, _ = query.shape
    h = keys.shape[1]
    g = hq // h
    step = max(PAD_TO, bs) if max(PAD_TO, bs) % bs == 0 else bs * n_blocks(PAD_TO, bs)
    qp = step * n_blocks(q, step)
    nqp = qp // bs
    pad = qp - q
    dev = query.device
    if key_order is not None:  # the keys in the permuted order the blocks refer to (one copy per layer)
        keys = keys.gather(2, key_order[..., None].expand_as(keys))
        values = values.gather(2, key_order[..., None].expand(*key_order.shape, values.shape[-1]))
    if pad:
        query, keys, values = (F.pad(x, (0, 0, 0, pad)) for x in (query, keys, values))
    chosen = torch.zeros(b, hq, nqp, nqp, dtype=torch.bool, device=dev)
    chosen[:, :, : blocks.shape[2], : blocks.shape[3]] = blocks
    padded_rows = torch.arange(nqp, device=dev) >= blocks.shape[2]
    chosen[:, :, padded_rows] |= torch.eye(nqp, dtype=torch.bool, device=dev)[padded_rows]
    if key_order is None:
        full_geom = torch.ones(nqp, nqp, dtype=torch.bool, device=dev).tril(-1)  # entirely in every row's past
        mask_mod = _causal
    else:
        order = torch.cat([key_order, torch.arange(q, qp, device=dev).expand(b, h, pad)], dim=-1) if pad else key_order
        order = order.contiguous()
        top = order.view(b, h, nqp, bs).amax(-1)  # latest slot in each key block
        full_geom = top[:, :, None, :] <= (torch.arange(nqp, device=dev) * bs)[None, None, :, None]
        full_geom = full_geom.repeat_interleave(g, dim=1)

        def mask_mod(bi, hi, q_idx, kv_idx):
            return order[bi, hi // g, kv_idx] <= q_idx

    full = chosen & full_geom
    partial = chosen & ~full_geom

    def listing(m):
        return m.sum(-1, dtype=torch.int32), m.to(torch.int8).argsort(dim=-1, descending=True, stable=True).int()

    (pc, pi), (fc, fi) = listing(partial), listing(full)
    mask = BlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(qp, qp))
    try:
        out = fn(query, keys, values, block_mask=mask, scale=call.scaling, enable_gqa=g > 1)
    except Exception as err:  # the compiler failed on this machine: remember, and let the eager kernel work
        _flex_state["error"] = f"{type(err).__name__}: {err}"
        return None
    return out[:, :, :q].transpose(1, 2).contiguous()


# --- the eager kernel ---------------------------------------------------------------------------------------------
def _gather(call: AttentionCall, blocks: torch.Tensor, bs: int, key_order: torch.Tensor | None) -> torch.Tensor:
    """Per query block: every head's selected keys gathered (padded to the longest head), one masked sdpa."""
    b, hq, q, _ = call.query.shape
    h, t = call.keys.shape[1], call.keys.shape[2]
    dev = call.query.device
    order = None if key_order is None else key_order.repeat_interleave(hq // h, dim=1)  # (B, Hq, T)
    within = torch.arange(bs, device=dev)
    out = torch.empty(b, q, hq, call.values.shape[-1], dtype=call.query.dtype, device=dev)
    rows_of = _RowSource(call)
    for i in range(n_blocks(q, bs)):
        sel = blocks[:, :, i]  # (B, Hq, nk)
        count = sel.sum(-1)
        k_max = int(count.max())
        picked = sel.to(torch.int8).argsort(dim=-1, descending=True, stable=True)[..., :k_max]
        pos = (picked[..., None] * bs + within).flatten(-2)  # positions on the (permuted) key axis
        listed = (torch.arange(k_max, device=dev)[None, None, :] < count[..., None]).repeat_interleave(bs, -1)
        listed &= pos < t
        pos = pos.clamp(max=t - 1)
        slots = pos if order is None else order.gather(-1, pos)
        rows = slice(i * bs, min(q, (i + 1) * bs))
        out[:, rows] = rows_of.attend(rows, slots, listed)
    return out


def token_sparse(call: AttentionCall, slots: torch.Tensor, listed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention ``(B, q, Hq, D)`` at token granularity along the keys (AnchorAttention's stripes).

    Query block ``i`` attends to the slots ``slots[:, :, i]`` ``(B, Hq, nq, K)`` where ``listed`` is True, plus its own
    diagonal key block(s), within the causal mask and padding. Eager kernel (gathered keys, one sdpa per query block);
    the computed pairs go to the density statistics like :func:`block_sparse`'s.
    """
    b, hq, q, _ = call.query.shape
    t = call.keys.shape[2]
    dev = call.query.device
    first, last = own_blocks(q, t, block_size, dev)
    out = torch.empty(b, q, hq, call.values.shape[-1], dtype=call.query.dtype, device=dev)
    rows_of = _RowSource(call)
    computed = torch.zeros(hq, device=dev)
    for i in range(n_blocks(q, block_size)):
        lo, hi = int(first[i]) * block_size, min(t, (int(last[i]) + 1) * block_size)
        own = torch.arange(lo, hi, device=dev).expand(b, hq, hi - lo)
        s = slots[:, :, i]
        keep = listed[:, :, i] & ((s < lo) | (s >= hi))  # the diagonal is added once, below
        rows = slice(i * block_size, min(q, (i + 1) * block_size))
        o, seen = rows_of.attend(
            rows, torch.cat([s, own], -1), torch.cat([keep, torch.ones_like(own, dtype=torch.bool)], -1), True
        )
        out[:, rows] = o
        computed += seen
    causal = torch.full((hq,), float(q * (t - q) + q * (q + 1) / 2) * b, device=dev)
    record_pairs(call, computed, causal, "gather")
    return out


class _RowSource:
    """Gathers key/value rows per query head (from its KV head) and attends one block of query rows to them."""

    def __init__(self, call: AttentionCall):
        self.call = call
        b, hq = call.query.shape[:2]
        h, t, d = call.keys.shape[1:]
        self.g, self.t = hq // h, t
        self.keys = call.keys.contiguous().view(b * h * t, d)
        self.values = call.values.contiguous().view(b * h * t, call.values.shape[-1])
        dev = call.query.device
        self.base = (torch.arange(b, device=dev)[:, None] * h + torch.arange(hq, device=dev)[None, :] // self.g) * t
        self.valid = None if call.valid is None else call.valid.repeat_interleave(self.g, dim=1)

    def attend(self, rows: slice, slots: torch.Tensor, listed: torch.Tensor, count: bool = False):
        """Output ``(B, r, Hq, D)`` of query rows ``rows`` over ``slots`` ``(B, Hq, K)`` where ``listed``;
        with ``count``, also the visible pairs computed per head ``(Hq,)``."""
        call = self.call
        query = call.query
        b, hq, q, d = query.shape
        q_slot = torch.arange(rows.start, rows.stop, device=query.device) + (self.t - q)
        later = slots[:, :, None, :] <= q_slot[None, None, :, None]
        mask = listed[:, :, None, :] & later
        if self.valid is not None:
            mask &= self.valid.gather(-1, slots)[:, :, None, :] | (slots[:, :, None, :] == q_slot[None, None, :, None])
        flat = (slots + self.base[..., None]).flatten()
        k_sel = self.keys.index_select(0, flat).view(b, hq, -1, d)
        v_sel = self.values.index_select(0, flat).view(b, hq, -1, self.values.shape[-1])
        attn_mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
        if call.bias is not None:
            bias = call.bias[:, :, rows].to(query.dtype)
            bias = bias.expand(b, hq, -1, -1).gather(-1, slots[:, :, None, :].expand(-1, -1, bias.shape[2], -1))
            attn_mask = attn_mask + bias
        o = F.scaled_dot_product_attention(
            query[:, :, rows], k_sel, v_sel, attn_mask=attn_mask, dropout_p=call.dropout, scale=call.scaling
        ).transpose(1, 2)
        if not count:
            return o
        return o, (listed[:, :, None, :] & later).sum((-1, -2)).sum(0).to(torch.float32)


# --- statistics ---------------------------------------------------------------------------------------------------
def _pairs(q: int, t: int, bs: int, key_order: torch.Tensor | None, g: int) -> torch.Tensor:
    """Visible (query, key) pairs per block pair: ``(nq, nk)``, or ``(B, Hq, nq, nk)`` for permuted keys."""
    if key_order is None:
        return causal_pairs(q, t, bs, key_order.device if key_order is not None else None)
    b, h, _ = key_order.shape
    nq, nk = n_blocks(q, bs), n_blocks(t, bs)
    pad = nk * bs - t
    slots = F.pad(key_order, (0, pad), value=t + q)  # padding keys are never visible
    slots = slots.view(b, h, nk, bs).sort(dim=-1).values
    q_slot = torch.arange(q, device=key_order.device) + (t - q)
    seen = torch.searchsorted(slots.contiguous(), q_slot.expand(b, h, nk, q).contiguous(), right=True)  # (B,h,nk,q)
    seen = F.pad(seen.to(torch.float32), (0, nq * bs - q)).view(b, h, nk, nq, bs).sum(-1).transpose(-1, -2)
    return seen.repeat_interleave(g, dim=1)


def _record(call: AttentionCall, blocks: torch.Tensor, bs: int, key_order: torch.Tensor | None, kernel: str) -> None:
    """Add this pass's computed and causal pair counts per head to the cache's statistics."""
    q, t = call.n_new, call.keys.shape[2]
    hq = call.query.shape[1]
    g = hq // call.keys.shape[1]
    pairs = _pairs(q, t, bs, key_order, g).to(blocks.device)
    computed = (blocks.to(torch.float32) * pairs).sum((-1, -2)).sum(0)  # (Hq,)
    causal = torch.full((hq,), float(q * (t - q) + q * (q + 1) / 2) * blocks.shape[0], device=blocks.device)
    record_pairs(call, computed, causal, kernel)


def record_pairs(call: AttentionCall, computed: torch.Tensor, causal: torch.Tensor, kernel: str | None) -> None:
    """Accumulate computed/causal (query, key) pairs ``(Hq,)`` of this layer; refresh the density statistics."""
    counts = call.shared.setdefault("prefill_pairs", {})
    layer = counts.setdefault(call.layer_idx, [[0.0] * computed.numel(), [0.0] * computed.numel()])
    if len(layer[0]) != computed.numel():  # another segment of heads: keep per-head lists aligned by head count
        layer[0] += [0.0] * (computed.numel() - len(layer[0]))
        layer[1] += [0.0] * (computed.numel() - len(layer[1]))
    for j, (c, a) in enumerate(zip(computed.tolist(), causal.tolist(), strict=True)):
        layer[0][j] += c
        layer[1][j] += a
    stats = call.shared.setdefault("stats", {})
    n_layers = max(call.n_layers, max(counts) + 1)
    stats["prefill_density_heads"] = [
        [round(c / a, 4) if a else None for c, a in zip(*counts[i], strict=True)] if i in counts else None
        for i in range(n_layers)
    ]
    stats["prefill_density_layers"] = [
        round(sum(counts[i][0]) / sum(counts[i][1]), 4) if i in counts and sum(counts[i][1]) else None
        for i in range(n_layers)
    ]
    total = sum(sum(c[1]) for c in counts.values())
    stats["prefill_density"] = round(sum(sum(c[0]) for c in counts.values()) / total, 4) if total else None
    if kernel is not None:
        stats["prefill_kernel"] = kernel if stats.get("prefill_kernel") in (None, kernel) else "mixed"


def add_stat(call: AttentionCall, name: str, value: float, weight: float = 1.0) -> None:
    """A method's own statistic, averaged over every call that reports it (e.g. the share of query-aware heads)."""
    sums = call.shared.setdefault("prefill_stat_sums", {})
    total, n = sums.get(name, (0.0, 0.0))
    sums[name] = (total + value * weight, n + weight)
    call.shared.setdefault("stats", {})[name] = round(sums[name][0] / sums[name][1], 4) if sums[name][1] else None


# --- block scores shared by the methods ---------------------------------------------------------------------------
def cumulative_select(scores: torch.Tensor, threshold: float, allowed: torch.Tensor) -> torch.Tensor:
    """The fewest entries per row (last dim) whose scores sum to ``threshold`` of the row's total, largest first.

    ``scores`` >= 0; ``allowed`` (broadcastable bool) marks candidates. ``threshold >= 1`` selects every allowed entry
    (rounding can leave a cumulative sum a hair under the total).
    """
    allowed = allowed.expand_as(scores)
    if threshold >= 1.0:
        return allowed.clone()
    scores = scores.masked_fill(~allowed, 0.0)
    total = scores.sum(-1, keepdim=True)
    ordered, index = scores.sort(dim=-1, descending=True, stable=True)
    before = ordered.cumsum(-1) - ordered  # mass of the entries ranked above each one
    keep = (before < threshold * total) & (ordered > 0)
    return torch.zeros_like(keep).scatter_(-1, index, keep) & allowed


def pool_blocks(x: torch.Tensor, block_size: int, dim: int = 2, reduce: str = "mean") -> torch.Tensor:
    """Mean (or sum) of ``x`` over blocks of ``block_size`` along ``dim`` (a short last block averages what it has)."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    nb = n_blocks(n, block_size)
    padded = F.pad(x, (0, nb * block_size - n)).unflatten(-1, (nb, block_size)).sum(-1)
    if reduce == "mean":
        sizes = torch.clamp(n - torch.arange(nb, device=x.device) * block_size, max=block_size)
        padded = padded / sizes.to(padded.dtype)
    return padded.movedim(-1, dim)


def pooled_block_probs(call: AttentionCall, block_size: int) -> torch.Tensor:
    """Block-level attention ``(B, Hq, nq, nk)``: softmax of mean-pooled queries against mean-pooled keys over the
    causal key blocks (FlexPrefill's query-aware estimate, MInference's block-sparse pattern, PBS-Attn's selection)."""
    q, t = call.n_new, call.keys.shape[2]
    hq, h = call.query.shape[1], call.keys.shape[1]
    pq = pool_blocks(call.query.to(torch.float32), block_size)  # (B, Hq, nq, D)
    pk = pool_blocks(call.keys.to(torch.float32), block_size).repeat_interleave(hq // h, dim=1)
    logits = (pq @ pk.transpose(-1, -2)) * call.scaling
    allowed = causal_blocks(q, t, block_size, call.query.device)
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def last_queries_probs(call: AttentionCall, n: int) -> torch.Tensor:
    """Attention probabilities ``(B, Hq, n, T)`` of the pass's last ``n`` queries (fp32, causal, padding masked)."""
    from .attention import causal_allowed

    q, t = call.n_new, call.keys.shape[2]
    hq, h = call.query.shape[1], call.keys.shape[1]
    n = min(n, q)
    rows = slice(q - n, q)
    keys = call.keys.to(torch.float32).repeat_interleave(hq // h, dim=1)
    logits = (call.query[:, :, rows].to(torch.float32) @ keys.transpose(-1, -2)) * call.scaling
    allowed = causal_allowed(q, t, call.valid, rows=rows, device=call.query.device)
    allowed = allowed.repeat_interleave(hq // h, dim=1) if allowed.shape[1] > 1 else allowed
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def slash_sums(probs: torch.Tensor, q: int) -> torch.Tensor:
    """Attention ``(B, Hq, T)`` summed along each diagonal: entry ``o`` sums the pairs with query slot - key slot = o.

    ``probs``: ``(B, Hq, n, T)`` of the pass's last ``n`` of ``q`` new queries."""
    b, hq, n, t = probs.shape
    q_slot = torch.arange(t - n, t, device=probs.device)[:, None]
    offset = q_slot - torch.arange(t, device=probs.device)[None, :]  # (n, T)
    ok = offset >= 0
    index = offset.clamp(min=0).expand(b, hq, n, t).flatten(-2)
    src = (probs * ok).flatten(-2)
    return torch.zeros(b, hq, t, dtype=probs.dtype, device=probs.device).scatter_add_(-1, index, src)


def vertical_slash_blocks(vertical: torch.Tensor, slash: torch.Tensor, q: int, block_size: int) -> torch.Tensor:
    """Block mask ``(B, Hq, nq, nk)`` covering vertical lines (key slots, ``(B, Hq, T)`` bool) and slash lines
    (diagonals by offset query slot - key slot, ``(B, Hq, T)`` bool) for every query block."""
    b, hq, t = vertical.shape
    dev = vertical.device
    nq, nk = n_blocks(q, block_size), n_blocks(t, block_size)
    blocks = pool_blocks(vertical.to(torch.float32), block_size, dim=2, reduce="sum") > 0  # (B, Hq, nk)
    blocks = blocks[:, :, None, :].expand(b, hq, nq, nk).clone()
    starts = torch.arange(nq, device=dev) * block_size + (t - q)  # first query slot of each block
    stops = torch.clamp(starts + block_size, max=t) - 1
    offsets = torch.arange(t, device=dev)
    weight = slash.to(torch.float32)[:, :, None, :].expand(b, hq, nq, t)
    for edge in (starts, stops):  # a diagonal crosses at most the key blocks of its two ends within the query block
        slot = edge[:, None] - offsets[None, :]  # (nq, T) key slot of the diagonal at that query row
        kb = torch.where(slot >= 0, slot.clamp(min=0) // block_size, nk)
        hits = torch.zeros(b, hq, nq, nk + 1, device=dev).scatter_add_(-1, kb.expand(b, hq, nq, t), weight)
        blocks |= hits[..., :nk] > 0
    return blocks


def block_mass(call: AttentionCall, block_size: int) -> torch.Tensor:
    """Exact attention mass ``(B, Hq, nq, nk)`` of each (query block, key block): full softmax attention, summed.

    Computed one query block at a time (memory ``O(block_size x T)`` per head) for the oracle and for MInference's
    offline search; it costs a full attention pass.
    """
    from .attention import causal_allowed

    query, keys = call.query, call.keys
    b, hq, q, d = query.shape
    h, t = keys.shape[1], keys.shape[2]
    g = hq // h
    nq, nk = n_blocks(q, block_size), n_blocks(t, block_size)
    k_t = keys.to(torch.float32).transpose(-1, -2)
    mass = torch.zeros(b, hq, nq, nk, dtype=torch.float32, device=query.device)
    for i in range(nq):
        rows = slice(i * block_size, min(q, (i + 1) * block_size))
        r = rows.stop - rows.start
        logits = (query[:, :, rows].to(torch.float32).reshape(b, h, g * r, d) @ k_t).view(b, hq, r, t)
        allowed = causal_allowed(q, t, call.valid, rows=rows, device=query.device)
        allowed = allowed.repeat_interleave(g, dim=1) if allowed.shape[1] > 1 else allowed
        probs = (logits * call.scaling).masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        mass[:, :, i] = pool_blocks(probs.sum(dim=2), block_size, dim=2, reduce="sum")
    return mass
