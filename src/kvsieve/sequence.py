"""The sequence action point: drop tokens' hidden states between decoder layers, or before the first one.

A sequence method (:class:`Pruner`, a :class:`~kvsieve.methods.base.SequenceMethod`) prunes a prefill pass in one or
more *stages* (:class:`Stage`): after decoder layer ``K`` (in-LLM methods: FastV, TransPrune, ...) or before the
first decoder layer, from the vision encoder's outputs (pre-LLM methods, :mod:`kvsieve.vision`). Each stage keeps a
share of the pass's *candidate* tokens (the tokens the method may drop: the image tokens, or every prunable token of
a text prompt); every other token, the last token and the tokens marked protected (:func:`protect`, e.g. the question
in query-aware mode) always go on.

How: forward pre-hooks on the decoder layers. The hook of layer ``K + 1`` asks the method to rank the rows entering it
(:meth:`Pruner.rank`, given a :class:`StageView`: the hidden states, the tokens' tags, the attention of layer ``K``
recomputed from its input for the queries the method names) and keeps the top rows; from then on the hooks select the
kept rows of the per-token arguments every layer receives (position ids, rotary embeddings: the kept tokens keep their
original positions, M-RoPE included), so layers ``K + 1 ..`` compute on the kept rows only and their cache layers hold
only those. The model's output has one row per kept token (the last row is the last token's, so ``logits_to_keep=1``
and ``generate`` work unchanged).

Every token of a pass carries tags (:class:`PassTokens`): modality (text, image, video), the image/video *segment* it
belongs to (a contiguous run of placeholder tokens: an image, a crop of a split image, a video), and whether it may be
pruned. They are read from ``input_ids`` by a forward pre-hook on the model (VLMs: its image token ids), follow the
kept rows through the stages, and are kept per stream position in ``cache.shared`` for cache methods
(:func:`stream_modality`).

The hooks are registered when the ``attach`` block starts and removed when it ends; a pass that prunes nothing
(decoding steps, a paused cache, ``keep=1``) passes through untouched, bit for bit.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .cache import DROPPED_BEFORE_LLM
from .errors import KVSieveError, UnsupportedModelError
from .methods.base import Observation, SequenceMethod, hp

PASS = "sequence_pass"  # cache.pass_state key of the pass in progress
PENDING = "sequence_protect"  # cache.pass_state key of a protection mask for the next pass
STREAM_TAGS = "token_modality"  # cache.shared key: modality per stream position, (B, seen) int8
MODALITY = {"text": 0, "image": 1, "video": 2}


@dataclass(frozen=True)
class Stage:
    """One pruning step: ``after`` a decoder layer (-1: before the first one, from the vision encoder), keeping
    ``keep`` of the pass's candidate tokens (a share of the candidates the pass started with)."""

    after: int
    keep: float


def merged_stages(stages: list[Stage]) -> list[Stage]:
    """Stages in layer order, one per layer (of several at one layer, the one keeping least)."""
    by_layer: dict[int, Stage] = {}
    for stage in stages:
        if stage.after not in by_layer or stage.keep < by_layer[stage.after].keep:
            by_layer[stage.after] = stage
    return [by_layer[k] for k in sorted(by_layer)]


@dataclass
class PassTokens:
    """Tags of a pass's tokens, ``(B, n)`` each, in the pass's row order."""

    modality: torch.Tensor  # int8: MODALITY values
    segment: torch.Tensor  # int64: image/video run number within the pass, -1 for text
    prunable: torch.Tensor  # bool: False for protected tokens (always kept)

    def rows(self, index: torch.Tensor) -> PassTokens:
        return PassTokens(*(t.gather(1, index) for t in (self.modality, self.segment, self.prunable)))


