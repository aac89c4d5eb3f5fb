"""``kvsieve.explain``: which input tokens caused each generated token, by attribution methods side by side.

>>> import kvsieve.explain
>>> result = kvsieve.explain(model, tokenizer, "The capital of France is", target=" Paris",
...                          method=["reagent", "integrated_gradients", "method:snapkv"])
>>> result.scores["reagent"]            # (target tokens, context tokens), NaN past each step's context
>>> result.write("out/")                # out/explanation.json and out/explanation.html

Methods (:data:`~kvsieve.explain.attribution.ATTRIBUTIONS`): ``reagent``, ``attention_chain``, ``fai``, ``waad``,
``saliency``, ``input_x_gradient``, ``integrated_gradients``, ``attention_last_layer``, ``attention_rollout``,
``random`` and ``method:<spec>`` (any evicting kvsieve cache method's eviction scores, read through the core). With
no ``target`` the model's greedy continuation (``max_new_tokens``) is explained. :mod:`kvsieve.explain.faithfulness`
measures how faithful each method's scores are (comprehensiveness and sufficiency).

``kvsieve.explain`` is both this package and the function: calling the module calls :func:`explain`.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# names load on first use (PEP 562), so `kvsieve explain --help` imports no torch
_WHERE = {
    "ATTRIBUTIONS": "attribution",
    "DEFAULT_ATTRIBUTIONS": "attribution",
    "attribute": "attribution",
    "check_name": "attribution",
    "Explanation": "result",
    "explain": "result",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvsieve.explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


class _CallableModule(types.ModuleType):
    """``kvsieve.explain(...)`` works whether ``kvsieve.explain`` resolves to this package or to the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .result import explain

        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
