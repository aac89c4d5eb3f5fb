""":func:`explain` and its result, :class:`Explanation` (JSON and a self-contained HTML page)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import KVSieveError
from .attribution import DEFAULT_ATTRIBUTIONS, METHOD_PREFIX, attribute, check_name, needs_gradients
from .problem import Problem, check_gradients, check_window, target_ids

JSON_FILE = "explanation.json"
HTML_FILE = "explanation.html"
DEFAULT_MAX_NEW_TOKENS = 8


@dataclass
class Explanation:
    """Scores of every attribution method for every target token over its context.

    ``scores[name]`` is ``(n_steps, n_prompt + n_steps - 1)``: row ``t`` scores the context of target token ``t``
    (the prompt and the target tokens before it) and is NaN beyond it. ``faithfulness`` (when measured) maps each
    method to its comprehensiveness and sufficiency per share of tokens (:mod:`kvsieve.explain.faithfulness`).
    """

    model: str
    tokens: list[str]
    n_prompt: int
    target_probs: list[float]
    scores: dict[str, torch.Tensor]
    info: dict[str, dict] = field(default_factory=dict)
    faithfulness: dict[str, Any] | None = None
    generated: bool = False

    @property
    def n_steps(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def target(self) -> str:
        return "".join(self.tokens[self.n_prompt :])

    def to_dict(self) -> dict[str, Any]:
        def row(t: int, values: torch.Tensor) -> list[float]:
            return [round(float(v), 7) for v in values[t, : self.n_prompt + t]]

        return {
            "format": "kvsieve-explanation",
            "version": 1,
            "model": self.model,
            "tokens": self.tokens,
            "n_prompt": self.n_prompt,
            "target": self.target,
            "target_generated": self.generated,
            "target_probs": [round(p, 7) for p in self.target_probs],
            "methods": list(self.scores),
            "scores": {name: [row(t, s) for t in range(self.n_steps)] for name, s in self.scores.items()},
            "info": self.info,
            "faithfulness": self.faithfulness,
        }

    def write(self, out_dir: str | Path, command: str | None = None) -> tuple[Path, Path]:
        """Write ``out_dir/explanation.json`` and ``out_dir/explanation.html`` (atomically); returns both paths."""
        from .report import render

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if command:
            data["command"] = command
        paths = []
        for name, text in ((JSON_FILE, json.dumps(data, indent=1) + "\n"), (HTML_FILE, render(data))):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=out)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                os.chmod(tmp, 0o644)
                os.replace(tmp, out / name)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            paths.append(out / name)
        return paths[0], paths[1]


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's ids ``(1, n)``; wrapped in the chat template (with the assistant header) when ``chat``."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def _methods(method: str | Sequence[str]) -> list[str]:
    names = [method] if isinstance(method, str) else list(method)
    if not names:
        raise KVSieveError("no attribution method given; pass method='reagent' or a list such as ['reagent', 'fai']")
    for name in names:
        check_name(name)
    if len(set(names)) != len(names):
        raise KVSieveError(f"attribution methods repeat in {names}; name each once")
    return names


def explain(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    target: str | None = None,
    method: str | Sequence[str] = DEFAULT_ATTRIBUTIONS,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    chat: bool = False,
    seed: int = 0,
    replacer: torch.nn.Module | None = None,
    faithfulness: bool = False,
    shares: Sequence[float] = (0.1, 0.25, 0.5),
    model_name: str | None = None,
) -> Explanation:
    """Attribute ``target`` (or the model's greedy continuation of ``max_new_tokens``) to the prompt's tokens.

    ``method``: one name or several (:data:`~kvsieve.explain.attribution.ATTRIBUTIONS`, or ``method:<spec>``).
    ``chat``: wrap the prompt in the tokenizer's chat template. ``replacer``: ReAGent's replacement model (same
    vocabulary; default the model itself). ``faithfulness``: also measure comprehensiveness and sufficiency at the
    given ``shares`` of the prompt's tokens, with a random baseline. Every input is checked before the model runs.
    """
    names = _methods(method)
    if not isinstance(prompt, str) or not prompt.strip():
        raise KVSieveError("the prompt is empty; pass some text to explain")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise KVSieveError(f"max_new_tokens must be a whole number >= 1; got {max_new_tokens!r}")
    for name in names:
        if needs_gradients(name):
            check_gradients(model, name)
    ids = prompt_ids(tokenizer, prompt, chat)
    n_prompt = int(ids.shape[1])
    if target is not None:
        tail = torch.tensor([target_ids(tokenizer, target)])
        check_window(model, n_prompt + tail.shape[1])
        generated = False
    else:
        check_window(model, n_prompt + max_new_tokens)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        tail = out[:, n_prompt:]
        generated = True
    problem = Problem(model, tokenizer, torch.cat([ids, tail], dim=1), n_prompt, seed=seed)
    from .scorer import share_prefill

    share_prefill(problem, [n[len(METHOD_PREFIX) :] for n in names if n.startswith(METHOD_PREFIX)])
    scores, info = {}, {}
    for name in names:
        scores[name], info[name] = attribute(problem, name, replacer=replacer)
    result = Explanation(
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        tokens=problem.tokens(),
        n_prompt=n_prompt,
        target_probs=[float(p) for p in problem.target_probs()],
        scores=scores,
        info=info,
        generated=generated,
    )
    if faithfulness:
        from .faithfulness import measure

        result.faithfulness = measure(problem, scores, shares=shares)
    return result


def finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
