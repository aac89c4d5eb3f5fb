"""The user-facing context: ``Sieve(method, budget).attach(model)`` yields a cache that acts as the model runs.

A sieve acts at up to three places, each a separate axis:

- the **cache** (``method``): what is kept, merged, quantised or read, under a :class:`Budget`;
- the **attention compute** (``prefill=``): how a prefill pass's attention is computed (e.g. block-sparse);
- the **sequence** (``sequence=``): which tokens' hidden states go on past a decoder layer (e.g. FastV).

Data flows one way per layer and forward pass (:mod:`kvsieve.pipeline`): model's q/k/v -> cache layer -> attention
and the statistics the method asked for -> ``observe`` -> ``score`` -> ``select`` (the policy, given the budget) ->
``keep``.

Nothing in transformers is patched. Entering the context registers the ``kvsieve`` attention and mask functions
through ``AttentionInterface`` / ``AttentionMaskInterface``, switches the model to them with
``set_attn_implementation`` and, for a sequence method, adds forward pre-hooks to the decoder layers (for some VLMs
also a method set on one module *instance*: LLaVA-NeXT's ``get_image_features``, Qwen3-VL's ``_deepstack_process``);
leaving it restores the model's implementation and removes the registrations, hooks and instance attributes (also
after an exception).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import attention as attn
from .cache import SieveCache, SieveLayer, take_last_update
from .errors import BudgetError, ContextLengthError, KVSieveError, UnsupportedModelError
from .methods import build
from .methods.base import Method, PrefillMethod, SequenceMethod, batch_rule, overrides, read_budget_of
from .pipeline import run_layer
from .rope import find_inv_freq
from .sliding import BIDIRECTIONAL_IMAGES, attend_window, image_groups

# Architectures whose attention goes through AttentionInterface and that the test suite covers: the language model's
# type (``config.get_text_config().model_type``) and, for vision-language models, the model's own type.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen2_vl_text", "qwen2_5_vl_text",
                         "qwen3_vl_text")  # fmt: skip
SUPPORTED_VLM_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3")
# VLMs supported only from a newer transformers than the package's floor (5.0.0): tested on 5.24.0; on 5.0.0 their
# inputs (Qwen3-VL's mm_token_type_ids), DeepStack and image masks differ from what kvsieve follows
VLM_MIN_TRANSFORMERS = {"qwen3_vl": "5.24.0", "gemma3": "5.24.0"}


def transformers_needed(vlm_type: str) -> str | None:
    """The transformers release a VLM type needs when the installed one is older (``VLM_MIN_TRANSFORMERS``), else
    None."""
    need = VLM_MIN_TRANSFORMERS.get(vlm_type)
    return need if need is not None and Version(transformers.__version__) < Version(need) else None


DEFAULT_INTERVAL = 16  # decoding steps between evictions of a token budget: held <= budget + 15, see Budget

_ACTIVE: ContextVar[Session | None] = ContextVar("kvsieve_session", default=None)
_failed_update = threading.local()  # the (cache, layer) of the attention call in progress, to clean up after errors
_failed_update.value = None
_registration_lock = threading.Lock()
_registrations = 0


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"{what} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """How much of the KV cache to keep and to read, per layer and KV head.

    Keep (evicting methods), one of:

    - ``compression``: the fraction of tokens removed, in [0, 1) (as kvpress): every prefill pass (more than one new
      token: the prompt, or each chunk of a chunked prefill) leaves ``int(seen x (1 - compression))`` tokens; decoding
      steps then append without evicting. Compress once, then generate.
    - ``tokens``: a cap for streaming. A prefill pass leaves ``tokens``; decoding steps evict every ``interval``
      steps (default :data:`DEFAULT_INTERVAL`, 16), once the layer holds ``tokens + interval`` tokens, back down to
      ``tokens``, so a layer holds at most ``tokens + interval - 1`` (kvpress's ``DecodingPress``). ``interval=1``
      evicts at every step and holds exactly ``tokens``; it costs one scoring and one eviction per step and layer
      (measured in ``benchmarks/decode_speed.py``).

    Read (selective-read methods): ``read`` tokens, or ``read_fraction`` of the held tokens (in (0, 1]), attended to
    per decoding step; neither reads every held token.
    """

    compression: float | None = None
    tokens: int | None = None
    interval: int | None = None  # decoding steps between evictions of a token budget; None: DEFAULT_INTERVAL
    read: int | None = None
    read_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.compression is not None and self.tokens is not None:
            raise BudgetError("give one of compression (a fraction in [0, 1)) or budget (a token count), not both")
        if self.compression is not None:
            c = _number(self.compression, "compression")
            if not 0.0 <= c < 1.0:
                raise BudgetError(
                    f"compression {self.compression} is outside [0, 1): it is the fraction of tokens removed, "
                    "e.g. 0.5 keeps half; use budget=N for an absolute number of tokens."
                )
        if self.tokens is not None:
            _number(self.tokens, "budget")
            if int(self.tokens) != self.tokens:
                raise BudgetError(f"budget must be a whole number of tokens, got {self.tokens!r}")
            if self.tokens < 1:
                raise BudgetError(f"budget must be at least 1 token, got {self.tokens}")
        if self.interval is not None:
            if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
                raise BudgetError(f"interval must be a whole number of decoding steps >= 1, got {self.interval!r}")
            if self.tokens is None:
                raise BudgetError("interval applies to a token budget; give budget=N with interval=k")
        if self.read is not None and (_number(self.read, "read budget") < 1 or int(self.read) != self.read):
            raise BudgetError(f"read budget must be a whole number of tokens >= 1, got {self.read!r}")
        if self.read_fraction is not None and not 0.0 < _number(self.read_fraction, "read fraction") <= 1.0:
            raise BudgetError(f"read fraction must be in (0, 1], got {self.read_fraction!r}")

    @property
    def every(self) -> int:
        """Decoding steps from one eviction of a token budget to the next."""
        return DEFAULT_INTERVAL if self.interval is None else self.interval

    @property
    def keeps(self) -> bool:
        """True if this budget evicts at all."""
        return self.tokens is not None or self.compression is not None

    def keep_target(self, seen: int, n_new: int) -> int | None:
        """Tokens per head a layer that has seen ``seen`` tokens (``n_new`` in this pass) may keep; None: no
        eviction in this pass."""
        if self.compression is not None:
            return max(1, int(seen * (1.0 - float(self.compression)))) if n_new > 1 else None
        return None if self.tokens is None else int(self.tokens)

    def due(self, held_per_head: float, target: int, n_new: int) -> bool:
        """Whether a layer holding ``held_per_head`` tokens per head (on average) evicts down to ``target`` now:
        always past its target, except decoding steps with an ``interval``, which wait for ``target + interval``."""
        if n_new > 1 or self.every == 1:
            return held_per_head > target
        return held_per_head >= target + self.every

    def read_target(self, held: int) -> int | None:
        """Tokens a read method attends to per decoding step, out of ``held``."""
        if self.read_fraction is not None:
            return max(1, int(held * float(self.read_fraction)))
        return None if self.read is None else int(self.read)

    def __str__(self) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens" + (f" (evicting every {self.every} steps)" if self.every > 1 else ""))
        if self.compression is not None:
            parts.append(f"compression {float(self.compression):g}")
        if self.read is not None:
            parts.append(f"read {self.read} tokens")
        if self.read_fraction is not None:
            parts.append(f"read {float(self.read_fraction):g} of the held tokens")
        return ", ".join(parts) or "full"


def _read_budget(read_budget: int | float) -> Budget:
    """A method's ``read_budget`` hyperparameter: a token count, or a fraction of the held tokens when below 1."""
    if isinstance(read_budget, float) and read_budget < 1.0:
        return Budget(read_fraction=read_budget)
    return Budget(read=int(read_budget))


def _as(spec, base: type, what: str):
    """Build ``spec`` (a string or an instance) and check it is of the expected action point."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if not spec.strip():
            raise KVSieveError(f"empty {what} spec; name one from `kvsieve methods`")
        spec = build(spec)
    if not isinstance(spec, base):
        kind = getattr(spec, "kind", type(spec).__name__)
        raise KVSieveError(
            f"{getattr(spec, 'name', spec)!r} is not a {what} method (its kind: {kind}); `kvsieve methods` lists "
            f"the {what} methods"
        )
    return spec


class Sieve:
    """A cache method and its budget, plus optional prefill and sequence methods, ready to attach to a model.

    >>> sieve = Sieve("snapkv", compression=0.5)                       # compress the prompt once, then append
    >>> sieve = Sieve("streaming_llm", budget=1024)                    # hold 1,024 tokens at every step
    >>> sieve = Sieve("snapkv", budget=1024, interval=64)              # evict every 64 steps (<= 1,087 held)
    >>> sieve = Sieve("full", sequence="fastv(layer=2, keep=0.5)")     # prune hidden states after layer 2
    >>> with sieve.attach(model) as cache:
    ...     out = model.generate(**inputs, **kvsieve.cache_kwargs(model, cache), max_new_tokens=32)
    """

    def __init__(
        self,
        method: str | Method = "full",
        *,
        compression: float | None = None,
        budget: int | None = None,
        interval: int | None = None,
        prefill: str | PrefillMethod | None = None,
        sequence: str | SequenceMethod | None = None,
    ):
        if method is None:
            raise KVSieveError("Sieve needs a cache method, e.g. Sieve('full') or Sieve('snapkv', compression=0.5)")
        self.method = _as(method, Method, "cache")
        self.prefill = _as(prefill, PrefillMethod, "prefill")
        self.sequence = _as(sequence, SequenceMethod, "sequence")
        self.budget = self._budget(compression, budget, interval)
        if self.budget.tokens is not None:
            self.method.check_budget(int(self.budget.tokens))
        if self.method.rerotate and overrides(self.method, "merge"):
            raise KVSieveError(
                f"{self.method.spec()} merges tokens on a layer that re-indexes positions, which kvsieve cannot "
                "keep exact; use a method that keeps original positions"
            )

    def _budget(self, compression, budget, interval) -> Budget:
        m = self.method
        given = compression is not None or budget is not None

        if m.kind == "keep-all":
            if budget is not None or (compression not in (None, 0, 0.0)):
                raise BudgetError(
                    f"{m.name} keeps every token, so a budget or compression > 0 would be ignored; drop "
                    "--budget/--compression or choose an evicting method."
                )
            Budget(compression=compression)  # still validates the value
            return Budget()
        own_read = read_budget_of(m)
        if m.kind == "read":
            if own_read is not None and given:
                raise BudgetError(
                    f"{m.spec()} sets read_budget and the sieve gives a budget too: give the read budget once"
                )
            if own_read is not None:
                return _read_budget(own_read)
            if not given:
                raise BudgetError(f"{m.name} reads a budget of tokens per step: pass budget=N or compression=R")
            read = Budget(compression=compression, tokens=budget)  # validates
            if budget is not None:
                return Budget(read=read.tokens)
            return Budget(read_fraction=1.0 - float(compression))
        if not given:
            raise BudgetError(f"{m.name} needs a budget: pass compression=R (fraction removed) or budget=N")
        keep = Budget(compression=compression, tokens=budget, interval=interval)
        if own_read is None:
            return keep
        read = _read_budget(own_read)
        return Budget(compression, budget, interval, read.read, read.read_fraction)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v.spec()!r}" for k, v in (("prefill", self.prefill), ("sequence", self.sequence)) if v)
        return f"Sieve({self.method.spec()!r}, {self.budget}{extra})"

    @contextmanager
    def attach(self, model: torch.nn.Module, cache: SieveCache | None = None) -> Iterator[SieveCache]:
        """Route ``model``'s attention through kvsieve for the duration of the block; yields a fresh cache, or
        ``cache`` (one made by an earlier block of this sieve, e.g. to continue a conversation later)."""
        check_model(model)
        if cache is not None:
            if not isinstance(cache, SieveCache):
                raise KVSieveError(f"attach(cache=...) takes a kvsieve cache, got {type(cache).__name__}")
            if cache.session is not None and cache.session.active:
                raise KVSieveError("this kvsieve cache is in use by another `attach` block; leave that block first")
            if cache.sieve_layers() and cache.sieve_layers()[0].rerotate != self.method.rerotate:
                raise KVSieveError("this cache was made by a sieve with other position handling; use a new cache")
        sliding = any(t != "full_attention" for t in getattr(model.config.get_text_config(), "layer_types", None) or [])
        if self.method.rerotate and sliding:
            raise UnsupportedModelError(
                "re-rotating positions (StreamingLLM) needs every layer to be full attention; this model has "
                "sliding-window layers. Use streaming_llm(rerotate=False)."
            )
        if self.sequence is not None:
            from .sequence import check_sequence

            check_sequence(self, model)
        from .models import language_attention

        before = language_attention(model)  # of the language model: a VLM's vision tower keeps its own
        session = Session(self, model)
        _register()
        token = None
        try:
            model.set_attn_implementation(language_attention(model, attn.ATTENTION_NAME))
            token = _ACTIVE.set(session)
            session.install(model)
            if cache is not None:
                cache.adopt(session)
                yield cache
            else:
                yield session.new_cache()
        finally:
            session.close()
            if token is not None:
                _ACTIVE.reset(token)
            model.set_attn_implementation(language_attention(model, before))
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
    outer = getattr(config, "model_type", None)
    if getattr(config, "vision_config", None) is not None and outer not in SUPPORTED_VLM_TYPES:
        raise UnsupportedModelError(
            f"unsupported vision-language architecture {outer!r} ({type(model).__name__}): kvsieve supports "
            f"{', '.join(SUPPORTED_VLM_TYPES)}. Use one of these, or the language model alone."
        )
    need = transformers_needed(outer) if getattr(config, "vision_config", None) is not None else None
    if need is not None:
        raise UnsupportedModelError(
            f"kvsieve supports {outer!r} vision-language models from transformers {need} on (installed: "
            f"{transformers.__version__}); pip install -U 'transformers>={need}'"
        )
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
        self.prefill, self.sequence = sieve.prefill, sieve.sequence
        self.config = model.config
        text = model.config.get_text_config()
        self.n_layers = text.num_hidden_layers
        self.max_positions = getattr(text, "max_position_embeddings", None)
        self.inv_freq = find_inv_freq(model) if self.method.rerotate else None
        m = self.method
        self.biases = overrides(m, "logit_bias")
        self.batch_rule = batch_rule(m)
        self.evicts = m.evicts and self.budget.keeps
        # no hook runs in a pass that neither evicts nor reads selectively nor gathers statistics
        self.idle = not any(overrides(m, hook) for hook in ("observe", "logit_bias"))
        self.first_layer: int | None = None  # the first full-attention layer: where a pass's positions are checked
        self.reads = m.selects
        # keep-all and nothing to observe, bias, pack or read: attention over what is held, no per-layer work
        self.plain = m.kind == "keep-all" and not any(
            overrides(m, hook) for hook in ("observe", "logit_bias", "pack", "reads", "attention_request")
        )
        # Gemma 3: the tokens of one image attend to each other in both directions during a prefill
        self.bidirectional = getattr(model.config, "model_type", None) in BIDIRECTIONAL_IMAGES
        self.active = True
        self._hooks: list = []

    def install(self, model: torch.nn.Module) -> None:
        # a VLM's tokens are tagged (image / text) for the cache methods too, e.g. images_only
        if self.sequence is not None or getattr(model.config, "vision_config", None) is not None:
            from .sequence import install_hooks

            self._hooks = install_hooks(model)

    def close(self) -> None:
        self.active = False
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def new_cache(self) -> SieveCache:
        return SieveCache(self.config, session=self, rerotate=self.method.rerotate, inv_freq=self.inv_freq)

    # --- budgets -------------------------------------------------------------------------------------------------
    def keep_targets(self, layer: SieveLayer, ctx, cache: SieveCache) -> tuple[list[int] | None, bool]:
        """Tokens per head each batch row keeps after this pass, and whether it evicts now.

        ``(None, False)`` where nothing is evicted in this pass (compression at a decoding step, keep-all methods,
        ``cache.paused()``); ``(targets, False)`` at a decoding step between two evictions of a periodic budget.
        """
        if not self.evicts or not cache.compressing:
            return None, False
        targets = []
        for seen in layer.real_seen():
            target = self.budget.keep_target(seen, ctx.n_new)
            if target is None:
                return None, False
            targets.append(self.method.layer_budget(target, ctx))
        if len(layer.segments) == 1:
            held = float(layer.segments[0].length)
        else:
            per_head = layer.tokens_per_head()
            held = sum(per_head) / len(per_head)
        return targets, self.budget.due(held, min(targets), ctx.n_new)

    def read_target(self, held: int) -> int | None:
        return self.budget.read_target(held) if self.reads else None

    # --- attention -----------------------------------------------------------------------------------------------
    def compute(
        self, call: attn.AttentionCall, obs, q: int, with_probs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention-compute action point: selected reads, a prefill method, or dense attention.

        ``with_probs`` (a decoding step that evicts): also return the step's attention probabilities ``(B, Hq, T)``
        when attending to every held token, computed in the same pass.
        """
        if q == 1 and obs is not None and obs.read_budget is not None and obs.read_budget < call.keys.shape[2]:
            index = self.method.reads(obs)
            if index is not None:
                return attn.read_selected(call, index), None
        if q > 1 and self.prefill is not None:
            if call.together is not None and not self.prefill.exact:
                raise UnsupportedModelError(
                    f"{self.prefill.name} computes causal attention, and this model's image tokens attend to each "
                    "other in both directions; run the prompts with images without a prefill method"
                )
            return self.prefill.attend(call), None
        if with_probs and q == 1:
            return attn.decode_with_probs(call)
        return attn.dense(call), None

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        try:
            return self._attend(module, query, key, value, attention_mask, **kwargs)
        except BaseException:
            taken = _failed_update.value
            if taken is not None:
                taken[0].abandon_pass(taken[1])
            raise

    def _attend(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        taken = take_last_update()
        _failed_update.value = taken
        if taken is None or taken[1] != module.layer_idx:
            raise KVSieveError(
                "inside a kvsieve context the model must run with the kvsieve cache: pass the cache that "
                "`sieve.attach(model)` yields (kvsieve.cache_kwargs(model, cache)) and use_cache=True."
            )
        cache, layer_idx = taken
        if cache.session is not self:
            raise KVSieveError(
                "this kvsieve cache belongs to another `with sieve.attach(model):` block; use the cache of the "
                "innermost block, or leave the inner block first."
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
        layer = cache.layers[layer_idx]
        q = query.shape[2]
        together = image_groups(cache, q) if self.bidirectional else None
        if self.batch_rule != "any" and query.shape[0] > 1:
            if self.batch_rule == "single":
                raise KVSieveError(
                    f"{self.method.spec()} decides per sequence and runs on batch size 1; run the prompts one at a time"
                )
            if attention_mask is not None and not bool(attention_mask.all()):
                raise KVSieveError(
                    f"{self.method.spec()} lays tokens out by slot, so a left-padded row would not get what it gets "
                    "alone; run prompts of different lengths one at a time (batches of equal lengths are fine)"
                )
        if isinstance(layer, SieveLayer):
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                start = layer.seen - q
                position_ids = torch.arange(start, start + q, device=query.device)[None]
            if self.first_layer is None:
                self.first_layer = layer_idx
            if layer_idx == self.first_layer:  # every layer of a pass has the same positions: check them once
                self._check_window(position_ids, layer, q)
            new_valid = None
            if attention_mask is not None and not bool(attention_mask[:, -q:].all()):
                new_valid = attention_mask[:, -q:].bool()
            out = run_layer(self, module, cache, layer, query, new_valid, scaling, dropout, position_ids, together)
            return out, None
        return attend_window(module, cache, layer, query, key, value, attention_mask, scaling, dropout, kwargs,
                             together), None  # fmt: skip

    def sequence_step(self, cache, layer_idx: int, pieces: list[tuple], scaling: float, q: int) -> None:
        """At the sequence method's layer, in a prefill pass: decide which tokens go on (see kvsieve.sequence)."""
        if self.sequence is not None and q > 1 and layer_idx == self.sequence.layer:
            from .sequence import decide_pruning

            decide_pruning(self.sequence, cache, pieces, scaling, q)

    def _check_window(self, position_ids: torch.Tensor, layer: SieveLayer, q: int) -> None:
        if self.max_positions is None:
            return
        # re-indexing layers count positions within the cache
        top = layer.held + q if self.method.rerotate else int(position_ids.max()) + 1
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
