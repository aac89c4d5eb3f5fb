"""kvsieve: find the tokens a transformer needs, and act on it at inference time.

>>> import kvsieve
>>> model, tokenizer = kvsieve.load_model()                 # the embedded SmolLM2-135M-Instruct
>>> sieve = kvsieve.Sieve("snapkv", compression=0.5)        # or budget=256 (tokens per layer and head)
>>> with sieve.attach(model) as cache:
...     out = model.generate(**tokenizer("...", return_tensors="pt"), **kvsieve.cache_kwargs(model, cache),
...                          max_new_tokens=32)
>>> cache.kv_tokens(), cache.kv_bytes()

Names are imported on first use (PEP 562), so ``import kvsieve`` and ``kvsieve --help`` load neither torch nor
transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Budget": "sieve",
    "Sieve": "sieve",
    "SieveCache": "cache",
    "SieveLayer": "cache",
    "GenerationResult": "generation",
    "generate": "generation",
    "prefill": "generation",
    "Method": "methods",
    "build": "methods",
    "list_methods": "methods",
    "cache_kwargs": "compat",
    "load_model": "models",
    "load_processor": "models",
    "load_tokenizer": "models",
    "BudgetError": "errors",
    "ContextLengthError": "errors",
    "KVSieveError": "errors",
    "ModelNotFoundError": "errors",
    "UnknownMethodError": "errors",
    "UnsupportedModelError": "errors",
}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kvsieve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
