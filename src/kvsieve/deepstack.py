"""Qwen3-VL's DeepStack under token pruning: the vision features added after the first decoder layers follow the
kept rows.

Besides the merged image tokens the LLM receives, Qwen3-VL's vision tower gives one more feature per image token
from each of its ``deepstack_visual_indexes`` encoder layers (through its ``deepstack_merger_list``), and its text
model adds feature ``i`` to the image (and video) tokens' hidden states right after decoder layer ``i``:
``Qwen3VLTextModel._deepstack_process(hidden_states, visual_pos_masks, visual_embeds)``, with the mask ``(B, n)`` of
the whole prompt's visual positions and one feature row per ``True`` of it (row-major). Once kvsieve has dropped rows
(before the LLM, or after a decoder layer below the last DeepStack layer) the hidden states hold only the kept rows,
which that mask no longer matches.

How, without patching transformers' classes: ``attach`` sets ``_deepstack_process`` on the model's text-model
*instance* to a function that, when the hidden states have fewer rows than the mask, restricts mask and features to
the pass's kept rows (each kept visual token gets the feature of its own original position) and hands them to the
model's own function, which adds them as always. The instance attribute is removed when the block ends (the class's
method shows again). A pass that dropped nothing reaches the model's function with its own arguments, bit for bit.

Simplification: a pre-LLM method that writes merged features into kept rows (VisionZip's contextual tokens,
VFlowOpt's recycled tokens) replaces the main merger's output only; the DeepStack features of such a row stay those
of the token at its position (the merge weights are not known here, and the DeepStack mergers are not re-run).
"""

from __future__ import annotations

import torch

from .errors import UnsupportedModelError
from .sequence import PASS, PassState


def kept_features(mask: torch.Tensor, embeds: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The DeepStack mask ``(B, k)`` and features ``(V', D)`` of the kept rows ``rows`` ``(B, k)`` (sorted pass rows),
    from the prompt's mask ``(B, n)`` and features ``(V, D)`` (one per ``True`` of the mask, row-major)."""
    rows = rows.to(mask.device)
    feature_row = mask.flatten().long().cumsum(0).sub(1).view(mask.shape)  # each visual position's feature row
    kept = mask.gather(1, rows)
    return kept, embeds[feature_row.gather(1, rows)[kept].to(embeds.device)]


def _pass_state(current: dict) -> PassState | None:
    cache = current.get("cache")
    return cache.pass_state.get(PASS) if cache is not None else None


def install_deepstack(model: torch.nn.Module, current: dict) -> list:
    """Override ``_deepstack_process`` on ``model``'s text-model instance (see the module docstring); returns the
    handle that removes the override. ``current``: the sequence hooks' holder of the cache of the pass in progress."""
    from .vision import _InstanceAttribute

    text = model.model.language_model
    if not hasattr(text, "_deepstack_process"):
        raise UnsupportedModelError(
            f"{type(text).__name__} has no _deepstack_process; kvsieve supports Qwen3-VL as transformers 5 builds it"
        )
    handle = _InstanceAttribute(text, "_deepstack_process")
    original = text._deepstack_process  # the class's method, or an enclosing attach block's override

    def deepstack_process(hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        if visual_pos_masks is not None and hidden_states.shape[1] != visual_pos_masks.shape[1]:
            state = _pass_state(current)
            if (
                state is None
                or tuple(state.rows.shape) != tuple(hidden_states.shape[:2])
                or visual_pos_masks.shape != (state.rows.shape[0], state.n)
            ):
                raise UnsupportedModelError(
                    f"Qwen3-VL's DeepStack features cover {tuple(visual_pos_masks.shape)} tokens but the decoder holds "
                    f"{tuple(hidden_states.shape[:2])}, and kvsieve has no record of the rows it kept for them"
                )
            visual_pos_masks, visual_embeds = kept_features(visual_pos_masks, visual_embeds, state.rows)
        return original(hidden_states, visual_pos_masks, visual_embeds)

    text._deepstack_process = deepstack_process
    return [handle]
