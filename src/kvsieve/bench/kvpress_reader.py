"""Read kvpress evaluation results into benchmark rows, so one report shows both libraries' runs.

kvpress's ``evaluation/evaluate.py`` writes one directory per run (dataset, model, press, ratio), named like
``ruler__4096__meta-llama--Meta-Llama-3.1-8B-Instruct__snapkv__0.50[__query_aware]``, holding:

* ``config.yaml``: the ``EvaluationConfig`` (``dataset``, ``data_dir``, ``model``, ``press_name``,
  ``compression_ratio`` (absent for threshold presses), ``query_aware``, ``needle_depth``, ``seed``, ...);
* ``predictions.csv``: the dataset's columns without ``context`` (``task``, ``question``, ``answer``/``answers``,
  ...) plus ``predicted_answer`` and ``compression_ratio``, one line per question;
* ``metrics.json``: the dataset's scorer output: ``{task: {"string_match": 0-100}}`` for RULER, a number, a flat
  dict (``{"accuracy": ...}``) or a list per question (needle in a haystack's ROUGE scores) for others.

:func:`read_kvpress_dir` turns one such directory into rows of ``results.jsonl``'s format: ``method`` is
``kvpress:<press_name>`` (``no_press`` is the uncompressed baseline and becomes ``full``), ``mode`` is ``aware`` for
query-aware runs, ``sample`` is the question's position within its task, ``length`` comes from RULER's ``data_dir``
or ``max_context_length`` (``sample``, ``question_index``, ``length``, ``depth`` and ``turn_mode`` columns, which
``kvsieve export`` adds, take precedence). Scores are per question whenever they can be: a ``score`` column, RULER's
string-match recomputed from ``answer`` and ``predicted_answer`` exactly as kvpress's ``calculate_metrics`` does
(and checked against ``metrics.json``), or a per-question metrics list; otherwise one aggregate row per task carries
``n_aggregated`` (the report shows its mean without an interval). Scores are fractions in [0, 1]; metrics above 1
are read as percentages.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from .summary import FULL_METHOD

SOURCE = "kvpress"
BASELINE_PRESS = "no_press"
_CONTROL = re.compile(r"[\x00-\x1f]")
_QUOTED = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")


def find_kvpress_dirs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) holding a kvpress ``config.yaml`` and its results, sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in root.rglob("config.yaml") if _is_kvpress_dir(p.parent)]
    return sorted(set(found))


def _exported_from(d: Path) -> Path | None:
    try:
        source = json.loads((d / "kvsieve.json").read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source).resolve() if isinstance(source, str) else None


def _is_kvpress_dir(d: Path) -> bool:
    return (d / "predictions.csv").is_file() or (d / "metrics.json").is_file()


def read_kvpress_results(root: str | Path) -> list[dict[str, Any]]:
    """The rows of every kvpress result directory under ``root`` (unreadable ones are skipped with a warning).

    Directories that ``kvsieve export`` wrote from ``root``'s own ``results.jsonl`` (their ``kvsieve.json`` names it
    as ``source``) are skipped: those rows are already in the report.
    """
    rows: list[dict[str, Any]] = []
    own = (Path(root) / "results.jsonl").resolve()
    for d in find_kvpress_dirs(root):
        if _exported_from(d) == own:
            continue
        try:
            rows += read_kvpress_dir(d, root)
        except (OSError, ValueError, yaml.YAMLError, csv.Error) as exc:
            warnings.warn(f"{d}: not a readable kvpress result directory ({exc}); left out", stacklevel=2)
    return rows


def read_kvpress_dir(run_dir: str | Path, root: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of one kvpress result directory (see the module docstring)."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    if not isinstance(config, Mapping):
        raise ValueError("config.yaml is not a mapping")
    predictions = _read_csv(run_dir / "predictions.csv")
    metrics = _read_metrics(run_dir / "metrics.json")
    base = _base_row(config, run_dir, root)
    dataset = str(config.get("dataset", ""))
    scores = _per_question_scores(dataset, predictions, metrics, run_dir)
    if scores is not None:
        return list(_question_rows(base, dataset, predictions, scores))
    return list(_aggregate_rows(base, dataset, predictions, metrics))


def _base_row(config: Mapping[str, Any], run_dir: Path, root: str | Path | None) -> dict[str, Any]:
    press = str(config.get("press_name", "unknown"))
    compression = config.get("compression_ratio")
    if compression is None:  # threshold / head-ratio presses: the setting goes into the method name
        extra = [f"{k}={config[k]}" for k in ("threshold", "head_compression_ratio") if config.get(k) is not None]
        method = f"{SOURCE}:{press}" + (f"({', '.join(extra)})" if extra else "")
    else:
        method = FULL_METHOD if press == BASELINE_PRESS else f"{SOURCE}:{press}"
    data_dir = config.get("data_dir")
    length = config.get("max_context_length")
    if length is None and data_dir is not None and str(data_dir).isdigit():
        length = int(data_dir)  # RULER's data_dir is the context length
    try:
        where = str(run_dir.relative_to(root)) if root is not None else run_dir.name
    except ValueError:
        where = run_dir.name
    return {
        "source": SOURCE,
        "run_id": f"{SOURCE}:{where}",
        "model": config.get("model"),
        "method": method,
        "method_params": {k: config.get(k) for k in ("press_name", "press_init_command") if config.get(k)},
        "compression": float(compression) if isinstance(compression, int | float) else 0.0,
        "budget_tokens": None,
        "length": length,
        "depth": config.get("needle_depth"),
        "mode": "aware" if config.get("query_aware") else "agnostic",
        "seed": config.get("seed"),
        "dataset": config.get("dataset"),
    }


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # predictions can be long; restored below
    try:
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            return list(csv.DictReader(fh))
    finally:
        csv.field_size_limit(limit)


def _read_metrics(path: Path) -> Any:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8", errors="replace"))  # json reads NaN as float nan


def parse_answers(text: str | None) -> list[str]:
    """kvpress's ``answer`` cell as a list: pandas writes lists as ``['a', 'b']`` and numpy arrays as ``['a' 'b']``
    (which Python would read as one concatenated string, so quoted items are taken one by one)."""
    text = (text or "").strip()
    if not (text.startswith("[") and text.endswith("]")):
        return [text] if text else []
    quoted = _QUOTED.findall(text)
    if quoted:
        return [a if a else b for a, b in quoted]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return [text]
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def ruler_string_match(task: str, prediction: str, answers: list[str]) -> float:
    """kvpress's RULER metric for one question, as a fraction: ``string_match_part`` (any answer found) for ``qa``
    tasks, ``string_match_all`` (share of answers found) for the others; case-insensitive, control characters
    removed from the prediction first."""
    if not answers:
        return math.nan
    pred = _CONTROL.sub("", prediction.strip()).strip().lower()
    hits = [1.0 if a.lower() in pred else 0.0 for a in answers]
    return max(hits) if task.split("_")[0] == "qa" else sum(hits) / len(hits)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _per_question_scores(
    dataset: str, predictions: list[dict[str, str]], metrics: Any, run_dir: Path
) -> list[float] | None:
    """A score per line of predictions.csv, or ``None`` when only aggregates can be had."""
    if not predictions:
        return None
    if "score" in predictions[0]:
        values = [_number(p.get("score")) for p in predictions]
        if all(v is not None for v in values):
            scale = 100.0 if any(v > 1 for v in values) else 1.0  # type: ignore[operator]
            return [v / scale for v in values]  # type: ignore[operator]
    if isinstance(metrics, list) and len(metrics) == len(predictions):  # needle in a haystack: ROUGE per question
        values = [_rouge_l(m) for m in metrics]
        if all(v is not None for v in values):
            return values  # type: ignore[return-value]
    if dataset == "ruler" and {"task", "answer", "predicted_answer"} <= set(predictions[0]):
        scores = [ruler_string_match(p["task"], p["predicted_answer"], parse_answers(p["answer"])) for p in predictions]
        if _agrees_with_metrics(predictions, scores, metrics, run_dir):
            return scores
    return None


def _rouge_l(metric: Any) -> float | None:
    if isinstance(metric, Mapping) and isinstance(metric.get("rouge-l"), Mapping):
        return _number(str(metric["rouge-l"].get("f")))
    return None


def _agrees_with_metrics(predictions: list[dict[str, str]], scores: list[float], metrics: Any, run_dir: Path) -> bool:
    """Whether recomputed scores give metrics.json's per-task string_match (kvpress rounds it to 2 decimals)."""
    if not isinstance(metrics, Mapping):
        return all(math.isfinite(s) for s in scores)
    by_task: dict[str, list[float]] = {}
    for p, s in zip(predictions, scores, strict=True):
        by_task.setdefault(p["task"], []).append(s)
    for task, values in by_task.items():
        reported = metrics.get(task, {}).get("string_match") if isinstance(metrics.get(task), Mapping) else None
        if reported is None:
            continue
        mine = round(sum(values) / len(values) * 100, 2)
        if not math.isfinite(mine) or abs(mine - float(reported)) > 0.011:
            warnings.warn(
                f"{run_dir}: recomputed string_match for {task} is {mine}, metrics.json says {reported}; "
                "using metrics.json's aggregates",
                stacklevel=4,
            )
            return False
    return True


