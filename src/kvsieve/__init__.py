"""kvsieve: find the tokens a transformer needs, and act on it at inference time.

>>> import kvsieve
>>> model, tokenizer = kvsieve.load_model()                 # the embedded SmolLM2-135M-Instruct
>>> sieve = kvsieve.Sieve("snapkv", compression=0.5)        # or budget=256 (tokens per layer and head)
>>> with sieve.attach(model) as cache:
...     out = model.generate(**tokenizer("...", return_tensors="pt"), past_key_values=cache, max_new_tokens=32)
>>> cache.kv_tokens(), cache.kv_bytes()
"""

from .cache import SieveCache, SieveLayer
from .errors import (
    BudgetError,
    ContextLengthError,
    KVSieveError,
    ModelNotFoundError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .generation import GenerationResult, generate, prefill
from .methods import Method, build, list_methods
from .sieve import Budget, Sieve

__version__ = "0.1.0"


def __getattr__(name: str):
    # model loading pulls in gguf/accelerate machinery; import it only when asked for
    if name in ("load_model", "load_tokenizer"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'kvsieve' has no attribute {name!r}")


__all__ = [
    "Budget",
    "BudgetError",
    "ContextLengthError",
    "GenerationResult",
    "KVSieveError",
    "Method",
    "ModelNotFoundError",
    "Sieve",
    "SieveCache",
    "SieveLayer",
    "UnknownMethodError",
    "UnsupportedModelError",
    "build",
    "generate",
    "list_methods",
    "load_model",
    "load_tokenizer",
    "prefill",
]
