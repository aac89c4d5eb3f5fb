"""The user-facing context: ``Sieve(method, budget).attach(model)`` yields a cache that compresses as the model runs.

Data flows one way, per layer and forward pass (``Session.attend``):
model's q/k/v -> cache layer (``commit``) -> attention output (sdpa) and the statistics the method asked for
-> ``method.observe`` / ``method.score`` -> ``method.select`` (the policy, given the budget) -> ``layer.keep``.

Nothing in transformers is patched. Entering the context registers the ``kvsieve`` attention and mask functions
through ``AttentionInterface`` / ``AttentionMaskInterface`` and switches the model to them with
``set_attn_implementation``; leaving it restores the model's implementation and removes the registrations.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import attention as attn
from .cache import SieveCache, SieveLayer, take_last_update
from .errors import BudgetError, ContextLengthError, KVSieveError, UnsupportedModelError
from .methods import Method, build
from .methods.base import Observation
from .rope import find_inv_freq

# Architectures whose attention goes through AttentionInterface and that the test suite covers.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

_ACTIVE: ContextVar[Session | None] = ContextVar("kvsieve_session", default=None)
_registration_lock = threading.Lock()
_registrations = 0


@dataclass(frozen=True)
class Budget:
    """How much of the KV cache to keep, per layer and head.

    ``compression``: the fraction of tokens removed (as kvpress), in [0, 1); a layer that has seen ``n`` tokens
    holds ``int(n * (1 - compression))`` of them, during prefill and decoding alike, so 0 keeps everything.
    ``tokens``: an absolute cap; the layer never holds more than this many tokens after a forward pass (streaming).
    """

    compression: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.compression is None) == (self.tokens is None):
            raise BudgetError("give exactly one of compression (a fraction in [0, 1)) or budget (a token count)")
        if self.compression is not None and not (0.0 <= float(self.compression) < 1.0):
            raise BudgetError(
                f"compression {self.compression} is outside [0, 1): it is the fraction of tokens removed, "
                "e.g. 0.5 keeps half; use budget=N for an absolute number of tokens."
            )
        if self.tokens is not None and (isinstance(self.tokens, bool) or int(self.tokens) != self.tokens):
            raise BudgetError(f"budget must be a whole number of tokens, got {self.tokens!r}")
        if self.tokens is not None and self.tokens < 1:
            raise BudgetError(f"budget must be at least 1 token, got {self.tokens}")

    def target(self, seen: int) -> int:
        """Tokens per head a layer that has seen ``seen`` tokens may hold."""
        if self.tokens is not None:
            return int(self.tokens)
        return max(1, int(seen * (1.0 - float(self.compression))))

    def __str__(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"compression {self.compression:g}"


class Sieve:
    """A method and a budget, ready to attach to a model.

    >>> sieve = Sieve("snapkv", compression=0.5)
    >>> with sieve.attach(model) as cache:
    ...     out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    """

    def __init__(self, method: str | Method = "full", *, compression: float | None = None, budget: int | None = None):
        self.method = build(method) if isinstance(method, str) else method
        if not self.method.evicts and self.method.selects:
            given = (compression, budget) != (None, None)
            self.budget = Budget(compression=compression, tokens=budget) if given else None
        elif not self.method.evicts:
            if budget is not None or (compression or 0.0) > 0.0:
                raise BudgetError(
                    f"{self.method.name} keeps every token, so a budget or compression > 0 would be ignored; "
                    "drop --budget/--compression or choose an evicting method."
                )
            if compression is not None and not (0.0 <= compression < 1.0):
                raise BudgetError(f"compression {compression} is outside [0, 1)")
            self.budget = None
        else:
            if compression is None and budget is None:
                raise BudgetError(
                    f"{self.method.name} needs a budget: pass compression=R (fraction removed) or budget=N"
                )
            self.budget = Budget(compression=compression, tokens=budget)
            if self.budget.tokens is not None:
                self.method.check_budget(self.budget.tokens)

    def __repr__(self) -> str:
        return f"Sieve({self.method.spec()!r}, {self.budget or 'no budget'})"

    @contextmanager
    def attach(self, model: torch.nn.Module) -> Iterator[SieveCache]:
        """Route ``model``'s attention through kvsieve for the duration of the block; yields a fresh cache."""
        check_model(model)
        if self.method.rerotate and any(
            t != "full_attention" for t in getattr(model.config.get_text_config(), "layer_types", None) or []
        ):
            raise UnsupportedModelError(
                "re-rotating positions (StreamingLLM) needs every layer to be full attention; this model has "
                "sliding-window layers. Use streaming_llm(rerotate=False)."
            )
        before = model.config._attn_implementation
        _register()
        token = None
        try:
            model.set_attn_implementation(attn.ATTENTION_NAME)
            session = Session(self, model)
            token = _ACTIVE.set(session)
            yield session.new_cache()
        finally:
            if token is not None:
                _ACTIVE.reset(token)
            model.set_attn_implementation(before)
            _unregister()

    def new_cache(self) -> SieveCache:
        """A fresh cache for another prompt, inside ``attach``."""
        session = _ACTIVE.get()
        if session is None or session.sieve is not self:
            raise KVSieveError("new_cache() must be called inside `with sieve.attach(model):`")
        return session.new_cache()


