"""Method registry: one module per method, each a dataclass registered under its paper's short name.

Specs compose by wrapping, outermost first: ``"adakv:snapkv"`` is ``AdaKV(inner=SnapKV())``; hyperparameters go in
parentheses as Python literals: ``"adakv(alpha_safeguard=0.1):snapkv(window=16, kernel=7)"``.
"""

from __future__ import annotations

import ast

from ..errors import KVSieveError, UnknownMethodError
from .base import Method, Observation

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    """Every registered method by name. Method modules are imported on first use, not when kvsieve is imported,
    so a method module may itself import any part of kvsieve."""
    global _loaded
    if not _loaded:
        _loaded = True
        _import_all()
    return _REGISTRY


def __getattr__(name: str):
    if name == "REGISTRY":
        return registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def list_methods() -> list[type[Method]]:
    methods = registry()
    return [methods[name] for name in sorted(methods)]


def _split_top(spec: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += ch == "("
        depth -= ch == ")"
        if ch == ":" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def _parse_part(part: str) -> tuple[str, dict]:
    part = part.strip()
    if "(" not in part:
        return part, {}
    try:
        call = ast.parse(part, mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as err:
        raise KVSieveError(
            f"cannot parse method spec {part!r}: write name(key=value, ...) with Python literals, "
            "e.g. snapkv(window=16)"
        ) from err
    return call.func.id, kwargs


def build(spec: str) -> Method:
    """Build a method from a spec string such as ``"snapkv"``, ``"h2o(recent=0.25)"`` or ``"adakv:snapkv"``."""
    parts = [_parse_part(p) for p in _split_top(spec)]
    methods = registry()
    method: Method | None = None
    for name, kwargs in reversed(parts):
        if name not in methods:
            raise UnknownMethodError(
                f"unknown method {name!r}; known methods: {', '.join(sorted(methods))} (`kvsieve methods` lists them)"
            )
        cls = methods[name]
        try:
            method = cls(inner=method, **kwargs) if method is not None else cls(**kwargs)
        except TypeError as err:
            raise KVSieveError(f"bad arguments for {name}: {err}") from err
    assert method is not None
    return method


def _import_all() -> None:
    """Import every module of this package: a module registers its methods when imported (one file per method)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["REGISTRY", "Method", "Observation", "build", "list_methods", "register", "registry"]