@dataclass
class PassState:
    """The prefill pass in progress: its tags, the rows still on, the stages to come and the methods' scratch."""

    n: int  # rows of the pass
    start: int  # stream position of its first token
    tokens: PassTokens  # tags of the rows still on
    rows: torch.Tensor  # (B, k): pass rows still on, sorted
    candidates: torch.Tensor  # (B,): candidate tokens the pass started with
    stages: list[Stage]
    active: bool  # False: nothing is pruned in this pass (decoding, paused cache, no candidate)
    pending: torch.Tensor | None = None  # (B, k'): rows of the hidden states to keep at the next decoder layer
    stash: dict = field(default_factory=dict)  # layer -> (input hidden states, rotary embeddings) for the ranking
    scratch: dict = field(default_factory=dict)  # method state, per-row tensors (B, k, ...) re-indexed at each stage
    vision: dict = field(default_factory=dict)  # encoder statistics captured for a pre-LLM stage


class StageView:
    """What a stage's ranking sees: the rows entering decoder layer ``stage.after + 1`` (``k`` of them).

    ``hidden`` ``(B, k, d)``; ``tokens`` their tags; ``candidates`` ``(B, k)`` the rows the method may drop;
    ``scratch`` the method's per-pass state. :meth:`attention` gives the attention they receive.
    """

    def __init__(self, stage: Stage, number: int, hidden: torch.Tensor, state: PassState, candidates: torch.Tensor,
                 layers: dict[int, torch.nn.Module]):  # fmt: skip
        self.stage, self.number, self.hidden, self.state = stage, number, hidden, state
        self.tokens, self.candidates, self.scratch = state.tokens, candidates, state.scratch
        self._layers = layers

    @property
    def rows(self) -> torch.Tensor:
        return self.state.rows

    def queries(self, which: str) -> torch.Tensor:
        """Rows ``(B, k)`` bool used as queries: ``last`` (the last token), ``instruction`` (the non-candidate tokens
        after the last candidate: the question about an image, or the question after a text context; the last token
        when there are none) or ``all``."""
        b, k = self.candidates.shape
        out = torch.zeros(b, k, dtype=torch.bool, device=self.candidates.device)
        if which == "all":
            return out.fill_(True)
        out[:, -1] = True
        if which == "instruction":
            rows = torch.arange(k, device=out.device).expand(b, k)
            last = torch.where(self.candidates, rows, torch.full_like(rows, -1)).max(dim=1, keepdim=True).values
            out |= (rows > last) & ~self.candidates
        elif which != "last":
            raise ValueError(which)
        return out

    def attention(self, queries: str = "last", layer: str = "this") -> torch.Tensor:
        """Attention ``(B, k)`` each row receives, averaged over heads and over the query rows :meth:`queries` names.

        ``layer="this"``: decoder layer ``stage.after``, recomputed from its input (the attention it computed);
        ``"next"``: layer ``stage.after + 1`` from the rows entering it (TransPrune). Softmax over this pass's rows
        (tokens of earlier passes are not in the normaliser). A pre-LLM stage has no decoder attention.
        """
        if self.stage.after < 0:
            raise KVSieveError("a pre-LLM stage has no decoder attention; use the encoder statistics (kvsieve.vision)")
        target = self.stage.after if layer == "this" else self.stage.after + 1
        if layer == "this":
            hidden, emb = self.state.stash[target]
        else:
            hidden, emb = self.hidden, self.state.stash.get(("emb", target))
        return received_attention(self._layers[target], hidden, emb, self.queries(queries))


