"""``rerotate``: key re-rotation around any evicting method, so positions are re-indexed within the cache.

kvpress's ``KeyRerotationPress`` (the position handling of StreamingLLM, Xiao et al. 2024, arXiv:2309.17453, and of
FINCH, Corallo & Papotti 2024, arXiv:2408.00167). After an eviction, kept keys are rotated as if they sat at their
indices within the cache, so the distance between a query and a key is the number of tokens held between them, not
the number seen; with this a method can also run past the model's window.

The core does the rotation (see :mod:`kvsieve.cache`): a layer of a method whose ``rerotate`` is True stores each key
rotated by its *shift* (the evicted tokens that came after it) and re-rotates from the pristine key at every
eviction, so nothing accumulates and keys with shift 0 are bit for bit the model's. This wrapper only turns that on for
the method it wraps; it is exact in the same way as ``streaming_llm``'s re-rotation.

As in kvpress's pipeline (which continues the question's positions from the compressed length), the next token's
position is its index in the cache. Limits: every layer must be full attention (the core refuses sliding-window
models); the wrapped method must keep the same number of tokens in every head (a head-wise policy such as ``adakv``
is refused) and must not merge tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import KVSieveError
from . import register
from .base import Method, Wrapper, overrides


def _chain(method: Method | None):
    while method is not None:
        yield method
        method = getattr(method, "inner", None)


@register
@dataclass
class Rerotate(Wrapper):
    """Wraps ``inner``: what it keeps, with keys re-rotated to their positions within the cache (exact)."""

    name = "rerotate"
    family = "position handling"
    paper = "kvpress KeyRerotationPress (StreamingLLM's re-indexing, arXiv:2309.17453)"
    needs = "the wrapped method's needs"
    simplifications = (
        "none: exact re-rotation by the core (keys rotated from their pristine values at every eviction); refuses "
        "head-wise budgets, merging and sliding-window models"
    )
    own_kind = "evict"

    @property
    def rerotate(self) -> bool:  # type: ignore[override]
        return True

    def validate(self) -> None:
        if self.inner is None:
            raise KVSieveError("rerotate re-indexes what a method keeps: write rerotate:<method>, e.g. rerotate:snapkv")

    def _check_inner(self, inner: Method) -> None:
        super()._check_inner(inner)
        from .families import HeadwiseRetention

        for m in _chain(inner):
            headwise = getattr(type(m), "batch", "any") == "single" and overrides(m, "select")
            if headwise or isinstance(m, HeadwiseRetention):
                raise KVSieveError(
                    f"rerotate needs every head to keep the same number of tokens; {m.spec()} gives heads different "
                    "budgets. Wrap a method with one budget per layer, e.g. rerotate:snapkv"
                )
        if overrides(inner, "merge"):
            raise KVSieveError(f"{inner.spec()} merges tokens, which re-indexed positions cannot keep exact")
