"""The core abstractions of the three action points.

**Cache methods** (:class:`Method`): a method *scores* held tokens, a *policy* (``select``) turns scores and a budget
into what each head keeps. A method is a dataclass whose fields are its hyperparameters and nothing else: run state
lives in the cache (``obs.state`` per token, ``obs.layer_state`` per layer, ``obs.shared`` per cache). Its
:attr:`Method.kind` says what it does to the cache:

- ``keep-all``: keeps every token (``full``; quantisers and calibrations on their own);
- ``evict``: keeps a budget of tokens (``snapkv``, ``h2o``, ...);
- ``read``: keeps every token but attends to a budget of them per decoding step (``quest``, ...);
- ``evict+read``: a read method around an evicting one (``quest(read_budget=256):snapkv``).

Wrappers (:class:`Wrapper`) compose by wrapping, outermost first (``adakv:snapkv``): every hook goes to ``inner``
unless the wrapper implements it. The hooks, in the order one forward pass calls them per layer
(:mod:`kvsieve.pipeline`): ``layer_budget`` -> ``attention_request`` -> ``logit_bias``/``reads`` (attention) ->
``observe`` -> [evicting:] ``score`` -> ``select`` -> ``merge`` -> ``pack``.

**Prefill methods** (:class:`PrefillMethod`, the *attention compute* action point) compute one layer's attention for a
prefill pass, e.g. block-sparse; **sequence methods** (:class:`SequenceMethod`) drop tokens' hidden states between
decoder layers. Both are separate axes of a ``Sieve`` and compose with any cache method.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..attention import AttentionCall, AttentionRequest
from ..errors import BudgetError, KVSieveError
from ..storage import Segment

HOOKS = (
    "check_budget", "layer_budget", "attention_request", "observe", "score", "select", "merge", "pack", "reads",
    "logit_bias",
)  # fmt: skip


@dataclass
class LayerContext:
    """Where a hook runs: the layer, what it has seen, and the run state it may use (owned by the cache)."""

    layer_idx: int
    n_layers: int
    seen: int  # tokens this layer has seen so far, this pass's new tokens included (real or padding)
    n_new: int  # tokens added by this forward pass
    layer_state: dict = field(default_factory=dict)  # per-layer method state (lives on the cache layer)
    shared: dict = field(default_factory=dict)  # per-cache state shared by all layers


@dataclass
class Observation:
    """What one layer saw in one forward pass, for the KV heads of one storage segment.

    Shapes (``h`` KV heads in this segment, ``g`` query heads per KV head, ``T`` tokens held *including* the
    ``n_new`` tokens of this pass, which are the last ``n_new`` slots). Slots are not in stream order once tokens
    were evicted at decoding time: use ``positions`` for order (recent, neighbours, sinks).

    - ``keys``/``values``: ``(B, h, T, D)``, keys as attention sees them (RoPE applied);
    - ``queries``: ``(B, h*g, n_new, D)``, RoPE applied;
    - ``positions``: ``(B, h, T)`` token positions in the stream;
    - ``valid``: ``(B, h, T)`` real-token flags, None when nothing is padding;
    - ``attention``: ``(B, h*g, T)`` attention summed over the queries the method requested, or None;
    - ``state``: the segment's per-token method state, ``name -> (B, h, T)``, moved along with the tokens.

    ``budget`` is the keep budget of this layer now (tokens per head), or the tokens held when nothing is evicted;
    ``read_budget`` the tokens a read method attends to this decoding step (None: every held token).
    """

    layer_idx: int
    n_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None
    attention: torch.Tensor | None
    state: dict[str, torch.Tensor]
    n_new: int
    scaling: float
    budget: int
    layer_state: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    head_start: int = 0  # index of this segment's first KV head in the layer
    read_budget: int | None = None
    seen: int = 0  # tokens this layer has seen, the new ones included
    module: torch.nn.Module | None = None  # the layer's attention module (its weights, e.g. o_proj), when live

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def attention_per_kv_head(self) -> torch.Tensor:
        """``attention`` averaged over the query heads that share each KV head: ``(B, h, T)``."""
        if self.attention is None:
            raise RuntimeError("this method did not request attention statistics")
        b, hq, t = self.attention.shape
        return self.attention.view(b, self.keys.shape[1], hq // self.keys.shape[1], t).mean(dim=2)

    def stream_order(self) -> torch.Tensor:
        """Slot indices ``(B, h, T)`` sorting the held tokens by stream position (for neighbourhoods)."""
        return self.positions.argsort(dim=-1, stable=True)


class Hyperparameters:
    """Checks a dataclass's field values against their annotations and ``field(metadata=...)`` bounds.

    Metadata keys: ``ge``/``gt``/``le``/``lt`` (numbers), ``choices`` (a tuple), ``odd`` (True). Annotations may be
    ``int``, ``float``, ``bool``, ``str``, ``tuple``, ``Any``, a ``Method`` and ``X | None`` unions of those.
    """

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            _check_field(type(self).name or type(self).__name__, f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields; raise KVSieveError with the fix."""