def check_model(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError unless kvsieve can hook this model through AttentionInterface."""
    config = getattr(model, "config", None)
    model_type = getattr(config.get_text_config(), "model_type", None) if config is not None else None
    if model_type not in SUPPORTED_MODEL_TYPES or not model._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}): kvsieve hooks attention through "
            f"transformers' AttentionInterface and supports {', '.join(SUPPORTED_MODEL_TYPES)}. "
            "Use one of these, e.g. the embedded smollm2-135m."
        )
    if getattr(config.get_text_config(), "attn_logit_softcapping", None):
        raise UnsupportedModelError(
            "this model soft-caps attention logits, which sdpa cannot do; kvsieve has no attention path for it."
        )


class Session:
    """State of one ``attach`` block: the sieve, the model's facts, and the attention entry point."""

    def __init__(self, sieve: Sieve, model: torch.nn.Module):
        self.sieve, self.method, self.budget = sieve, sieve.method, sieve.budget
        self.config = model.config
        text = model.config.get_text_config()
        self.n_layers = text.num_hidden_layers
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self.inv_freq = find_inv_freq(model) if self.method.rerotate else None

    def new_cache(self) -> SieveCache:
        return SieveCache(self.config, rerotate=self.method.rerotate, inv_freq=self.inv_freq)

    def attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        taken = take_last_update()
        if taken is None or taken[1] != module.layer_idx:
            raise KVSieveError(
                "inside a kvsieve context the model must run with the kvsieve cache: pass "
                "past_key_values=cache (the object `sieve.attach(model)` yields) and use_cache=True."
            )
        if kwargs.get("output_attentions"):
            raise UnsupportedModelError(
                "kvsieve attention never materialises full attention matrices, so output_attentions=True cannot be "
                "honoured; use `kvsieve diagnose` for attention statistics, or run without kvsieve and eager attention."
            )
        if attention_mask is not None and attention_mask.ndim != 2:
            raise UnsupportedModelError("kvsieve accepts 2D padding masks only, not custom 4D attention masks")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        cache, layer_idx = taken
        layer = cache.layers[layer_idx]
        if isinstance(layer, SieveLayer):
            return self._attend_sieve(module, cache, layer, query, attention_mask, scaling, dropout, kwargs), None
        return _attend_window(module, layer, query, key, value, attention_mask, scaling, dropout, kwargs), None

    def _attend_sieve(self, module, cache, layer: SieveLayer, query, mask2d, scaling, dropout, kwargs):
        q = query.shape[2]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(layer.get_seq_length(), layer.get_seq_length() + q, device=query.device)[None]
        self._check_window(position_ids)
        new_valid = None
        if mask2d is not None and not bool(mask2d[:, -q:].all()):
            new_valid = mask2d[:, -q:]
        layer.commit(position_ids, new_valid)

        method, layer_idx = self.method, module.layer_idx
        target = None  # tokens to keep per head after this pass
        if self.budget is not None and method.evicts:
            target = method.layer_budget(self.budget.target(layer.seen), layer_idx, self.n_layers)
        evicting = cache.compressing and target is not None and layer.length > target
        request = method.attention_request(evicting)
        groups = query.shape[1] // layer.n_kv_heads
        outputs, scores = [], []
        for seg in layer.segments:
            q_seg = query[:, seg.head_start * groups : (seg.head_start + seg.n_heads) * groups]
            keys, values = layer.attention_kv(seg)
            obs = Observation(
                layer_idx=layer_idx,
                n_layers=self.n_layers,
                keys=keys,
                values=values,
                queries=q_seg,
                positions=seg.positions,
                valid=seg.valid,
                attention=None,
                state=seg.state,
                n_new=q,
                scaling=scaling,
                budget=target if target is not None else seg.length,
                layer_state=layer.method_state,
                shared=cache.shared,
                head_start=seg.head_start,
            )
            outputs.append(self._segment_output(module, obs, dropout))
            if request is not None:
                obs.attention = attn.column_sums(q_seg, keys, scaling, seg.valid, request)
            method.observe(obs)
            if evicting:
                score = method.score(obs)
                if seg.valid is not None:  # padding goes first, whatever the method thinks of it
                    score = score.masked_fill(~seg.valid, float("-inf"))
                scores.append((obs, score))
        if evicting:
            keep = method.select([score for _, score in scores], target)
            merged = _merged(method, scores, keep)
            layer.keep(keep)
            if len(merged) != len(layer.segments):  # per-head picks of equal length were stored as one segment
                done = [m for m in merged if m is not None]
                merged = [None]
                if len(done) == len(keep):
                    merged = [(torch.cat([m[0] for m in done], dim=1), torch.cat([m[1] for m in done], dim=1))]
            for seg, update in zip(layer.segments, merged, strict=False):
                if update is not None:
                    seg.keys, seg.values = update
        layer.segments = [method.pack(seg) for seg in layer.segments]
        return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]

    def _segment_output(self, module, obs: Observation, dropout: float) -> torch.Tensor:
        """sdpa over one segment, through the method's selective reads and logit bias if it has them."""
        q, keys, values, valid = obs.n_new, obs.keys, obs.values, obs.valid
        bias = self.method.logit_bias(obs)
        if self.method.selects and q == 1:
            # the read budget goes to `reads` alone: obs.budget stays the eviction budget for the other hooks
            index = self.method.reads(replace(obs, budget=self.read_budget(obs.keys.shape[2])))
            if index is not None:
                keys, values, valid, bias = _gather_reads(index, keys, values, valid, bias)
        t = keys.shape[2]
        allowed = None
        if attn.needs_mask(q, t, valid) or bias is not None:
            shared_valid = valid
            if valid is not None and valid.shape[1] > 1 and bool((valid == valid[:, :1]).all()):
                shared_valid = valid[:, :1]
            allowed = attn.causal_allowed(q, t, shared_valid, device=obs.queries.device)
        return attn.sdpa_output(module, obs.queries, keys, values, allowed, obs.scaling, dropout, bias=bias)

    def read_budget(self, held: int) -> int:
        """Tokens a selective-read method attends to per step: the sieve's budget unless an inner method evicts."""
        own = getattr(self.method, "read_budget", None)
        if own is not None:
            return int(own) if own >= 1 else max(1, int(held * own))
        if self.budget is None:
            return held
        return self.budget.target(held)

    def _check_window(self, position_ids: torch.Tensor) -> None:
        if self.max_positions is None:
            return
        top = int(position_ids.max()) + 1
        if top > self.max_positions:
            how = (
                "the budget must stay below the window"
                if self.method.rerotate
                else f"{self.method.name} keeps original positions; use a streaming method (streaming_llm) or a "
                "shorter prompt"
            )
            raise ContextLengthError(
                f"position {top} is beyond the model's window of {self.max_positions} tokens: {how}."
            )