def received_attention(layer: torch.nn.Module, hidden: torch.Tensor, emb, query_rows: torch.Tensor) -> torch.Tensor:
    """Attention ``(B, k)`` a decoder layer gives each of its ``k`` input rows from the ``query_rows`` ``(B, k)``
    (causal, averaged over query heads and query rows), recomputed from the layer's input ``hidden`` with its own
    norm, projections and rotary embedding ``emb`` (cos, sin). Used for rankings only, never for the output."""
    attn = layer.self_attn
    b, k, _ = hidden.shape
    h = layer.input_layernorm(hidden)
    d = attn.head_dim
    q = attn.q_proj(h).view(b, k, -1, d)
    kk = attn.k_proj(h).view(b, k, -1, d)
    if hasattr(attn, "q_norm"):
        q, kk = attn.q_norm(q), attn.k_norm(kk)
    q, kk = q.transpose(1, 2), kk.transpose(1, 2)
    if emb is not None:
        module = sys.modules[type(attn).__module__]
        if hasattr(module, "apply_rotary_pos_emb"):
            q, kk = module.apply_rotary_pos_emb(q, kk, *emb)
        else:  # older transformers' Qwen2-VL: cos/sin per M-RoPE section, merged by the model's own function
            q, kk = module.apply_multimodal_rotary_pos_emb(q, kk, *emb, attn.config.rope_parameters["mrope_section"])
    groups = q.shape[1] // kk.shape[1]
    kk = kk.repeat_interleave(groups, dim=1)
    out = torch.zeros(b, k, dtype=torch.float32, device=hidden.device)
    scaling = getattr(attn, "scaling", d**-0.5)
    for i in range(b):
        rows = query_rows[i].nonzero().flatten()
        for chunk in rows.split(512):  # bounded memory for many queries
            logits = (q[i][:, chunk].float() @ kk[i].float().transpose(-1, -2)) * scaling  # (H, c, k)
            causal = torch.arange(k, device=hidden.device)[None, :] > chunk[:, None]
            probs = logits.masked_fill(causal, float("-inf")).softmax(dim=-1)
            out[i] += probs.sum(dim=(0, 1))
        out[i] /= max(1, len(rows)) * q.shape[1]
    return out


@dataclass
class Pruner(SequenceMethod):
    """Base of the sequence methods: stages, candidates, and the ranking of the rows entering a stage.

    ``scope``: which tokens the method may drop: ``image`` (image/video tokens; an image-free prompt is an error),
    ``all`` (every prunable token), ``auto`` (image tokens when the prompt has any, else every prunable token).
    Subclasses implement :meth:`rank` (in-LLM stages) and/or :meth:`select_vision` (a pre-LLM stage,
    :mod:`kvsieve.vision`), and :meth:`stages` when they prune more than once.
    """

    scope: str = hp("auto", choices=("auto", "image", "all"))

    image_only: ClassVar[bool] = False  # pre-LLM methods act on the vision encoder's tokens only
    sublayers: ClassVar[bool] = False  # True: observe_sublayer sees every attention/MLP block's input and output

    def stages(self, n_layers: int) -> list[Stage]:
        """The pruning steps of a pass, in order (default: one, after ``layer``, keeping ``keep``)."""
        return [Stage(self.layer, self.keep)]

    def rank(self, view: StageView) -> torch.Tensor:
        """Importance ``(B, k)`` of the rows entering the stage (higher goes on); only candidates are compared."""
        raise NotImplementedError

    def encoder_layers(self, n: int) -> list[int]:
        """Vision-encoder layers (0..n-1) whose statistics a pre-LLM stage reads (:mod:`kvsieve.vision`)."""
        return []

    def select_vision(self, view):
        """A pre-LLM stage (``Stage(-1, keep)``): a :class:`kvsieve.vision.VisionChoice` for the
        :class:`kvsieve.vision.VisionView`. Runs only for prompts with images."""
        raise NotImplementedError

    def observe_sublayer(self, scratch: dict, layer: int, kind: str, before: torch.Tensor, after: torch.Tensor) -> None:
        """With ``sublayers``: the input and output ``(B, k, d)`` of layer ``layer``'s ``attention``/``mlp`` block."""

    def score(self, obs: Observation) -> torch.Tensor:  # the single-stage hook of SequenceMethod, unused here
        raise KVSieveError(f"{self.name} ranks tokens in the decoder-layer hooks (kvsieve.sequence), not in score()")


# --- public helpers ---------------------------------------------------------------------------------------------
def protect(cache, prunable: torch.Tensor) -> None:
    """Mark which tokens of the NEXT forward pass may be pruned: ``prunable`` ``(B, n)`` bool (False: always kept,
    e.g. the question of a query-aware prompt). Applies to that pass only; a pass of another length is an error."""
    if not isinstance(prunable, torch.Tensor) or prunable.dim() != 2:
        raise KVSieveError("protect(cache, prunable) takes a (batch, tokens) bool tensor")
    cache.pass_state[PENDING] = prunable.bool()