_SIMPLE = {"int", "float", "bool", "str", "tuple", "list", "None", "Any", "Method", "dict"}


def _check_field(owner: str, f, value: Any) -> None:
    allowed = [t.strip() for t in str(f.type).split("|")]
    if not set(allowed) <= _SIMPLE:
        return
    what = f"{owner}: {f.name}"
    if not any(_is(value, t) for t in allowed):
        kinds = " or ".join("None" if t == "None" else f"a{'n' if t[0] in 'aeiouAEIOU' else ''} {t}" for t in allowed)
        raise KVSieveError(f"{what} must be {kinds}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise KVSieveError(f"{what} must be a finite number, got {value!r}")
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        raise KVSieveError(f"{what} must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, text in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            if key in meta and not ok(value, meta[key]):
                raise KVSieveError(f"{what} must be {text} {meta[key]}, got {value!r}")
        if meta.get("odd") and value % 2 != 1:
            raise KVSieveError(f"{what} must be odd (pooling stays centred), got {value!r}")


def _is(value: Any, kind: str) -> bool:
    if kind == "Any":
        return True
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("tuple", "list"):
        return isinstance(value, (tuple, list))
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "Method":
        return isinstance(value, Method)
    return True


def hp(default: Any, **bounds: Any) -> Any:
    """A hyperparameter field with bounds checked at construction: ``window: int = hp(32, ge=1)``."""
    return field(default=default, metadata=bounds)


class Method(Hyperparameters):
    """Base class of every cache method. Subclasses are dataclasses; their fields are the hyperparameters.

    Class metadata (shown by ``kvsieve methods`` and the README's generated table): ``name``, ``family``, ``paper``,
    ``needs`` (what it reads), ``simplifications`` (where it departs from the paper; '' for none) and ``own_kind``.
    ``batch``: ``"any"``; ``"unpadded"`` for methods whose work depends on slot layout, so a left-padded row would
    not get what it gets alone (they refuse padded batches); ``"single"`` for policies defined per sequence. Checked
    before a forward pass runs (:func:`batch_rule` combines a wrapper chain's).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "eviction"
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = "-"
    simplifications: ClassVar[str] = ""
    own_kind: ClassVar[str] = "evict"
    batch: ClassVar[str] = "any"

    # True if kept keys move to positions within the cache (StreamingLLM). Methods make it a field where it is a
    # choice; wrappers report their inner method's.
    rerotate = False

    # --- what the method does --------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``keep-all``, ``evict``, ``read`` or ``evict+read`` (see the module docstring)."""
        return self.own_kind

    @property
    def evicts(self) -> bool:
        return "evict" in self.kind

    @property
    def selects(self) -> bool:
        """True if the method attends to a subset of the held tokens at each decoding step."""
        return "read" in self.kind

    @property
    def streams(self) -> bool:
        """True if the method can run past the model's window (positions stay within the cache)."""
        return self.rerotate

    # --- hooks -------------------------------------------------------------------------------------------------------
    def check_budget(self, tokens: int) -> None:
        """Raise BudgetError if ``tokens`` per head cannot be honoured (e.g. fewer than the sinks)."""

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        """Tokens per head for layer ``ctx.layer_idx`` given the model-wide per-layer budget (uniform by default)."""
        return budget

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        """Attention statistics needed this pass; ``evicting`` says whether the layer will be compressed."""
        return None

    def observe(self, obs: Observation) -> None:
        """Update per-token state after every forward pass (accumulators). Must not depend on ``obs.budget``: the
        shared prefill runs it once for every budget. Default: nothing."""

    def score(self, obs: Observation) -> torch.Tensor:
        """Importance of each held token, ``(B, h, T)``; higher is kept. Runs at every pass that evicts."""
        raise KVSieveError(f"{self.name} keeps every token and scores none")

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        """Indices to keep per segment. Default policy: the top ``budget`` tokens of each head.

        ``scores``: one ``(B, h_s, T_s)`` tensor per storage segment; returns one ``(B, h_s, k_s)`` per segment, or
        one ``(B, 1, k_h)`` per KV head of a single segment (head-wise budgets, which split storage per head).
        """
        return [top_slots(s, budget) for s in scores]

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Merging: new ``(keys, values)`` ``(B, h, k, D)`` for the kept slots ``keep`` ``(B, h, k)`` (sorted), or None.

        Called after ``select`` with the slots about to be kept; lets a method fold evicted tokens into kept ones.
        """
        return None

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        """Storage transform after each forward pass (e.g. quantisation); returns the segment to keep."""
        return segment

    def reads(self, obs: Observation) -> torch.Tensor | None:
        """Selective reads: slots ``(B, h, k)`` this decoding step attends to, or None for all.

        Called before attention when one token is decoded (``obs.attention`` is None; ``obs.read_budget`` is the
        number to read). The newest token (slot ``T - 1``) is always read, whether or not it is listed.
        """
        return None

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        """An additive bias on attention logits, ``(B|1, h*g|1, n_new, T)``, or None (calibration methods)."""
        return None

    # --- description -------------------------------------------------------------------------------------------------
    def params(self) -> dict:
        """Hyperparameters as a plain dict (wrapped methods nested)."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = {"method": value.name, **value.params()} if isinstance(value, Method) else value
        return out

    def spec(self) -> str:
        """The canonical string that :func:`kvsieve.methods.build` parses back into this method."""
        defaults = {f.name: f.default for f in fields(self) if f.default is not MISSING}  # type: ignore[arg-type]
        changed = {k: v for k, v in self._plain_params().items() if defaults.get(k, MISSING) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        head = f"{self.name}({args})" if args else self.name
        inner = getattr(self, "inner", None)
        return f"{head}:{inner.spec()}" if isinstance(inner, Method) else head

    def _plain_params(self) -> dict:
        return {k: v for k, v in self.params().items() if not isinstance(v, dict)}


def _combine(*kinds: str) -> str:
    parts = {p for k in kinds for p in k.split("+")} - {"keep-all"}
    return "+".join(p for p in ("evict", "read") if p in parts) or "keep-all"


@dataclass
class Wrapper(Method):
    """A method around ``inner``: every hook goes to ``inner`` unless the subclass implements it.

    ``default_inner``: the spec built when no inner method is given (None: the wrapper works without one).
    ``own_kind``: what the wrapper adds (``keep-all`` for storage and calibration wrappers, ``evict`` for budget
    policies, ``read`` for selective reads); its :attr:`kind` combines it with the inner method's.
    """

    inner: Method | None = None

    default_inner: ClassVar[str | None] = None
    own_kind: ClassVar[str] = "keep-all"

    def __post_init__(self) -> None:
        if self.inner is None and self.default_inner is not None:
            from . import build

            self.inner = build(self.default_inner)
        super().__post_init__()
        if self.inner is not None:
            self._check_inner(self.inner)

    def _check_inner(self, inner: Method) -> None:
        """Compositions that cannot work, refused with the one that does."""
        if self.own_kind == "evict" and not inner.evicts:
            raise KVSieveError(
                f"{self.name} allocates what an evicting method keeps; {inner.spec()} keeps every token. "
                f"Wrap a scorer, e.g. {self.name}:snapkv"
            )
        for hook, what in (("select", "which tokens each head keeps"), ("layer_budget", "the layer budgets")):
            if _defines(type(self), hook) and overrides(inner, hook):
                raise KVSieveError(
                    f"{self.name} and {inner.spec()} both decide {what}, so one would be ignored; use one of them, "
                    f"e.g. {self.name}:snapkv"
                )

    @property
    def kind(self) -> str:
        return _combine(self.own_kind, self.inner.kind if self.inner is not None else "keep-all")

    @property
    def rerotate(self) -> bool:  # type: ignore[override]
        return self.inner is not None and self.inner.rerotate

    @property
    def _in(self) -> Method:
        if self.inner is None:
            raise KVSieveError(f"{self.name} has no inner method to score tokens; write {self.name}:<method>")
        return self.inner

    def check_budget(self, tokens: int) -> None:
        if self.inner is not None:
            self.inner.check_budget(tokens)

    def layer_budget(self, budget: int, ctx: LayerContext) -> int:
        return self.inner.layer_budget(budget, ctx) if self.inner is not None else budget

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        return self.inner.attention_request(evicting) if self.inner is not None else None

    def observe(self, obs: Observation) -> None:
        if self.inner is not None:
            self.inner.observe(obs)

    def score(self, obs: Observation) -> torch.Tensor:
        return self._in.score(obs)

    def select(self, scores: list[torch.Tensor], budget: int, ctx: LayerContext) -> list[torch.Tensor]:
        return self.inner.select(scores, budget, ctx) if self.inner is not None else super().select(scores, budget, ctx)

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.merge(obs, keep) if self.inner is not None else None

    def pack(self, segment: Segment, ctx: LayerContext) -> Segment:
        return self.inner.pack(segment, ctx) if self.inner is not None else segment

    def reads(self, obs: Observation) -> torch.Tensor | None:
        return self.inner.reads(obs) if self.inner is not None else None

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        return self.inner.logit_bias(obs) if self.inner is not None else None


def _defines(cls: type, hook: str) -> bool:
    """True if ``cls`` implements ``hook`` itself rather than inheriting Method's default or Wrapper's delegation."""
    owner = next(c for c in cls.__mro__ if hook in vars(c))
    return owner not in (Method, Wrapper)


def overrides(method: Method | None, hook: str) -> bool:
    """True if ``method`` or a method it wraps implements ``hook``.

    E.g. ``overrides(build("kivi:snapkv"), "pack")`` is True.
    """
    while method is not None:
        if _defines(type(method), hook):
            return True
        method = getattr(method, "inner", None)
    return False


def batch_rule(method: Method | None) -> str:
    """The strictest ``batch`` rule of ``method`` and the methods it wraps: ``any``, ``unpadded`` or ``single``."""
    order = ("any", "unpadded", "single")
    rule = "any"
    while method is not None:
        rule = max(rule, getattr(type(method), "batch", "any"), key=order.index)
        method = getattr(method, "inner", None)
    return rule


def read_budget_of(method: Method) -> int | float | None:
    """The ``read_budget`` hyperparameter of the read method in ``method``'s wrapper chain, if any."""
    while method is not None:
        if getattr(method, "read_budget", None) is not None:
            return method.read_budget
        method = getattr(method, "inner", None)
    return None


class _Standalone(Hyperparameters):
    """``spec()`` and ``params()`` of an action-point method that wraps nothing (prefill and sequence methods)."""

    def spec(self) -> str:
        return Method.spec(self)  # type: ignore[arg-type]

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def _plain_params(self) -> dict:
        return self.params()


@dataclass
class PrefillMethod(_Standalone):
    """The attention-compute action point: how one layer's attention is computed for a prefill pass.

    Subclasses are dataclasses of hyperparameters implementing :meth:`attend`. The core calls it for passes of more
    than one new token (prefill and prefill chunks) on full-attention layers; decoding stays dense (or uses a read
    method). Cache methods' statistics are computed from queries and keys as with dense attention.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "sparse prefill"
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = "queries and keys"
    simplifications: ClassVar[str] = ""
    own_kind: ClassVar[str] = "prefill"
    kind = "prefill"
    exact: ClassVar[bool] = False  # True: equals dense attention (bitwise for ``dense``)

    def attend(self, call: AttentionCall) -> torch.Tensor:
        """Attention output ``(B, q, Hq, D)`` for ``call`` (see :class:`~kvsieve.attention.AttentionCall`)."""
        raise NotImplementedError


@dataclass
class SequenceMethod(_Standalone):
    """The sequence action point: which tokens' hidden states go on past decoder layer ``layer`` in a prefill pass.

    At layer ``layer`` the core computes the statistics of :meth:`attention_request` for this pass's queries, calls
    :meth:`score` and keeps the top ``keep`` share of the pass's tokens (the last token always); the decoder layers
    after it compute on those rows only, and cache only them. Decoding steps are never pruned.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "token pruning"
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = "attention at the pruning layer"
    simplifications: ClassVar[str] = ""
    own_kind: ClassVar[str] = "sequence"
    kind = "sequence"

    layer: int = hp(2, ge=0)
    keep: float = hp(0.5, gt=0.0, le=1.0)

    def attention_request(self) -> AttentionRequest:
        return AttentionRequest(last=1)

    def score(self, obs: Observation) -> torch.Tensor:
        """Importance ``(B, n_new)`` of this pass's new tokens (higher goes on)."""
        raise NotImplementedError

    def n_keep(self, n_new: int) -> int:
        return max(1, int(n_new * self.keep))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Positions ``(B, k)`` within the pass (sorted) of the tokens that go on; the last one always does."""
        scores = scores.clone()
        scores[:, -1] = float("inf")
        k = self.n_keep(scores.shape[-1])
        return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def top_slots(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Slots of the ``k`` highest scores per row, ties broken by slot (lower first), so that equal scores (tokens
    forced in with +inf) are chosen the same way whatever precedes them: ``(B, h, k)``."""
    t = scores.shape[-1]
    k = min(k, t)
    if k == t - 1:  # one token goes (every decoding step of a per-step budget): find it in O(T), not by sorting
        flipped = scores.flip(-1)  # the last slot among equal lowest scores is the one a stable sort drops
        victim = (t - 1) - flipped.argmin(dim=-1, keepdim=True)
        slots = torch.arange(k, device=scores.device).expand(*scores.shape[:-1], k)
        return slots + (slots >= victim).to(slots.dtype)
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def top_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The slots :func:`top_slots` picks (ties: lower slot first), in slot order, found in O(T) (``kthvalue``)
    rather than by sorting: for callers that need the set, not the ranking. ``scores`` ``(..., T)``, no NaN."""
    t = scores.shape[-1]
    k = min(k, t)
    kth = scores.kthvalue(t - k + 1, dim=-1, keepdim=True).values  # the k-th highest score of each row
    above = scores > kth
    tied = scores == kth
    # every slot above the k-th score, then the lowest tied slots until the row has k
    keep = above | (tied & (tied.cumsum(dim=-1) <= k - above.sum(dim=-1, keepdim=True)))
    return keep.nonzero()[:, -1].view(*scores.shape[:-1], k)


def check_sinks_fit(tokens: int, n_sink: int, what: str) -> None:
    """A budget must hold the sinks plus at least one recent token."""
    if tokens < n_sink + 1:
        raise BudgetError(
            f"budget of {tokens} tokens is smaller than {what}'s {n_sink} sink tokens plus one recent token; "
            f"use a budget of at least {n_sink + 1} tokens, or lower n_sink."
        )


def recent_mask(positions: torch.Tensor, n_recent: int) -> torch.Tensor:
    """True for the ``n_recent`` most recent tokens of each (batch, head), by position: ``(B, h, T)``."""
    if n_recent <= 0:
        return torch.zeros_like(positions, dtype=torch.bool)
    t = positions.shape[-1]
    if n_recent >= t:
        return torch.ones_like(positions, dtype=torch.bool)
    threshold = positions.topk(n_recent, dim=-1).values[..., -1:]
    return positions >= threshold


def pool_in_stream_order(
    scores: torch.Tensor, positions: torch.Tensor, kernel: int, pooling: str, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """1D pooling of ``scores`` ``(B, h, T)`` over neighbours in the stream (slots may be out of order).

    Only real tokens are neighbours: padding (``valid`` False, at position -1) counts as absent, like the edges.
    """
    import torch.nn.functional as F

    order = positions.argsort(dim=-1, stable=True)
    ordered = scores.gather(-1, order)
    b, h, t = ordered.shape
    flat = ordered.reshape(b * h, 1, t)
    pad = kernel // 2
    if valid is None:
        if pooling == "avg":
            pooled = F.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=False)
        else:
            pooled = F.max_pool1d(flat, kernel, stride=1, padding=pad)
    else:
        real = valid.expand(b, h, t).gather(-1, order).reshape(b * h, 1, t).to(flat.dtype)
        if pooling == "avg":
            total = F.avg_pool1d(flat * real, kernel, stride=1, padding=pad, count_include_pad=True)
            count = F.avg_pool1d(real, kernel, stride=1, padding=pad, count_include_pad=True)
            pooled = total / count.clamp(min=1e-9)
        else:
            pooled = F.max_pool1d(flat.masked_fill(real == 0, float("-inf")), kernel, stride=1, padding=pad)
    return torch.empty_like(scores).scatter_(-1, order, pooled.reshape(b, h, t))
