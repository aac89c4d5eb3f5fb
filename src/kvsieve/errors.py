"""Errors kvsieve raises on bad input. Each message names the problem and the fix."""


class KVSieveError(Exception):
    """Base class of every error kvsieve raises on purpose."""


class BudgetError(KVSieveError, ValueError):
    """A compression ratio or token budget that cannot be honoured."""


class UnknownMethodError(KVSieveError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(KVSieveError, ValueError):
    """An architecture or attention implementation kvsieve cannot hook."""


class ContextLengthError(KVSieveError, ValueError):
    """A prompt longer than the model's window for a method that does not stream."""


class ModelNotFoundError(KVSieveError, FileNotFoundError):
    """A missing embedded-model package, GGUF file or local model directory."""
