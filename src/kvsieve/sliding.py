"""Attention of transformers' own sliding-window layers (Gemma 3) inside kvsieve, and the tokens of one image that
attend to each other in both directions (Gemma 3's multimodal model).

Sliding-window layers keep transformers' ``DynamicSlidingWindowLayer`` (it holds the last ``window - 1`` tokens;
cache methods compress only full-attention layers). Their attention is masked as transformers masks it: causal, or
within one image (Gemma 3: the image tokens of one image see each other, transformers' ``blockwise_overlay`` of
``token_type_ids``), and within the window of the query. The full-attention layers get the same image rule
(:func:`kvsieve.attention.with_groups`). kvsieve finds the images from the prompt's image tokens (the pass's tags,
one image per run of image tokens, as Gemma 3's processor marks them in ``token_type_ids``), not from
``token_type_ids`` itself, so the rule follows the rows that pruning keeps; a pass given as ``inputs_embeds`` has no
tags and stays causal.

Positions. Until a pass of the cache drops rows (:mod:`kvsieve.sequence`) a layer's tokens sit at consecutive stream
positions, counted as transformers counts them. Once rows were dropped, the kept tokens keep their original positions
(as in the full-attention layers), so the window is measured in original positions: from the first pruned pass on,
the stream positions of the tokens each sliding layer holds are tracked in ``cache.shared`` (mirroring the layer's
``window - 1`` most recent tokens), and the queries' positions are the ``position_ids`` the layer receives
(``generate`` gives the original positions, and so does a direct call without them: the cache's
``get_seq_length()`` counts the tokens pruned before the LLM).

Simplifications: what methods *read* stays causal and windowless. Cache methods' attention statistics
(:func:`kvsieve.attention.column_sums`) and in-LLM rankings (:func:`kvsieve.sequence.received_attention`) do not let
an image's tokens see the later tokens of their image, and rankings at a sliding-window layer ignore its window; the
attention the model computes follows both. Prefill methods other than ``dense`` compute causal attention, so they are
refused for passes with image tokens on such models.
"""

from __future__ import annotations

import torch

from . import attention as attn
from .errors import KVSieveError, UnsupportedModelError
from .sequence import MODALITY, PASS

WINDOW_POSITIONS = "sliding_positions"  # cache.shared: layer -> (B, held) stream positions, once a pass was pruned
BIDIRECTIONAL_IMAGES = ("gemma3",)  # VLMs whose image tokens attend to each other within an image (model_type)


def image_groups(cache, q: int) -> torch.Tensor | None:
    """The image of each of the pass's ``q`` rows still on, ``(B, q)`` (-1: not an image token), or None when the
    pass has no image token (then attention is plainly causal)."""
    state = cache.pass_state.get(PASS) if cache is not None else None
    if state is None or q <= 1 or state.tokens.segment.shape[1] != q:
        return None
    image = state.tokens.modality == MODALITY["image"]
    if not bool(image.any()):
        return None
    return torch.where(image, state.tokens.segment, torch.full_like(state.tokens.segment, -1))


def window_positions(cache, layer_idx: int, position_ids, b: int, q: int, k: int, seen: int, window, device):
    """Stream positions of a sliding layer's ``q`` queries and ``k`` keys (the new tokens last): ``(q,)``/``(k,)``
    counted from the tokens it has seen, or ``(B, q)``/``(B, k)`` tracked once a pass dropped rows (see the module
    docstring)."""
    tracked = cache.shared.get(WINDOW_POSITIONS, {})
    state = cache.pass_state.get(PASS)
    pruned = state is not None and state.rows.shape[1] < state.n and state.rows.shape[1] == q
    if layer_idx not in tracked and not pruned:
        return torch.arange(seen - q, seen, device=device), torch.arange(seen - k, seen, device=device)
    tracked = cache.shared.setdefault(WINDOW_POSITIONS, tracked)
    if not isinstance(position_ids, torch.Tensor):
        raise UnsupportedModelError("a sliding-window layer after token pruning needs the tokens' position_ids")
    new = position_ids.to(device).reshape(-1, q).expand(b, q)
    held = tracked.get(layer_idx)
    if held is None:  # the first pruned pass: what the layer holds came at consecutive positions
        held = torch.arange(seen - k, seen - q, device=device).expand(b, k - q)
    elif held.shape[1] and bool((new[:, :1] <= held[:, -1:].to(device)).any()):
        raise KVSieveError(
            "after a pass that pruned tokens the next tokens must come at their original positions (past the pruned "
            "prompt); pass position_ids (model.generate does), not positions counted from the kept tokens"
        )
    every = torch.cat([held.to(device), new], dim=1)
    if every.shape[1] < k:
        raise UnsupportedModelError("kvsieve lost track of a sliding-window layer's positions; use a new cache")
    tracked[layer_idx] = every[:, -(window - 1) :] if window else every
    return new, every[:, -k:]


def attend_window(module, cache, layer, query, key, value, mask2d, scaling, dropout, kwargs, together):
    """Attention for transformers' own sliding-window layers, masked as transformers would mask them; ``together``:
    :func:`image_groups` of the pass's rows, or None."""
    q, k = query.shape[2], key.shape[2]
    seen = layer.cumulative_length
    window = kwargs.get("sliding_window")
    q_pos, k_pos = window_positions(cache, module.layer_idx, kwargs.get("position_ids"), query.shape[0], q, k, seen,
                                    window, query.device)  # fmt: skip
    k_valid = None
    if mask2d is not None and not bool(mask2d.all()):
        if mask2d.shape[-1] < seen:
            raise UnsupportedModelError("with padding, pass the attention mask for every token seen so far")
        k_valid = mask2d[:, seen - k : seen].bool()
    plain = k_valid is None and together is None and q_pos.dim() == 1 and (window is None or k < window)
    plain = plain and (q == 1 or k == q)
    allowed = None if plain else attn.sliding_allowed(q_pos, k_pos, window, k_valid, together)
    return attn.sdpa_output(module, query, key, value, allowed, scaling, dropout)