def stream_modality(obs: Observation) -> torch.Tensor | None:
    """Modality (:data:`MODALITY`) of each held token of an observation, ``(B, h, T)``, or None when no pass of this
    cache was tagged (text-only use)."""
    tags = obs.shared.get(STREAM_TAGS)
    if tags is None:
        return None
    pos = obs.positions.clamp(min=0)
    b, h, _ = pos.shape
    known = tags.shape[1]
    out = tags.to(pos.device)[:, None, :].expand(b, h, known).gather(-1, pos.clamp(max=known - 1).to(torch.int64))
    return out.masked_fill(pos >= known, MODALITY["text"])


# --- checks -----------------------------------------------------------------------------------------------------
def check_sequence(sieve, model: torch.nn.Module) -> None:
    """Refuse, before any work, what the sequence action point cannot keep consistent. (Sliding-window layers follow
    the kept rows at their original positions: :mod:`kvsieve.sliding`.)"""
    seq: SequenceMethod = sieve.sequence
    n_layers = model.config.get_text_config().num_hidden_layers
    stages = merged_stages(seq.stages(n_layers)) if isinstance(seq, Pruner) else [Stage(seq.layer, seq.keep)]
    for stage in stages:
        if stage.after >= n_layers - 1:
            raise KVSieveError(
                f"{seq.name}: layer {stage.after} leaves no decoder layer to prune (the model has {n_layers} layers, "
                f"0..{n_layers - 1}); use a layer below {n_layers - 1}"
            )
    if any(b.keep > a.keep for a, b in itertools.pairwise(stages)):
        raise KVSieveError(f"{seq.name}: each stage must keep no more tokens than the one before; got {stages}")
    if sieve.method.rerotate:
        raise KVSieveError(
            f"{seq.name} leaves gaps in the token positions, which {sieve.method.name}'s re-indexing cannot follow; "
            "use a method that keeps original positions, e.g. streaming_llm(rerotate=False)"
        )
    if not decoder_layers(model):
        raise UnsupportedModelError(f"found no decoder layers in {type(model).__name__} to prune between")
    if any(s.after < 0 for s in stages):
        from .vision import adapter_for

        adapter_for(model, seq)  # raises for a model without a vision tower kvsieve can hook


