"""Cache layers that hold only the tokens a method keeps.

A :class:`SieveLayer` is a transformers ``CacheLayerMixin``: the model's attention module calls ``update`` as with any
cache, and the kvsieve attention function (``attention.py``) later reads the layer, computes attention, and asks the
method which tokens to keep. Storage is a list of :class:`Segment` objects:

* one segment covering every KV head while all heads hold the same number of tokens (the usual case), stored as one
  ``(batch, kv_heads, tokens, head_dim)`` tensor pair like ``DynamicLayer``;
* one segment per KV head once a head-wise policy gives heads different budgets, so a head that keeps 40 tokens
  holds tensors of 40 tokens. Nothing is padded or masked out: the bytes held are the bytes kept.

Beside the keys and values every segment holds, per token, the token's original position, whether it is a real token
or left padding, and any per-token state of the method (e.g. accumulated attention); eviction gathers all of them
together, so they never fall out of step.

Sliding-window layers (Gemma 3) keep transformers' own ``DynamicSlidingWindowLayer``: they already hold at most a
window of tokens, and methods compress only full-attention layers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    get_layer_types_and_kwargs,
)

from . import rope
from .errors import UnsupportedModelError


@dataclass
class Segment:
    """Tokens held for a contiguous range of KV heads, all with the same number of tokens.

    Shapes: keys/values ``(B, h, T, D)``; positions ``(B, h, T)`` int64; valid ``(B, h, T)`` bool or None (all real);
    every tensor in ``state`` is ``(B, h, T)``.
    """

    head_start: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Re-rotating layers: the position each key was rotated at when it arrived, ``(B, h, T)``; None otherwise.
    rope_positions: torch.Tensor | None = None

    @property
    def n_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def heads(self) -> slice:
        return slice(self.head_start, self.head_start + self.n_heads)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense keys and values for attention. Storage subclasses (quantized, shared) reconstruct them here."""
        return self.keys, self.values

    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        rope_positions: torch.Tensor | None = None,
    ):
        """Append new tokens. ``positions``/``valid``/``rope_positions`` are ``(B, h, q)``; new state starts at 0."""
        n_old = self.length
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        self.positions = torch.cat([self.positions, positions], dim=2)
        if rope_positions is not None:
            old = self.rope_positions if self.rope_positions is not None else rope_positions[..., :0]
            self.rope_positions = torch.cat([old, rope_positions], dim=2)
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else _all_true(self.positions[..., :n_old])
            new = valid if valid is not None else _all_true(positions)
            self.valid = torch.cat([old, new], dim=2)
        for name, tensor in self.state.items():
            pad = tensor.new_zeros((*tensor.shape[:2], positions.shape[2]))
            self.state[name] = torch.cat([tensor, pad], dim=2)

    def gather(self, index: torch.Tensor) -> None:
        """Keep only the tokens at ``index`` ``(B, h, k)`` (sorted, so order is preserved); frees the rest."""
        index = index.sort(dim=-1).values
        d = self.keys.shape[-1]
        kv_index = index[..., None].expand(-1, -1, -1, d)
        self.keys = self.keys.gather(2, kv_index)
        self.values = self.values.gather(2, kv_index)
        self.positions = self.positions.gather(2, index)
        if self.rope_positions is not None:
            self.rope_positions = self.rope_positions.gather(2, index)
        if self.valid is not None:
            self.valid = self.valid.gather(2, index)
            if bool(self.valid.all()):
                self.valid = None
        self.state = {name: t.gather(2, index) for name, t in self.state.items()}

    def split_heads(self) -> list[Segment]:
        """One segment per head (copies, so each head's storage can shrink on its own)."""
        out = []
        for h in range(self.n_heads):
            sl = slice(h, h + 1)
            out.append(
                Segment(
                    head_start=self.head_start + h,
                    keys=self.keys[:, sl].clone(),
                    values=self.values[:, sl].clone(),
                    positions=self.positions[:, sl].clone(),
                    valid=None if self.valid is None else self.valid[:, sl].clone(),
                    state={k: v[:, sl].clone() for k, v in self.state.items()},
                    rope_positions=None if self.rope_positions is None else self.rope_positions[:, sl].clone(),
                )
            )
        return out

    def nbytes(self) -> int:
        """Bytes of the key and value tensors held."""
        return self.keys.nelement() * self.keys.element_size() + self.values.nelement() * self.values.element_size()

    def aux_nbytes(self) -> int:
        """Bytes of the per-token bookkeeping (positions, padding, method state)."""
        tensors = [self.positions, *self.state.values()]
        tensors += [t for t in (self.valid, self.rope_positions) if t is not None]
        return sum(t.nelement() * t.element_size() for t in tensors)