def _merged(method, scores, keep) -> list:
    """The method's merged (keys, values) for each segment's kept tokens, computed before the gather."""
    if len(keep) != len(scores):  # a head-wise policy splits the one segment into per-head ones: merge per head
        (obs, _), = scores
        return [method.merge(_head_view(obs, h), idx) for h, idx in enumerate(keep)]
    return [method.merge(obs, idx) for (obs, _), idx in zip(scores, keep, strict=True)]


def _head_view(obs: Observation, h: int) -> Observation:
    """The observation of KV head ``h`` alone (views, no copies)."""
    g = obs.group_size
    kv, qs = slice(h, h + 1), slice(h * g, (h + 1) * g)
    return Observation(
        layer_idx=obs.layer_idx, n_layers=obs.n_layers, keys=obs.keys[:, kv], values=obs.values[:, kv],
        queries=obs.queries[:, qs], positions=obs.positions[:, kv],
        valid=None if obs.valid is None else obs.valid[:, kv],
        attention=None if obs.attention is None else obs.attention[:, qs],
        state={k: v[:, kv] for k, v in obs.state.items()}, n_new=obs.n_new, scaling=obs.scaling,
        budget=obs.budget, layer_state=obs.layer_state, shared=obs.shared, head_start=obs.head_start + h,
    )