def decoder_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, decoder layer module)`` for every decoder layer (a module whose ``self_attn`` has one) of the
    language model (vision-tower blocks have no ``layer_idx``)."""
    out = []
    for module in model.modules():
        attn_module = getattr(module, "self_attn", None)
        if attn_module is not None and isinstance(getattr(attn_module, "layer_idx", None), int):
            out.append((attn_module.layer_idx, module))
    return out


# --- hooks ------------------------------------------------------------------------------------------------------
def install_hooks(model: torch.nn.Module) -> list:
    """The hooks of the sequence action point: the pass start on ``model``, row selection on every decoder layer,
    sub-layer observers, and for a VLM the vision hooks of :mod:`kvsieve.vision`. Returns their handles."""
    layers = dict(decoder_layers(model))
    first = min(layers)
    current: dict = {}  # the cache of the forward pass in progress, for hooks whose module gets no cache argument
    n_layers = model.config.get_text_config().num_hidden_layers
    handles = [model.register_forward_pre_hook(_start_hook(model, current), with_kwargs=True)]
    for layer_idx, module in layers.items():
        handles.append(module.register_forward_pre_hook(_layer_hook(layer_idx, first, layers, n_layers, current),
                                                        with_kwargs=True))  # fmt: skip
        for kind, before, after in (("attention", "input_layernorm", "self_attn"),
                                    ("mlp", "post_attention_layernorm", "mlp")):  # fmt: skip
            b, a = getattr(module, before, None), getattr(module, after, None)
            if b is not None and a is not None:
                handles += _sublayer_hooks(layer_idx, kind, b, a, current)
    if getattr(model.config, "vision_config", None) is not None:
        from .vision import install_vision_hooks

        handles += install_vision_hooks(model, current)
    return handles


def _cache_of(kwargs: dict):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if hasattr(cache, "pass_state") else None


def _method(cache) -> Pruner | None:
    session = getattr(cache, "session", None)
    seq = getattr(session, "sequence", None)
    return seq if isinstance(seq, Pruner) else None


def _start_hook(model: torch.nn.Module, current: dict):
    """At the model's forward: tag the pass's tokens from ``input_ids`` and plan its stages."""
    n_layers = model.config.get_text_config().num_hidden_layers

    def hook(module, args, kwargs):
        cache = _cache_of(kwargs)
        current["cache"] = cache
        if cache is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            state = _begin(cache, model.config, n_layers, ids.shape[0], ids.shape[1], ids)
            if "choice" in current:  # the vision encoder ran before this forward (generate): its choice is for us
                from .vision import apply_pending

                apply_pending(state, current)
            mask = kwargs.get("attention_mask")
            if state.active and isinstance(mask, torch.Tensor) and not bool(mask.all()):
                raise KVSieveError(
                    f"{_method(cache).name} cannot prune a padded batch; run the prompts without padding"
                )
        return None

    return hook


def _image_token_ids(config) -> tuple[set[int], set[int]]:
    image = {getattr(config, k, None) for k in ("image_token_id", "image_token_index")} - {None}
    video = {getattr(config, k, None) for k in ("video_token_id", "video_token_index")} - {None}
    return {int(i) for i in image}, {int(i) for i in video}


def tags_from_ids(config, ids: torch.Tensor) -> PassTokens:
    """Tags of a pass's tokens from its ``input_ids`` ``(B, n)`` and the model config's image/video token ids."""
    image, video = _image_token_ids(config)
    modality = torch.zeros(ids.shape, dtype=torch.int8, device=ids.device)
    for token in image:
        modality[ids == token] = MODALITY["image"]
    for token in video:
        modality[ids == token] = MODALITY["video"]
    visual = modality > 0
    starts = visual & ~torch.cat([torch.zeros_like(visual[:, :1]), visual[:, :-1]], dim=1)
    segment = torch.where(visual, starts.long().cumsum(dim=1) - 1, torch.full_like(ids, -1, dtype=torch.long))
    return PassTokens(modality, segment, torch.ones_like(visual))


def _begin(cache, config, n_layers: int, b: int, n: int, ids: torch.Tensor | None, device=None) -> PassState:
    """A new forward pass of ``n`` tokens: its tags, and whether (and in what stages) it is pruned."""
    pending = cache.pass_state.pop(PENDING, None)
    cache.pass_state.pop(PASS, None)
    if ids is not None:
        tokens = tags_from_ids(config, ids)
        device = ids.device
    else:
        tokens = PassTokens(
            torch.zeros(b, n, dtype=torch.int8, device=device),
            torch.full((b, n), -1, dtype=torch.long, device=device),
            torch.ones(b, n, dtype=torch.bool, device=device),
        )
    if pending is not None:
        if tuple(pending.shape) != (b, n):
            raise KVSieveError(
                f"protect() marked {tuple(pending.shape)} tokens but the next pass has {(b, n)}; mark the pass you run"
            )
        tokens.prunable &= pending.to(tokens.prunable.device)
    start = cache.get_seq_length()  # the stream position of the pass's first token
    _record_stream(cache, tokens.modality, start)
    method = _method(cache)
    active = method is not None and n > 1 and cache.compressing
    stages: list[Stage] = []
    candidates = torch.zeros(b, dtype=torch.long)
    if active:
        stages = merged_stages(method.stages(n_layers))
        candidates = _candidates(method, tokens).sum(dim=1).cpu()
        active = any(s.keep < 1.0 for s in stages) and bool((candidates > 0).any())
    rows = torch.arange(n, device=device).expand(b, n)
    state = PassState(n, start, tokens, rows, candidates, stages, active)
    cache.pass_state[PASS] = state
    return state


def _record_stream(cache, modality: torch.Tensor, start: int) -> None:
    """Modality per stream position in ``cache.shared`` (for cache methods), once any token is not text."""
    known = cache.shared.get(STREAM_TAGS)
    if known is None and not bool((modality > 0).any()):
        return
    b = modality.shape[0]
    if known is None:
        known = torch.zeros(b, 0, dtype=torch.int8)
    if known.shape[1] < start:
        known = torch.cat([known, torch.zeros(b, start - known.shape[1], dtype=torch.int8)], dim=1)
    cache.shared[STREAM_TAGS] = torch.cat([known[:, :start], modality.cpu()], dim=1)


def _candidates(method: Pruner, tokens: PassTokens) -> torch.Tensor:
    """Rows ``(B, k)`` the method may drop: in its scope, prunable, never the last token."""
    visual = tokens.modality > 0
    has_visual = bool(visual.any())
    if method.image_only or method.scope == "image":
        if not has_visual:
            raise KVSieveError(
                f"{method.name} prunes image tokens and this prompt has none; pass the image with the prompt, or use "
                f"an in-LLM method with scope='all' (e.g. fastv(scope='all')) for text"
            )
        cand = visual
    elif method.scope == "auto" and has_visual:
        cand = visual
    else:
        cand = torch.ones_like(visual)
    cand = cand & tokens.prunable
    cand[:, -1] = False
    return cand


def _sublayer_hooks(layer_idx: int, kind: str, before_mod, after_mod, current: dict) -> list:
    """Forward hooks giving a method the input and output of a decoder layer's attention or MLP block."""
    box: dict = {}

    def take_before(module, args, output):
        box["before"] = output

    def take_after(module, args, output):
        before = box.pop("before", None)
        cache = current.get("cache")
        state = cache.pass_state.get(PASS) if cache is not None else None
        if state is None or not state.active or before is None:
            return None
        method = _method(cache)
        if method is None or not method.sublayers or layer_idx > max(s.after for s in state.stages):
            return None
        out = output[0] if isinstance(output, tuple) else output
        method.observe_sublayer(state.scratch, layer_idx, kind, before.detach(), out.detach())
        return None

    return [before_mod.register_forward_hook(take_before), after_mod.register_forward_hook(take_after)]