def _all_true(like: torch.Tensor) -> torch.Tensor:
    return torch.ones(like.shape, dtype=torch.bool, device=like.device)


class SieveLayer(CacheLayerMixin):
    """A full-attention cache layer that holds only kept tokens (see the module docstring).

    ``rerotate=True`` serves keys rotated to their positions within the cache (0..T-1), as StreamingLLM does; new
    tokens then take position T. Keys are stored exactly as they arrived, with the position they were rotated at,
    and rotated at read time by (position in cache - arrival position): one rotation from the pristine key, so no
    error accumulates over a long stream, and a key that never moved is read bit for bit as the model made it.
    Otherwise keys keep their original positions.
    """

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
        self.method_state: dict = {}  # per-layer method state that is not per token
        self.seen = 0  # tokens ever added, real or padding
        self.n_new = 0  # tokens added by the last update, waiting for their positions
        self._new: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- CacheLayerMixin interface -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.n_kv_heads = key_states.shape[1]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage the new tokens; ``commit`` adds them once the attention function knows their positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._new is not None:
            raise RuntimeError(
                "kvsieve cache updated twice without attention in between: run the model inside "
                "`with sieve.attach(model)` so the kvsieve attention function reads the cache."
            )
        self._new = (key_states, value_states)
        self.n_new = key_states.shape[2]
        self.seen += self.n_new
        # The kvsieve attention function reads the layer directly; these are returned only to honour the interface.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        """Position of the next token: tokens seen (original positions) or tokens held (positions in the cache)."""
        return self.length if self.rerotate else self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.segments, self.seen, self.n_new, self._new = [], 0, 0, None
        self.method_state = {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for seg in self.segments:
            seg.keys, seg.values = seg.keys[beam_idx], seg.values[beam_idx]
            seg.positions = seg.positions[beam_idx]
            seg.valid = None if seg.valid is None else seg.valid[beam_idx]
            seg.state = {k: v[beam_idx] for k, v in seg.state.items()}

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed kvsieve cache cannot be cropped: evicted tokens are gone")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvsieve caches do not support beam search or num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("kvsieve caches do not support beam search or num_return_sequences > 1")

    # --- kvsieve interface ---------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens held (the longest head where heads differ), plus staged new tokens."""
        held = max((s.length for s in self.segments), default=0)
        return held + (self.n_new if self._new is not None else 0)

    @property
    def is_ragged(self) -> bool:
        return len(self.segments) > 1

    def commit(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Add the staged tokens, given the model's position ids ``(B, q)`` and padding flags ``valid`` ``(B, q)``."""
        if self._new is None:
            raise RuntimeError("no staged tokens to commit")
        keys, values = self._new
        self._new = None
        b, h, q, _ = keys.shape
        positions = positions.to(keys.device).expand(b, q)
        rope_pos = None
        if self.rerotate:
            # Keys arrived rotated at their position in the cache (the model's position ids); rank tokens by their
            # position in the whole stream, which recency and sink rules use.
            rope_pos = positions[:, None, :].expand(b, h, q).contiguous()
            positions = torch.arange(self.seen - q, self.seen, device=keys.device)[None, :].expand(b, q)
        pos = positions[:, None, :].expand(b, h, q).contiguous()
        val = None if valid is None else valid.to(keys.device)[:, None, :].expand(b, h, q).contiguous()
        if not self.segments:
            empty = keys[:, :, :0]
            self.segments = [Segment(0, empty, values[:, :, :0], pos[:, :, :0], None)]
        for seg in self.segments:
            hs = seg.heads
            seg.append(
                keys[:, hs], values[:, hs], pos[:, hs], None if val is None else val[:, hs],
                None if rope_pos is None else rope_pos[:, hs],
            )
        self.n_new = 0

    def attention_kv(self, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as attention must see them: dense, keys rotated to in-cache positions if re-rotating."""
        keys, values = seg.read()
        if self.rerotate:
            shift = torch.arange(seg.length, device=keys.device) - seg.rope_positions
            if bool(shift.any()):
                keys = rope.rotate(keys, shift, self.inv_freq)
        return keys, values

    def keep(self, indices: list[torch.Tensor]) -> None:
        """Keep the tokens at ``indices``, one ``(B, h_s, k)`` tensor per segment, or one ``(B, 1, k_h)`` per head.

        Passing per-head indices of different lengths to a uniform layer splits it into per-head segments.
        """
        if len(indices) != len(self.segments):
            if len(self.segments) != 1 or len(indices) != self.segments[0].n_heads:
                raise ValueError(f"expected {len(self.segments)} index tensors, got {len(indices)}")
            lengths = {int(i.shape[-1]) for i in indices}
            if len(lengths) == 1:
                indices = [torch.cat(indices, dim=1)]
            else:
                self.segments = self.segments[0].split_heads()
        for seg, idx in zip(self.segments, indices, strict=True):
            seg.gather(idx)

    def tokens_per_head(self) -> list[int]:
        return [s.length for s in self.segments for _ in range(s.n_heads)]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)

    def aux_nbytes(self) -> int:
        return sum(s.aux_nbytes() for s in self.segments)


_last_update = threading.local()


def take_last_update() -> tuple[SieveCache, int] | None:
    """The (cache, layer index) a model's attention module updated just before calling attention, once.

    transformers does not hand the cache to the attention function, so ``SieveCache.update`` leaves it here and the
    kvsieve attention function takes it; a forward pass that never touched a kvsieve cache finds nothing.
    """
    taken = getattr(_last_update, "value", None)
    _last_update.value = None
    return taken


def _layer_nbytes(layer: CacheLayerMixin) -> int:
    if isinstance(layer, SieveLayer):
        return layer.nbytes()
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

    Create it with ``Sieve.attach(model)`` (or ``sieve.new_cache()`` inside that context) and pass it as
    ``past_key_values`` to ``model(...)`` or ``model.generate(...)``.
    """

    def __init__(self, config, rerotate: bool = False, inv_freq: torch.Tensor | None = None):
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers: list[CacheLayerMixin] = []
        for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(SieveLayer(rerotate=rerotate, inv_freq=inv_freq))
            elif kind in ("sliding_attention", "chunked_attention"):
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
            else:
                raise UnsupportedModelError(
                    f"layer {i} is a {kind!r} layer; kvsieve caches support full-attention and sliding-window "
                    "layers only. Use a decoder-only attention model (Llama, Mistral, Qwen2/3, Gemma 3)."
                )
        super().__init__(layers=layers)
        self.compressing = True
        self.shared: dict = {}  # method state shared across layers, for this cache only

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
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

    def sieve_layers(self) -> list[SieveLayer]:
        return [layer for layer in self.layers if isinstance(layer, SieveLayer)]

    def kv_tokens(self) -> list[int | list[int]]:
        """Tokens held per layer: an int, or a list per KV head where heads differ."""
        return [_layer_tokens(layer) for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes of all key and value tensors the cache holds."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    def aux_bytes(self) -> int:
        """Bytes of per-token bookkeeping (positions, padding flags, method state)."""
        return sum(layer.aux_nbytes() for layer in self.sieve_layers())
