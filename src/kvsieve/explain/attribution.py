"""The attribution methods by name, and :func:`attribute`, which runs one of them on a :class:`Problem`."""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVSieveError
from .problem import Problem, check_gradients


@dataclass(frozen=True)
class AttributionInfo:
    name: str
    summary: str
    gradients: bool = False


ATTRIBUTIONS: dict[str, AttributionInfo] = {
    a.name: a
    for a in (
        AttributionInfo("reagent", "ReAGent: recursive replacement by a replacer LM's predictions (Zhao & Shan 2024)"),
        AttributionInfo("attention_chain", "UQAC attention chain backtracked from the target (Li et al. 2025)"),
        AttributionInfo("fai", "Future Attention Influence, global heads (Preplan-and-Anchor)"),
        AttributionInfo("waad", "Windowed Average Attention Distance, local heads (Preplan-and-Anchor)"),
        AttributionInfo("saliency", "|gradient| of the target probability w.r.t. the embeddings", True),
        AttributionInfo("input_x_gradient", "embedding x gradient", True),
        AttributionInfo("integrated_gradients", "integrated gradients from a zero baseline (50 steps)", True),
        AttributionInfo("attention_last_layer", "last layer's attention from the predicting position"),
        AttributionInfo("attention_rollout", "attention rollout over all layers (Abnar & Zuidema 2020)"),
        AttributionInfo("random", "uniform random scores (the faithfulness baseline; seeded)"),
    )
}
DEFAULT_ATTRIBUTIONS = ("reagent", "attention_chain", "integrated_gradients", "attention_rollout")
METHOD_PREFIX = "method:"


_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$", re.S)
_PARAMS = {
    "reagent": ("rational_size", "top_k", "replacing_ratio", "num_probes", "max_steps"),
    "attention_chain": ("n_heads", "buffer", "threshold", "min_length", "min_similarity", "max_prob"),
    "integrated_gradients": ("n_steps", "batch"),
    "waad": ("window",),
}


def parse(name: str) -> tuple[str, dict[str, Any]]:
    """``"reagent(num_probes=4, max_steps=100)"`` -> ``("reagent", {...})``; KVSieveError on a bad spec."""
    m = _SPEC.match(name)
    if m is None:
        raise KVSieveError(f"bad attribution spec {name!r}; write a name such as reagent or reagent(num_probes=4)")
    base, args = m.group(1), m.group(2)
    kwargs: dict[str, Any] = {}
    if args and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, AssertionError):
            raise KVSieveError(
                f"bad arguments in {name!r}; write keyword=value pairs, e.g. reagent(num_probes=4)"
            ) from None
    allowed = _PARAMS.get(base, ())
    for key, value in kwargs.items():
        if key not in allowed:
            what = ", ".join(allowed) if allowed else "none"
            raise KVSieveError(f"{base} has no parameter {key!r}; its parameters: {what}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise KVSieveError(f"{base}: {key} must be a non-negative number; got {value!r}")
    return base, kwargs


def check_name(name: str) -> None:
    """KVSieveError unless ``name`` is an attribution method or ``method:<spec>`` of an evicting cache method."""
    if not isinstance(name, str) or not name.strip():
        raise KVSieveError("an attribution method name is empty; use one of " + ", ".join(ATTRIBUTIONS))
    if name.startswith(METHOD_PREFIX):
        from .scorer import scorer_method

        scorer_method(name[len(METHOD_PREFIX) :])
        return
    base, _ = parse(name)
    if base not in ATTRIBUTIONS:
        import difflib

        close = difflib.get_close_matches(base, list(ATTRIBUTIONS), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise KVSieveError(
            f"unknown attribution method {base!r}{hint}; use one of {', '.join(ATTRIBUTIONS)}, or method:<spec> for a "
            "kvsieve cache method's scores (e.g. method:snapkv)"
        )


def needs_gradients(name: str) -> bool:
    info = None if name.startswith(METHOD_PREFIX) else ATTRIBUTIONS.get(parse(name)[0])
    return bool(info and info.gradients)


def random_scores(problem: Problem) -> torch.Tensor:
    out = problem.empty_scores()
    gen = torch.Generator().manual_seed(problem.seed)
    for t in range(problem.n_steps):
        n = problem.n_prompt + t
        out[t, :n] = torch.rand(n, generator=gen, dtype=torch.float64)
    return out


def _runner(name: str, replacer: torch.nn.Module | None) -> Callable[[Problem], tuple[torch.Tensor, dict]]:
    if name.startswith(METHOD_PREFIX):
        from .scorer import method_scores

        spec = name[len(METHOD_PREFIX) :]
        return lambda p: (method_scores(p, spec), {})
    base, kwargs = parse(name)
    if base == "reagent":
        from .reagent import ReagentConfig, reagent

        config = ReagentConfig(**kwargs)
        return lambda p: reagent(p, replacer=replacer, config=config)
    if base in ("saliency", "input_x_gradient", "integrated_gradients"):
        from . import gradients

        fn = getattr(gradients, base)
        return lambda p: (fn(p, **kwargs), {})
    if base == "random":
        return lambda p: (random_scores(p), {})
    from . import attention_maps

    fn = getattr(attention_maps, base)
    return lambda p: (fn(p, **kwargs), {})


def attribute(problem: Problem, name: str, replacer: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict]:
    """Scores ``(n_steps, width)`` of attribution ``name`` on ``problem``, plus ``{"seconds": ..., ...}``."""
    check_name(name)
    if needs_gradients(name):
        check_gradients(problem.model, name)
    t0 = time.perf_counter()
    scores, info = _runner(name, replacer)(problem)
    return scores, {**info, "seconds": time.perf_counter() - t0}