def _layer_hook(layer_idx: int, first: int, layers: dict[int, torch.nn.Module], n_layers: int, current: dict):
    def hook(module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is None:
            return None
        current["cache"] = cache
        hidden = args[0] if args else kwargs["hidden_states"]
        state: PassState | None = cache.pass_state.get(PASS)
        if layer_idx == first and (state is None or state.stash.get("started")):
            # a pass that did not start at the model's forward (the decoder called directly): no tags, all text
            state = _begin(cache, None, n_layers, hidden.shape[0], hidden.shape[1], None, hidden.device)
        if state is None:
            return None
        state.stash["started"] = True
        args, kwargs = list(args), dict(kwargs)
        emb = kwargs.get("position_embeddings")
        if state.active and state.pending is None:
            stage = next((s for s in state.stages if s.after == layer_idx - 1 and s.after >= 0), None)
            if stage is not None:
                now = tuple(_rows(t, state) for t in emb) if isinstance(emb, tuple) else None
                _decide(cache, state, stage, hidden, now, layers)
        if state.pending is not None:
            hidden = hidden.gather(1, state.pending[..., None].expand(-1, -1, hidden.shape[-1]).to(hidden.device))
            state.pending = None
            if layer_idx == first:  # pruned before the LLM: no layer sees these tokens, yet the stream moves on
                dropped = state.n - hidden.shape[1]
                cache.shared[DROPPED_BEFORE_LLM] = cache.shared.get(DROPPED_BEFORE_LLM, 0) + dropped
        if isinstance(kwargs.get("attention_mask"), torch.Tensor) and state.rows.shape[1] < state.n:
            raise KVSieveError(
                "token pruning cannot prune a padded batch (the layers got a mask); run the prompts without padding"
            )
        for name in ("position_ids", "cache_position"):
            if isinstance(kwargs.get(name), torch.Tensor):
                kwargs[name] = _rows(kwargs[name], state)
        if kwargs.get("position_ids") is None:
            # models that hand the layers no 1D positions (Qwen2-VL): the stream positions of the rows, so that the
            # cache records where each kept token was
            kwargs["position_ids"] = (state.rows + state.start).to(hidden.device)
        if isinstance(emb, tuple):
            emb = tuple(_rows(t, state) for t in emb)
            kwargs["position_embeddings"] = emb
        if state.active and any(s.after == layer_idx for s in state.stages):
            state.stash[layer_idx] = (hidden, emb)  # this layer's input: its attention ranks the next stage
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden
        return tuple(args), kwargs

    return hook


def _rows(t: torch.Tensor, state: PassState) -> torch.Tensor:
    """The rows still on of a per-token tensor of the pass: ``(B|1, n, ...)``, ``(sections, B|1, n, ...)`` or ``(n,)``;
    others unchanged."""
    if state.rows.shape[1] == state.n:
        return t
    index = state.rows.to(t.device)
    if t.dim() == 1 and t.shape[0] == state.n:
        return t[index[0]]
    if t.dim() >= 2 and t.shape[1] == state.n:
        if t.shape[0] != index.shape[0]:
            if t.shape[0] != 1:
                raise UnsupportedModelError("per-token tensor and pruning batch sizes differ")
            return t[:, index[0]]
        return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
    if t.dim() >= 3 and t.shape[2] == state.n:
        # M-RoPE sections first (older transformers hand Qwen2-VL's layers cos/sin as (3, B, n, D))
        return torch.stack([_rows(part, state) for part in t])
    return t


def _decide(cache, state: PassState, stage: Stage, hidden: torch.Tensor, emb, layers) -> None:
    """Rank the rows entering the stage and keep the top ones (candidates only; the rest always go on)."""
    method = _method(cache)
    candidates = _candidates(method, state.tokens)
    state.stash[("emb", stage.after + 1)] = emb
    view = StageView(stage, state.stages.index(stage), hidden, state, candidates, layers)
    scores = method.rank(view).float()
    apply_rows(state, keep_top(scores, candidates, state.candidates, stage.keep))
    for key in [k for k in state.stash if k != "started"]:
        state.stash.pop(key)


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, total: torch.Tensor, keep: float) -> torch.Tensor:
    """Rows ``(B, k')`` (sorted) that go on: every non-candidate, and the ``int(keep x total)`` best candidates
    (of equal scores, the earlier row). ``total``: candidates per batch row at the start of the pass."""
    b, k = scores.shape
    target = (total.to(torch.float64) * keep).floor().long()
    have = candidates.sum(dim=1).cpu()
    drop = (have - target).clamp(min=0)
    if b > 1 and len(set(drop.tolist())) > 1:
        raise KVSieveError("the batch rows would keep different numbers of tokens; prune one prompt at a time")
    d = int(drop[0])
    keep_mask = torch.ones(b, k, dtype=torch.bool, device=scores.device)
    if d:
        ranked = scores.masked_fill(~candidates.to(scores.device), float("inf"))
        order = ranked.flip(-1).argsort(dim=-1, stable=True)  # lowest first; of equal scores the later row first
        keep_mask.scatter_(1, (k - 1) - order[:, :d], False)
    return keep_mask.nonzero()[:, 1].view(b, -1)


def apply_rows(state: PassState, keep_rows: torch.Tensor) -> None:
    """Record that the rows ``keep_rows`` ``(B, k')`` (of the ``k`` rows still on) go on from here; per-row scratch
    tensors ``(B, k, ...)`` follow them."""
    k = state.rows.shape[1]
    state.pending = keep_rows
    state.rows = state.rows.gather(1, keep_rows.to(state.rows.device))
    state.tokens = state.tokens.rows(keep_rows.to(state.tokens.modality.device))
    for key, value in list(state.scratch.items()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == k:
            idx = keep_rows.to(value.device)
            state.scratch[key] = value.gather(1, idx.view(*idx.shape, *([1] * (value.dim() - 2))).expand(
                -1, -1, *value.shape[2:]))  # fmt: skip


def decide_pruning(seq: SequenceMethod, cache, pieces: list[tuple], scaling: float, q: int) -> None:
    """Called by the attention path at the method's layer; sequence methods decide in the decoder-layer hooks
    (:func:`install_hooks`), which see the hidden states as well, so there is nothing to do here."""
