"""Methods that need the model itself after the prefill (``kvzip``: the model repeats the context).

The core extension is one optional method hook, ``after_prefill(model, cache, input_ids, tokenizer)``, flagged by the
class attribute ``post_prefill = True``. :func:`kvsieve.prefill` (used by :func:`kvsieve.generate` and the bench)
prefills such a method's prompt *without eviction*, then calls the hook, which scores the held tokens (extra forward
passes on the same cache, rolled back with ``cache.checkpoint()``/``restore``) and compresses every layer once with
:func:`compress_held` — the pipeline's own ``decide`` / ``apply`` / ``pack``, as the shared-prefill replay uses them.
Such methods are not shareable (:func:`kvsieve.snapshot.shareable`): their scores come from passes a snapshot does not
run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import KVSieveError
from .methods.base import LayerContext, Method


def post_prefill_method(method: Method | None) -> Method | None:
    """The method of ``method``'s wrapper chain that runs after the prefill (``post_prefill``), if any."""
    while method is not None:
        if getattr(type(method), "post_prefill", False):
            return method
        method = getattr(method, "inner", None)
    return None


def will_evict(method: Method, cache, input_ids: torch.Tensor) -> bool:
    """Whether a post-prefill method's extra passes are needed: False when the budget keeps the whole prompt (e.g.
    compression 0); KVSieveError for a batch of more than one sequence (its scores are per sequence)."""
    if input_ids.shape[0] != 1:
        raise KVSieveError(f"{method.name} scores one sequence at a time; run the prompts one at a time")
    n = input_ids.shape[1]
    target = cache.session.budget.keep_target(n, n)
    return target is not None and target < n


def compress_held(model: torch.nn.Module, cache, method: Method) -> None:
    """Compress every full-attention layer of ``cache`` once to the session's budget (after a paused prefill)."""
    from .cache import SieveLayer
    from .pipeline import apply, decide, observation, pack_layer

    session = cache.session
    text = model.config.get_text_config()
    group = text.num_attention_heads // text.num_key_value_heads
    scaling = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            scaling[int(module.layer_idx)] = float(module.scaling)
    for idx, layer in enumerate(cache.layers):
        if not isinstance(layer, SieveLayer):
            continue
        ctx = LayerContext(idx, session.n_layers, layer.seen, layer.seen, layer.layer_state, cache.shared)
        if session.evicts:
            targets = [method.layer_budget(session.budget.keep_target(s, layer.seen), ctx) for s in layer.real_seen()]
            if len(layer.segments) == 1 and session.budget.due(layer.segments[0].length, min(targets), layer.seen):
                seg = layer.segments[0]
                with layer.attention_view(seg) as (keys, values):
                    b, h, _, d = keys.shape
                    queries = keys.new_zeros(b, h * group, 0, d)  # no queries: the scores are in the state
                    obs = observation(ctx, seg, keys, values, queries, scaling.get(idx, d**-0.5), max(targets), None)
                    eviction = decide(method, [obs], targets, ctx)
                apply(layer, eviction, ordered=True)
        pack_layer(method, layer, ctx)


def repeat_prompts(
    context: torch.Tensor, chunk: int, tokenizer, first: str, later: str, overlap: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, ids)`` per context chunk: the repeat instruction, the chat template's assistant header and the chunk
    (KVzip's prompts; a later chunk quotes the last ``overlap`` tokens of the previous one)."""
    if tokenizer is None:
        raise KVSieveError(
            "this method prompts the model to repeat the context and needs the tokenizer: pass "
            "kvsieve.prefill(..., tokenizer=tok)"
        )
    suffix = _ids(tokenizer, _assistant_header(tokenizer), context.device)
    n = context.shape[0]
    for start in range(0, n, chunk):
        part = context[start : start + chunk]
        if start == 0:
            head = _ids(tokenizer, first, context.device)
        else:
            head = torch.cat([_ids(tokenizer, later, context.device), context[max(0, start - overlap) : start]])
        yield start, torch.cat([head, suffix, part])


def _ids(tokenizer, text: str, device) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.long, device=device)


def _assistant_header(tokenizer) -> str:
    """What the chat template puts between a user message and the assistant's answer ("\\n" without a template)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": dummy + separator}], add_generation_prompt=True, tokenize=False
    )
    return text.split(separator)[-1]
