"""The sequence action point: drop tokens' hidden states between decoder layers during a prefill pass.

At the sequence method's layer ``K`` (a :class:`~kvsieve.methods.base.SequenceMethod`), in a pass of more than one
new token, the core computes the statistics the method asks for (FastV: the last query's attention), the method
scores the pass's tokens, and the top share is kept (the last token always). The decision is stored in the cache's
``pass_state``; forward pre-hooks on the decoder layers after ``K`` then select those rows of the hidden states and
of the per-token arguments (position ids and rotary embeddings), so layers ``K+1 ..`` compute on the kept tokens
only, and their cache layers hold only those, at their original positions. The model's output then has one row
per kept token (the last row is the last token's, so ``logits_to_keep=1`` and ``generate`` work unchanged).

The hooks are registered with ``register_forward_pre_hook`` when the ``attach`` block starts and removed when it
ends; a pass without a decision (decoding, or ``keep=1``) passes through untouched, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attention as attn
from .errors import KVSieveError, UnsupportedModelError
from .methods.base import Observation, SequenceMethod

PRUNE = "sequence_prune"


@dataclass
class Pruning:
    """Rows ``index`` ``(B, k)`` (positions within the pass's ``n`` tokens) go on past decoder layer ``after``."""

    after: int
    index: torch.Tensor
    n: int


def check_sequence(sieve, model: torch.nn.Module, sliding: bool) -> None:
    """Refuse, before any work, what the sequence action point cannot keep consistent."""
    seq: SequenceMethod = sieve.sequence
    n_layers = model.config.get_text_config().num_hidden_layers
    if seq.layer >= n_layers - 1:
        raise KVSieveError(
            f"{seq.name}: layer {seq.layer} leaves no decoder layer to prune (the model has {n_layers} layers, "
            f"0..{n_layers - 1}); use a layer below {n_layers - 1}"
        )
    if sliding:
        raise UnsupportedModelError(
            f"{seq.name} prunes tokens between layers, which transformers' sliding-window layers (this model has "
            "some) cannot follow; use a model with full attention in every layer"
        )
    if sieve.method.rerotate:
        raise KVSieveError(
            f"{seq.name} leaves gaps in the token positions, which {sieve.method.name}'s re-indexing cannot follow; "
            "use a method that keeps original positions, e.g. streaming_llm(rerotate=False)"
        )
    if not decoder_layers(model):
        raise UnsupportedModelError(f"found no decoder layers in {type(model).__name__} to prune between")


def decoder_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, decoder layer module)`` for every decoder layer (a module whose ``self_attn`` has one)."""
    out = []
    for module in model.modules():
        attn_module = getattr(module, "self_attn", None)
        if attn_module is not None and hasattr(attn_module, "layer_idx"):
            out.append((attn_module.layer_idx, module))
    return out


def install_hooks(model: torch.nn.Module) -> list:
    """Forward pre-hooks that apply a pruning decision to every decoder layer after the deciding one."""
    handles = []
    for layer_idx, module in decoder_layers(model):
        handles.append(module.register_forward_pre_hook(_pre_hook(layer_idx), with_kwargs=True))
    return handles


def _pre_hook(layer_idx: int):
    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state = getattr(cache, "pass_state", None)
        if state is None:
            return None
        if layer_idx == 0:
            state.pop(PRUNE, None)  # a new forward pass
            return None
        pruning: Pruning | None = state.get(PRUNE)
        if pruning is None or layer_idx <= pruning.after:
            return None
        args, kwargs = list(args), dict(kwargs)
        if args:
            args[0] = _rows(args[0], pruning)
        elif "hidden_states" in kwargs:
            kwargs["hidden_states"] = _rows(kwargs["hidden_states"], pruning)
        for name in ("position_ids", "cache_position"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = _rows(kwargs[name], pruning)
        emb = kwargs.get("position_embeddings")
        if isinstance(emb, tuple):
            kwargs["position_embeddings"] = tuple(_rows(t, pruning) for t in emb)
        if isinstance(kwargs.get("attention_mask"), torch.Tensor):
            raise UnsupportedModelError("token pruning runs without an attention mask (no padding); got a mask")
        return tuple(args), kwargs

    return hook


def _rows(t: torch.Tensor, pruning: Pruning) -> torch.Tensor:
    """The kept rows of a per-token tensor: ``(B, n, ...)`` or ``(n,)`` (``cache_position``); others unchanged."""
    if t.dim() == 1 and t.shape[0] == pruning.n:
        return t[pruning.index[0]]
    if t.dim() >= 2 and t.shape[1] == pruning.n:
        index = pruning.index.to(t.device)
        if t.shape[0] != index.shape[0]:
            if t.shape[0] != 1:
                raise UnsupportedModelError("per-token tensor and pruning batch sizes differ")
            return t[:, index[0]]
        return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
    return t


def decide_pruning(seq: SequenceMethod, cache, pieces: list[tuple], scaling: float, q: int) -> None:
    """At the method's layer: score the pass's ``q`` new tokens and record which go on.

    ``pieces``: per storage segment, ``(queries (B, h*g, q, D), keys (B, h, T, D), positions (B, h, T), valid)`` as
    attention saw them (the new tokens in the last ``q`` slots).
    """
    if seq.n_keep(q) >= q:
        return
    if any(valid is not None for *_, valid in pieces):
        raise KVSieveError(f"{seq.name} cannot prune a padded batch; run the prompts without padding")
    request = seq.attention_request()
    stats = [attn.column_sums(q_seg, keys, scaling, None, request)[..., -q:] for q_seg, keys, _, _ in pieces]
    queries = torch.cat([p[0] for p in pieces], dim=1)
    _, keys, positions, _ = pieces[0]
    obs = Observation(
        layer_idx=seq.layer, n_layers=0, keys=keys[..., -q:, :], values=keys[..., -q:, :], queries=queries,
        positions=positions[..., -q:], valid=None, attention=torch.cat(stats, dim=1), state={}, n_new=q,
        scaling=scaling, budget=seq.n_keep(q),
    )  # fmt: skip
    cache.pass_state[PRUNE] = Pruning(seq.layer, seq.select(seq.score(obs)), q)