def _question_rows(
    base: dict[str, Any], dataset: str, predictions: list[dict[str, str]], scores: list[float]
) -> Iterator[dict[str, Any]]:
    index: dict[str, int] = {}
    for p, score in zip(predictions, scores, strict=True):
        task = p.get("task") or dataset
        i = index[task] = index.get(task, -1) + 1
        answers = p.get("answer") if "answer" in p else p.get("answers") or p.get("needle")
        extra = {k: v for k in _OPTIONAL if (v := _optional(k, p.get(k))) is not None}  # columns beyond kvpress's
        yield {
            **base,
            "task": task,
            "sample": i,
            **extra,
            "score": score,
            "prediction": p.get("predicted_answer", ""),
            "answers": parse_answers(answers),
            "question": p.get("question"),
        }


_OPTIONAL = {"sample": int, "question_index": int, "length": int, "depth": float, "turn_mode": str}


def _optional(key: str, text: str | None) -> Any:
    """A column some writers add to predictions.csv (``kvsieve export`` does), parsed; ``None`` when absent/empty."""
    if text in (None, ""):
        return None
    try:
        return _OPTIONAL[key](float(text)) if _OPTIONAL[key] is not str else text
    except ValueError:
        return None


def _aggregate_rows(
    base: dict[str, Any], dataset: str, predictions: list[dict[str, str]], metrics: Any
) -> Iterator[dict[str, Any]]:
    """One row per task from metrics.json, standing for the task's questions (``n_aggregated``)."""
    counts: dict[str, int] = {}
    for p in predictions:
        task = p.get("task") or dataset
        counts[task] = counts.get(task, 0) + 1
    whole = next(iter(counts)) if len(counts) == 1 else dataset or "all"  # a metric over the whole run
    for task, value in _aggregates(metrics):
        name = whole if task is None else task
        n = sum(counts.values()) if task is None else counts.get(task)
        yield {**base, "task": name, "sample": None, "score": value, "n_aggregated": n or 1}


def _aggregates(metrics: Any) -> Iterator[tuple[str | None, float]]:
    """(task, or None for the whole run; score in [0, 1]) from the shapes kvpress's scorers return."""
    if isinstance(metrics, int | float) and not isinstance(metrics, bool):
        yield None, _fraction(float(metrics))
    elif isinstance(metrics, Mapping):
        nested = {k: v for k, v in metrics.items() if isinstance(v, Mapping)}
        for task, values in nested.items():
            first = next((float(v) for v in values.values() if isinstance(v, int | float)), None)
            if first is not None:
                yield str(task), _fraction(first)
        key = next((k for k in ("accuracy", "average", "score") if isinstance(metrics.get(k), int | float)), None)
        if not nested and key:
            yield None, _fraction(float(metrics[key]))


def _fraction(value: float) -> float:
    return value / 100.0 if value > 1 else value
