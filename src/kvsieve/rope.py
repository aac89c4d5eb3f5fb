"""Rotary position helpers for methods that keep keys at positions *within the cache* (StreamingLLM).

transformers rotates keys before they reach the cache. A layer that re-indexes positions keeps each key as it
arrived and, when attention reads it, rotates it by (its position in the cache - the position it was rotated at):
RoPE is a rotation, so R(a) R(b) = R(a + b). Rotating once from the pristine key at every read, rather than
rotating stored keys again at each eviction, accumulates no error over a long stream.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UnsupportedModelError


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply RoPE (transformers' half-split convention) at ``positions``.

    keys: (..., T, D); positions: broadcastable to (..., T); inv_freq: (D/2,). Computed in fp32, returned in
    the keys' dtype.
    """
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(keys.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    k = keys.to(torch.float32)
    out = k * emb.cos() + _rotate_half(k) * emb.sin()
    return out.to(keys.dtype)


def find_inv_freq(model: nn.Module, layer_type: str = "full_attention") -> torch.Tensor:
    """The inverse frequencies the model's rotary embedding uses for ``layer_type`` layers.

    Raises UnsupportedModelError where re-rotation would be wrong: no rotary embedding, or a RoPE variant that also
    rescales (YaRN, LongRoPE), whose keys are not a pure rotation of the un-rotated key.
    """
    rotary = None
    for module in model.modules():
        if hasattr(module, "inv_freq") or hasattr(module, f"{layer_type}_inv_freq"):
            rotary = module
            break
    if rotary is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary embedding, so keys cannot be re-rotated to positions within the "
            "cache. Use a method that keeps original positions (e.g. streaming_llm(rerotate=False))."
        )
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
    scaling = getattr(rotary, f"{layer_type}_attention_scaling", None)
    if inv_freq is None:
        inv_freq = rotary.inv_freq
        scaling = getattr(rotary, "attention_scaling", 1.0)
    if scaling is not None and abs(float(scaling) - 1.0) > 1e-6:
        raise UnsupportedModelError(
            f"this model's RoPE scales attention by {scaling}; re-rotating its keys is not exact. "
            "Use a method that keeps original positions (e.g. streaming_llm(rerotate=False))."
        )
    return inv_freq.detach().clone()
