"""The method catalogue: what ``kvsieve methods`` prints and the README's method tables, from the registry alone.

Every row comes from a method class's metadata (``name``, ``family``, ``paper``, ``needs``, ``simplifications``, its
kind and its fields), so the tables cannot drift from the code: ``tests/test_catalog.py`` checks that the README's
tables are exactly :func:`markdown_tables`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .methods import list_methods


def _jsonable(value: Any) -> Any:
    """A method field's default as JSON: plain values as they are, a wrapped method as its spec, else its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    spec = getattr(value, "spec", None)
    return spec() if callable(spec) else repr(value)


def _default_instance(cls: type) -> Any:
    """The method with its default hyperparameters (a wrapper with its default inner method), or None if it needs
    arguments."""
    try:
        return cls()
    except Exception:  # e.g. a required field: the class attributes describe it instead
        return None


def _method_kind(cls: type, instance: Any) -> str:
    """What the method does to the cache (keep-all, evict, read, ...): the default instance's ``kind``, else the
    class's declared one."""
    for source in (instance, cls):
        for attr in ("kind", "own_kind"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, str):
                return value
    if getattr(cls, "selects", False) is True:
        return "read"
    return "keep-all" if getattr(cls, "evicts", True) is False else "evict"


def _method_fields(cls: type) -> dict[str, Any]:
    if not dataclasses.is_dataclass(cls):
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default_factory())
        else:
            out[f.name] = None  # required: no default
    return out


def method_record(cls: type) -> dict[str, Any]:
    """What ``kvsieve methods --json`` prints for one method class."""
    simplifications = getattr(cls, "simplifications", None)
    instance = _default_instance(cls)
    rerotates = getattr(instance if instance is not None else cls, "rerotate", False) is True
    return {
        "name": cls.name,
        "family": cls.family,
        "paper": cls.paper,
        "needs": cls.needs,
        "kind": _method_kind(cls, instance),
        "positions": "in cache (re-rotated)" if rerotates else "original",
        "simplifications": simplifications if isinstance(simplifications, str) else None,
        "fields": _method_fields(cls),
    }


def records() -> list[dict[str, Any]]:
    """One record per registered method, by name."""
    return [method_record(cls) for cls in list_methods()]


SECTIONS = (
    ("Cache: evict", lambda r: "evict" in r["kind"] and r["kind"] != "read"),
    ("Cache: keep every token (quantise, merge, calibrate)", lambda r: r["kind"] == "keep-all"),
    ("Cache: read selectively at decoding time", lambda r: r["kind"] == "read"),
    ("Attention compute: prefill", lambda r: r["kind"] == "prefill"),
    ("Sequence: prune tokens between layers", lambda r: r["kind"] == "sequence"),
)


def markdown_tables() -> str:
    """The README's method tables: one per action point, every registered method in exactly one."""
    rows = records()
    out = []
    for title, wanted in SECTIONS:
        mine = [r for r in rows if wanted(r)]
        if not mine:
            continue
        out.append(f"#### {title}\n\n")
        out.append("| name | family | paper | needs | simplifications |\n| --- | --- | --- | --- | --- |\n")
        for r in mine:
            cells = [f"`{r['name']}`", r["family"], r["paper"] or "-", r["needs"], r["simplifications"] or "-"]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
        out.append("\n")
    return "".join(out)