def _gather_reads(index, keys, values, valid, bias):
    """Gather the tokens a selective-read method picked, always including the newest one (index T - 1)."""
    t = keys.shape[2]
    newest = torch.full((*index.shape[:2], 1), t - 1, dtype=index.dtype, device=index.device)
    index = torch.cat([index[index != t - 1].view(*index.shape[:2], -1), newest], dim=-1).sort(dim=-1).values
    d = keys.shape[-1]
    keys = keys.gather(2, index[..., None].expand(-1, -1, -1, d))
    values = values.gather(2, index[..., None].expand(-1, -1, -1, values.shape[-1]))
    return (keys, values, *gather_valid_and_bias(index, valid, bias))


def gather_valid_and_bias(index, valid, bias):
    """Padding flags ``(B, h, T)`` and logit bias ``(B|1, h*g|1, q, T)`` of the read tokens ``index`` ``(B, h, k)``."""
    if valid is not None:
        valid = valid.gather(2, index)
    if bias is not None:
        g = bias.shape[1] // index.shape[1] if bias.shape[1] > 1 else 1
        idx = index.repeat_interleave(g, dim=1) if bias.shape[1] > 1 else index[:, :1]
        bias = bias.expand(index.shape[0], -1, -1, -1).gather(3, idx[:, :, None, :].expand(-1, -1, bias.shape[2], -1))
    return valid, bias


def _attend_window(module, layer, query, key, value, mask2d, scaling, dropout, kwargs):
    """Attention for transformers' own sliding-window layers, masked as transformers would mask them."""
    q, k = query.shape[2], key.shape[2]
    seen = layer.cumulative_length
    window = kwargs.get("sliding_window")
    k_pos = torch.arange(seen - k, seen, device=query.device)
    q_pos = torch.arange(seen - q, seen, device=query.device)
    k_valid = None
    if mask2d is not None and not bool(mask2d.all()):
        if mask2d.shape[-1] < seen:
            raise UnsupportedModelError("with padding, pass the attention mask for every token seen so far")
        k_valid = mask2d[:, seen - k : seen]
    plain = k_valid is None and (window is None or k < window) and (q == 1 or k == q)
    allowed = None if plain else attn.sliding_allowed(q_pos, k_pos, window, k_valid)
    return attn.sdpa_output(module, query, key, value, allowed, scaling, dropout)


def _sieve_attention(module, query, key, value, attention_mask, **kwargs):
    """The function registered as ``kvsieve`` in transformers' AttentionInterface."""
    session = _ACTIVE.get()
    if session is None:
        raise KVSieveError(
            "the kvsieve attention implementation was used outside `with sieve.attach(model):`; "
            "call the model inside that block."
        )
    return session.attend(module, query, key, value, attention_mask, **kwargs)


def _padding_mask_passthrough(attention_mask=None, **kwargs):
    """Mask function registered as ``kvsieve``: hands the 2D padding mask through; kvsieve builds its own masks."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


def _register() -> None:
    global _registrations
    with _registration_lock:
        if _registrations == 0:
            AttentionInterface.register(attn.ATTENTION_NAME, _sieve_attention)
            AttentionMaskInterface.register(attn.ATTENTION_NAME, _padding_mask_passthrough)
        _registrations += 1


def _unregister() -> None:
    global _registrations
    with _registration_lock:
        _registrations -= 1
        if _registrations == 0:
            AttentionInterface._global_mapping.pop(attn.ATTENTION_NAME, None)
            AttentionMaskInterface._global_mapping.pop(attn.ATTENTION_NAME, None)
