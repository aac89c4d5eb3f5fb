"""The kvsieve cache: per-layer objects behind transformers' ``Cache`` interface.

A :class:`SieveLayer` is a transformers ``CacheLayerMixin``: the model's attention module calls ``update`` as with any
cache, and the kvsieve attention function (:mod:`kvsieve.sieve`) then reads the layer, computes attention and runs
the layer's pipeline (:mod:`kvsieve.pipeline`). Storage is a list of :class:`~kvsieve.storage.Segment` objects:

* one segment covering every KV head while all heads hold the same number of tokens (the usual case);
* one segment per KV head once a head-wise policy gives heads different budgets, so a head that keeps 40 tokens
  holds buffers of 40 tokens (plus the bounded spare room every segment has). Nothing is padded or masked out.

Positions. Keys are stored as the model rotated them, at their stream positions (``get_seq_length()`` is the number
of tokens seen). A layer that *re-indexes positions within the cache* (StreamingLLM; ``rerotate=True``) gives each
token a ``shift``: the number of evicted tokens that came after it, and holds its key rotated by that shift. Why that
is exact: the query sits at stream position ``s_q = p_q + E`` (``p_q`` its index within the cache, ``E`` all tokens
evicted), a key at ``s_k + shift_k = p_k + E``; RoPE depends only on the difference, which is ``p_q - p_k``, the
paper's in-cache distance. Shifts change only when tokens are evicted, and only for tokens older than an evicted one
(for StreamingLLM: the sinks). At each eviction those rows are rotated again from their pristine keys, kept aside
for exactly the rows whose shift is not 0 (``Segment.side``), so no error accumulates over a long stream, keys whose
shift is 0 are bit for bit what the model made, and attention reads the buffers as they are.

Sliding-window layers (Gemma 3) keep transformers' own ``DynamicSlidingWindowLayer``: they already hold at most a
window of tokens, and methods compress only full-attention layers.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import rope
from .compat import layer_types_and_kwargs, sliding_layer
from .errors import KVSieveError, UnsupportedModelError
from .storage import Segment
from .storage.quantized import PackedSegment

DROPPED_BEFORE_LLM = "dropped_before_llm"  # shared key: prompt tokens pruned before the first decoder layer


class SieveLayer(CacheLayerMixin):
    """A full-attention cache layer that holds only kept tokens (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, rerotate: bool = False, inv_freq: torch.Tensor | None = None):
        super().__init__()
        if rerotate and inv_freq is None:
            raise ValueError("rerotate=True needs the model's RoPE inverse frequencies (inv_freq)")
        self.rerotate = rerotate
        self.inv_freq = inv_freq
        self.segments: list[Segment] = []
        self.layer_state: dict = {}  # the method's per-layer state that is not per token
        self.seen = 0  # tokens ever added, real or padding
        self._real_seen: torch.Tensor | None = None  # (B,) real tokens ever added per batch row
        self.evictions = 0  # forward passes that evicted (a checkpoint is valid only while this is unchanged)
        self.n_new = 0
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- CacheLayerMixin interface -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.n_kv_heads = key_states.shape[1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stage the new tokens; ``commit`` adds them once the attention function knows their positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._new is not None:
            raise KVSieveError(
                "kvsieve cache updated twice without attention in between: run the model inside "
                "`with sieve.attach(model)` so the kvsieve attention function reads the cache."
            )
        self._new = (key_states, value_states)
        self.n_new = key_states.shape[2]
        self.seen += self.n_new
        # The kvsieve attention function reads the layer directly; these are returned only to honour the interface.
        return key_states, value_states

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers < 5.4 passes cache_position
            query_length = query_length.shape[0]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        """Stream position of the next token: the tokens seen (re-indexing layers shift keys instead)."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # the same abstract method's name before transformers 5.13

    def reset(self) -> None:
        self.segments, self.seen, self.n_new, self._new = [], 0, 0, None
        self.layer_state, self.evictions, self._real_seen = {}, 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise KVSieveError("kvsieve caches do not support beam search or num_return_sequences > 1")

    def crop(self, tokens_to_remove: int) -> None:
        raise KVSieveError("a kvsieve cache cannot be cropped: evicted tokens are gone (use cache.checkpoint())")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise KVSieveError("kvsieve caches do not support beam search or num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise KVSieveError("kvsieve caches do not support beam search or num_return_sequences > 1")

    # --- kvsieve interface ---------------------------------------------------------------------------------------
    @property
    def held(self) -> int:
        """Tokens held (the longest head where heads differ), staged tokens not included."""
        return max((s.length for s in self.segments), default=0)

    @property
    def length(self) -> int:
        """Tokens held plus staged new tokens."""
        return self.held + (self.n_new if self._new is not None else 0)

    def commit(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Add the staged tokens, given the model's position ids ``(B|1, q)`` and padding flags ``(B, q)``."""
        if self._new is None:
            raise RuntimeError("no staged tokens to commit")
        keys, values = self._new
        self._new = None
        b, h, q, _ = keys.shape
        pos = positions.to(keys.device).expand(b, q)
        if valid is not None:  # padding sits before every real token of its row: position -1 (keys are rotated already)
            pos = pos.masked_fill(~valid.to(keys.device), -1)
        pos = pos[:, None, :].expand(b, h, q)
        val = None if valid is None else valid.to(keys.device)[:, None, :].expand(b, h, q)
        if valid is not None or self._real_seen is not None:  # per-row counts only once padding appears
            before = self._real_seen if self._real_seen is not None else torch.full((b,), self.seen - q)
            real = torch.full((b,), q) if valid is None else valid.sum(dim=-1).to("cpu", torch.int64)
            self._real_seen = before + real
        shift = torch.zeros(1, dtype=torch.int64, device=keys.device).expand(b, h, q) if self.rerotate else None
        if not self.segments:
            self.segments = [Segment(0, keys, values, pos, val, shift=shift)]
        else:
            for seg in self.segments:
                hs = seg.heads
                seg.append(keys[:, hs], values[:, hs], pos[:, hs], None if val is None else val[:, hs], shift)
        self.n_new = 0

    def real_seen(self) -> list[int]:
        """Real (not padding) tokens this layer has seen, per batch row (one number while no row had padding)."""
        return [self.seen] if self._real_seen is None else self._real_seen.tolist()

    @contextmanager
    def attention_view(self, seg: Segment) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values as attention must see them inside the block.

        Plain segments hold keys already rotated by their shifts (see the module docstring); packed segments
        (quantised, merged) hold them unrotated and yield rotated copies.
        """
        keys, values = seg.read()
        if self.rerotate and isinstance(seg, PackedSegment) and bool((seg.shift != 0).any()):
            keys = keys.clone()
            moved = seg.shift != 0
            keys[moved] = rope.rotate(keys[moved], seg.shift[moved], self.inv_freq)
        yield keys, values

    def _unrotate(self, seg: Segment) -> None:
        """Put the pristine keys of shifted rows back before rows move or shifts change."""
        if self.rerotate and not isinstance(seg, PackedSegment) and seg.side is not None:
            index, pristine = seg.side
            seg.rows(index).index_copy_(0, seg.flat_rows(index), pristine)
            seg.side = None

    def _rotate(self, seg: Segment) -> None:
        """Rotate every row whose shift is not 0 by its shift, from its pristine key (kept in ``seg.side``)."""
        if not self.rerotate or isinstance(seg, PackedSegment):
            return
        moved = seg.shift != 0
        if not bool(moved.any()):
            return
        index = moved.nonzero()  # (N, 3): batch, head, slot
        rows = seg.flat_rows(index)
        flat = seg.rows(index)
        pristine = flat.index_select(0, rows)
        flat.index_copy_(0, rows, rope.rotate(pristine, seg.shift[moved], self.inv_freq))
        seg.side = (index, pristine)

    def keep(self, indices: list[torch.Tensor], ordered: bool = False) -> None:
        """Keep the tokens at ``indices``: one ``(B, h_s, k)`` tensor per segment, or one ``(B, 1, k_h)`` per head.

        Per-head indices of different lengths given for a uniform layer split it into per-head segments.
        ``ordered``: keep the tokens in slot order (``Segment.gather``) rather than filling holes (``Segment.keep``).
        """
        if len(indices) != len(self.segments):
            if len(self.segments) != 1 or len(indices) != self.segments[0].n_heads:
                raise ValueError(f"expected {len(self.segments)} index tensors, got {len(indices)}")
            if len({int(i.shape[-1]) for i in indices}) == 1:
                indices = [torch.cat(indices, dim=1)]
            else:
                self.segments = self.segments[0].split_heads()
        for seg, idx in zip(self.segments, indices, strict=True):
            if self.rerotate:
                self._unrotate(seg)
                _add_shifts(seg, idx)
            if ordered:
                seg.gather(idx)
            else:
                seg.keep(idx)
            self._rotate(seg)
        self.evictions += 1

    def drop_one(self, victim: torch.Tensor) -> None:
        """Evict one token per (batch, head) of a single-segment layer: slots ``victim`` ``(B, h, 1)``."""
        (seg,) = self.segments
        if self.rerotate:
            self._unrotate(seg)
            gone = seg.positions.gather(2, victim)  # every token before the evicted one moves up by one
            seg.shift.add_((seg.positions < gone).to(seg.shift.dtype))
        seg.drop_one(victim)
        self._rotate(seg)
        self.evictions += 1

    def tokens_per_head(self) -> list[int]:
        return [s.length for s in self.segments for _ in range(s.n_heads)]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)

    def reserved_nbytes(self) -> int:
        return sum(s.reserved_nbytes() for s in self.segments)

    def aux_nbytes(self) -> int:
        return sum(s.aux_nbytes() for s in self.segments)


def _add_shifts(seg: Segment, index: torch.Tensor) -> None:
    """Before evicting all but ``index`` ``(B, h, k)``: each kept token's shift grows by the real tokens evicted after
    it (padding comes before every real token of its row, so it never counts)."""
    pos = seg.positions
    evicted = torch.ones(pos.shape, dtype=torch.bool, device=pos.device).scatter_(2, index, False)
    if seg.valid is not None:
        evicted &= seg.valid
    n_evicted = evicted.sum(dim=-1, keepdim=True)
    most = int(n_evicted.max())
    if most == 0:
        return
    if most == 1:  # one token goes (a decoding step): every token before it moves by one
        gone = pos.masked_fill(~evicted, -1).amax(dim=-1, keepdim=True)  # its position, or -1: no token moves
        seg.shift.add_((pos < gone).to(seg.shift.dtype))
        return
    # evicted positions sorted, others pushed below every position; count those above each token's position
    ev_sorted = pos.masked_fill(~evicted, -1).sort(dim=-1).values.contiguous()
    at_or_below = torch.searchsorted(ev_sorted, pos.contiguous(), right=True) - (pos.shape[-1] - n_evicted)
    seg.shift.add_(n_evicted - at_or_below)


_last_update = threading.local()


def take_last_update() -> tuple[SieveCache, int] | None:
    """The (cache, layer index) a model's attention module updated just before calling attention, once.

    transformers does not hand the cache to the attention function, so ``SieveCache.update`` leaves it here and the
    kvsieve attention function takes it; a forward pass that never touched a kvsieve cache finds nothing.
    """
    taken = getattr(_last_update, "value", None)
    _last_update.value = None
    return taken


def _layer_nbytes(layer: CacheLayerMixin, reserved: bool = False) -> int:
    if isinstance(layer, SieveLayer):
        return layer.reserved_nbytes() if reserved else layer.nbytes()
    if getattr(layer, "keys", None) is None or not layer.is_initialized:
        return 0
    return sum(t.nelement() * t.element_size() for t in (layer.keys, layer.values))


def _layer_tokens(layer: CacheLayerMixin) -> int | list[int]:
    if isinstance(layer, SieveLayer):
        per_head = layer.tokens_per_head()
        if not per_head:
            return 0
        return per_head[0] if len(set(per_head)) == 1 else per_head
    if getattr(layer, "keys", None) is None or not layer.is_initialized or layer.keys.numel() == 0:
        return 0
    return int(layer.keys.shape[-2])


class SieveCache(Cache):
    """A transformers ``Cache`` whose full-attention layers are :class:`SieveLayer` objects.

    Made by ``Sieve.attach(model)`` (or ``sieve.new_cache()`` inside it) and valid only inside that block: pass it to
    ``model(...)`` / ``model.generate(...)`` (``kvsieve.cache_kwargs(model, cache)`` names the argument the installed
    transformers expects). Run state of the methods lives here, never on method objects: per-token state in the
    segments, per-layer state in ``layer.layer_state``, state shared by the layers of one cache in ``shared``, and
    the state of the forward pass in progress in ``pass_state``.
    """

    def __init__(self, config, session=None, rerotate: bool = False, inv_freq: torch.Tensor | None = None):
        text_config = config.get_text_config(decoder=True)
        layers: list[CacheLayerMixin] = []
        types, kwargs = layer_types_and_kwargs(text_config)
        for i, (kind, layer_kwargs) in enumerate(zip(types, kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(SieveLayer(rerotate=rerotate, inv_freq=inv_freq))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(sliding_layer(layer_kwargs))
            else:
                raise UnsupportedModelError(
                    f"layer {i} is a {kind!r} layer; kvsieve caches support full-attention and sliding-window "
                    "layers only. Use a decoder-only attention model (Llama, Mistral, Qwen2/3, Gemma 3)."
                )
        super().__init__(layers=layers)
        self.compressing = True
        self.shared: dict = {}  # method state shared across the layers of this cache
        self.pass_state: dict = {}  # state of the forward pass in progress (sequence pruning decisions)
        self._session = None if session is None else weakref.ref(session)
        self.broken: str | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Stream position of the next token: the tokens layer ``layer_idx`` has seen, plus the prompt tokens dropped
        before the first decoder layer (pre-LLM token pruning), which no layer saw but which keep their positions. So
        a direct ``model(...)`` call after such a pass gets the original positions, as ``model.generate`` does."""
        return super().get_seq_length(layer_idx) + int(self.shared.get(DROPPED_BEFORE_LLM, 0))

    def abandon_pass(self, layer_idx: int) -> None:
        """After an error in layer ``layer_idx``'s attention: drop its staged tokens; if earlier layers already took
        this pass's tokens, the cache is inconsistent and refuses further use (it says why)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, SieveLayer) and layer._new is not None:
            layer.seen -= layer.n_new
            layer._new, layer.n_new = None, 0
        seen = {layer.get_seq_length() for layer in self.layers if getattr(layer, "is_initialized", False)}
        if len(seen) > 1:
            self.broken = f"an error in layer {layer_idx}"

    def adopt(self, session) -> None:
        """Belong to ``session`` from now on (``Sieve.attach(model, cache=...)``)."""
        self._session = weakref.ref(session)

    @property
    def session(self):
        """The attach block this cache belongs to (None once it has ended or for a cache built outside one)."""
        return None if self._session is None else self._session()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        session = self.session
        if self._session is not None and (session is None or not session.active):
            raise KVSieveError(
                "this kvsieve cache belongs to a `with sieve.attach(model):` block that has ended; run the model "
                "inside that block, or make a new cache with a new attach."
            )
        if self.broken:
            raise KVSieveError(
                f"this kvsieve cache was left part-way through a forward pass by an error ({self.broken}); make a "
                "new cache with sieve.new_cache() or a new attach"
            )
        _last_update.value = (self, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @contextmanager
    def paused(self) -> Iterator[SieveCache]:
        """Append without evicting inside this block (e.g. a question after a compressed context)."""
        before = self.compressing
        self.compressing = False
        try:
            yield self
        finally:
            self.compressing = before

    def stats(self) -> dict:
        """Numbers methods report about this cache's passes (e.g. a sparse prefill's attention density), by name."""
        return dict(self.shared.get("stats", {}))

    def sieve_layers(self) -> list[SieveLayer]:
        return [layer for layer in self.layers if isinstance(layer, SieveLayer)]

    def kv_tokens(self) -> list[int | list[int]]:
        """Tokens held per layer: an int, or a list per KV head where heads differ."""
        return [_layer_tokens(layer) for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of the keys and values the cache holds (the tokens kept; see ``reserved_kv_bytes``)."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    def reserved_kv_bytes(self) -> int:
        """Bytes allocated for keys and values, spare room included: at most 1.25 x held + 32 slots per segment."""
        return sum(_layer_nbytes(layer, reserved=True) for layer in self.layers)

    def aux_bytes(self) -> int:
        """Bytes of per-token bookkeeping (positions, padding flags, shifts, method state)."""
        return sum(layer.aux_nbytes() for layer in self.sieve_layers())

    # --- checkpoints: several questions over one compressed context ---------------------------------------------
    def checkpoint(self) -> Any:
        """A mark to :meth:`restore` to: the cache as it is now (e.g. right after compressing a context).

        Cheap for plain storage (token counts and the small per-token state are recorded); packed storage (quantised,
        merged) and sliding-window layers are copied.
        """
        marks = []
        for layer in self.layers:
            if isinstance(layer, SieveLayer):
                segs = [
                    (s.length, {k: v.clone() for k, v in s.state.items()})
                    if not isinstance(s, PackedSegment)
                    else copy.deepcopy(s)
                    for s in layer.segments
                ]
                marks.append(
                    ("sieve", (layer.seen, layer._real_seen), layer.evictions, segs, copy.deepcopy(layer.layer_state))
                )
            else:
                marks.append(("other", copy.deepcopy(layer)))
        return (id(self), marks, copy.deepcopy(self.shared))

    def restore(self, mark: Any) -> None:
        """Return to the state of ``checkpoint()``; only tokens appended since (with no eviction) may be dropped."""
        owner, marks, shared = mark
        if owner != id(self):
            raise KVSieveError("this checkpoint was taken of another cache")
        for i, entry in enumerate(marks):
            if entry[0] == "other":
                self.layers[i] = copy.deepcopy(entry[1])
                continue
            _, seen, evictions, segs, layer_state = entry
            layer = self.layers[i]
            if layer.evictions != evictions or len(segs) != len(layer.segments):
                raise KVSieveError(
                    "the cache evicted tokens after the checkpoint, so it cannot be restored; append the questions "
                    "inside `with cache.paused():`"
                )
            for j, saved in enumerate(segs):
                if isinstance(saved, PackedSegment):
                    layer.segments[j] = copy.deepcopy(saved)
                else:
                    length, state = saved
                    layer.segments[j].truncate(length)
                    layer.segments[j].state = {k: v.clone() for k, v in state.items()}
            (layer.seen, layer._real_seen), layer.layer_state = seen, copy.deepcopy(layer_state)
            layer._new, layer.n_new = None, 0
        self.shared = copy.deepcopy(shared)
