"""Method registry: one module per method, each a dataclass registered under its paper's short name.

Three kinds of method share the registry and the spec syntax: cache methods (``kind`` ``keep-all``, ``evict``,
``read``), prefill methods (``prefill``: the attention-compute action point) and sequence methods (``sequence``).
Specs compose by wrapping, outermost first: ``"adakv:snapkv"`` is ``AdaKV(inner=SnapKV())``; hyperparameters go in
parentheses as Python literals: ``"adakv(alpha_safeguard=0.1):snapkv(window=16, kernel=7)"``.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import fields

from ..errors import KVSieveError, UnknownMethodError
from .base import Method, Observation

_REGISTRY: dict[str, type] = {}
_loaded = False


def register(cls: type) -> type:
    """Class decorator adding a method (of any kind) to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type]:
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


def list_methods(kind: str | None = None) -> list[type]:
    """Every registered method class, by name; ``kind``: only ``cache``, ``prefill`` or ``sequence`` methods."""
    methods = registry()
    out = [methods[name] for name in sorted(methods)]
    if kind == "cache":
        return [c for c in out if issubclass(c, Method)]
    if kind is not None:
        return [c for c in out if getattr(c, "own_kind", None) == kind]
    return out


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


def build(spec: str):
    """Build a method from a spec string such as ``"snapkv"``, ``"h2o(recent=0.25)"`` or ``"adakv:snapkv"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise KVSieveError(f"a method spec is a non-empty string such as 'snapkv', got {spec!r}")
    parts = [_parse_part(p) for p in _split_top(spec)]
    methods = registry()
    method = None
    for name, kwargs in reversed(parts):
        if name not in methods:
            close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UnknownMethodError(
                f"unknown method {name!r}{hint} (`kvsieve methods` lists them: {', '.join(sorted(methods))})"
            )
        cls = methods[name]
        names = [f.name for f in fields(cls)]
        if method is not None and "inner" not in names:
            wrappers = sorted(n for n, c in methods.items() if "inner" in [f.name for f in fields(c)])
            raise KVSieveError(
                f"{name} does not wrap another method, so {name}:{method.spec()} means nothing; the outer method of "
                f"a composition must be a wrapper ({', '.join(wrappers)}), e.g. quest(read_budget=256):snapkv"
            )
        unknown = [k for k in kwargs if k not in names or k == "inner"]
        if unknown:
            valid = ", ".join(n for n in names if n != "inner") or "none"
            raise KVSieveError(f"{name} has no hyperparameter {', '.join(map(repr, unknown))}; its fields: {valid}")
        method = cls(inner=method, **kwargs) if method is not None else cls(**kwargs)
    assert method is not None
    return method


def _import_all() -> None:
    """Import every module of this package: a module registers its methods when imported (one file per method)."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in ("base", "families"):
            importlib.import_module(f"{__name__}.{info.name}")


__all__ = ["REGISTRY", "Method", "Observation", "build", "list_methods", "register", "registry"]
