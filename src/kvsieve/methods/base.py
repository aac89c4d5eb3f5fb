"""The core abstraction: a method *scores* tokens, a *policy* turns scores and a budget into what each head keeps.

A method is a dataclass whose fields are its hyperparameters. Most methods are only a :meth:`Method.score`; methods
that accumulate evidence over steps (H2O, A2SF) also implement :meth:`Method.observe`; wrappers (AdaKV) override
:meth:`Method.select`. Scores are ``(batch, kv_heads, tokens)``, higher means keep.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

import torch

from ..attention import AttentionRequest
from ..cache import Segment
from ..errors import BudgetError


@dataclass
class Observation:
    """What one layer saw in one forward pass, for the KV heads of one storage segment.

    Shapes (``h`` KV heads in this segment, ``g`` query heads per KV head, ``T`` tokens held *including* the
    ``n_new`` tokens of this pass, which are the last ``n_new``):

    - ``keys``/``values``: ``(B, h, T, D)``, keys as attention saw them (RoPE applied);
    - ``queries``: ``(B, h*g, n_new, D)``, RoPE applied;
    - ``positions``: ``(B, h, T)`` original token positions in the stream;
    - ``valid``: ``(B, h, T)`` real-token flags, None when nothing is padding;
    - ``attention``: ``(B, h*g, T)`` attention summed over the queries the method requested, or None;
    - ``state``: the segment's per-token method state, ``name -> (B, h, T)``, gathered along with the tokens.
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
    budget: int  # tokens to keep (or, for selective reads, to read) per head in this layer now
    layer_state: dict = field(default_factory=dict)  # per-layer method state that is not per token (lives on the layer)
    shared: dict = field(default_factory=dict)  # per-cache state shared by all layers (e.g. TidalDecode's selection)
    head_start: int = 0  # index of this segment's first KV head in the layer

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def attention_per_kv_head(self) -> torch.Tensor:
        """``attention`` averaged over the query heads that share each KV head: ``(B, h, T)``."""
        if self.attention is None:
            raise RuntimeError("this method did not request attention statistics")
        b, hq, t = self.attention.shape
        return self.attention.view(b, self.keys.shape[1], hq // self.keys.shape[1], t).mean(dim=2)


class Method:
    """Base class of every method. Subclasses are dataclasses; their fields are the hyperparameters."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "eviction"
    paper: ClassVar[str] = ""
    needs: ClassVar[str] = "-"  # what it reads, for the `kvsieve methods` table
    evicts: ClassVar[bool] = True
    # True for methods that keep the cache but read only some tokens per decoding step (``reads``); without an
    # evicting inner method, the sieve's budget is then the number of tokens read per step.
    selects: ClassVar[bool] = False

    # True if kept keys move to positions within the cache (StreamingLLM); False keeps original positions.
    # Methods make it a dataclass field where it is a choice; wrappers delegate it to the method they wrap.
    rerotate = False

    # Hooks this class implements only by passing them to ``inner`` (wrappers): they change nothing themselves, so
    # :func:`overrides` looks through them to the wrapped method.
    delegates: ClassVar[tuple[str, ...]] = ()

    @property
    def streams(self) -> bool:
        """True if the method can run past the model's window (positions stay within the cache)."""
        return self.rerotate

    def check_budget(self, tokens: int) -> None:
        """Raise BudgetError if ``tokens`` per head cannot be honoured (e.g. fewer than the sinks)."""

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int) -> int:
        """Tokens per head for ``layer_idx`` given the model-wide per-layer budget (uniform by default)."""
        return budget

    def attention_request(self, evicting: bool) -> AttentionRequest | None:
        """Attention statistics needed this pass; ``evicting`` says whether the layer will be compressed."""
        return None

    def observe(self, obs: Observation) -> None:
        """Update per-token state after every forward pass (accumulators). Default: nothing."""

    def score(self, obs: Observation) -> torch.Tensor:
        """Importance of each held token, ``(B, h, T)``; higher is kept."""
        raise NotImplementedError

    def reads(self, obs: Observation) -> torch.Tensor | None:
        """Selective reads: indices ``(B, h, k)`` of the held tokens this decoding step attends to, or None for all.

        Called before attention when one token is decoded (``obs.attention`` is None; ``obs.budget`` is the read
        budget). The newest token (index ``T - 1``) is always read, whether or not it is listed.
        """
        return None

    def logit_bias(self, obs: Observation) -> torch.Tensor | None:
        """An additive bias on attention logits, ``(B|1, h*g|1, n_new, T)``, or None (calibration methods)."""
        return None

    def merge(self, obs: Observation, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Merging: new ``(keys, values)`` ``(B, h, k, D)`` for the kept tokens ``keep`` ``(B, h, k)``, or None.

        Called after ``select`` with the tokens about to be kept; lets a method fold evicted tokens into kept ones.
        Keys here are as stored (original-position RoPE).
        """
        return None

    def pack(self, segment: Segment) -> Segment:
        """Storage transform after each forward pass (e.g. quantization); returns the segment to keep."""
        return segment

    def select(self, scores: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
        """Indices to keep per segment. Default policy: the top ``budget`` tokens of each head.

        ``scores``: one ``(B, h_s, T_s)`` tensor per storage segment; returns one ``(B, h_s, k_s)`` per segment.
        """
        return [s.topk(min(budget, s.shape[-1]), dim=-1).indices for s in scores]

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


def overrides(method: Method | None, hook: str) -> bool:
    """True if ``method`` or a method it wraps implements ``hook`` itself, rather than inheriting the default or only
    delegating it to ``inner`` (e.g. ``overrides(build("kivi:snapkv"), "pack")`` is True)."""
    while method is not None:
        owner = next(cls for cls in type(method).__mro__ if hook in vars(cls))
        if owner is not Method and hook not in vars(owner).get("delegates", ()):
            return True
        method = getattr(method, "inner", None)
    return False


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
