"""``kvsieve export --format kvpress``: a bench run in the layout of kvpress's evaluation (``evaluation/evaluate.py``).

kvpress writes one directory per dataset, model, press and ratio, named by ``EvaluationConfig.get_results_dir``
(``{dataset}__{data_dir}__{model}__{press}__{ratio:.2f}[__query_aware]``), holding ``predictions.csv`` (the dataset's
columns but the context, plus ``predicted_answer`` and ``compression_ratio``), ``metrics.json`` (the dataset scorer's
output) and ``config.yaml`` (the ``EvaluationConfig`` fields). Here:

- dataset ``ruler`` (the tasks are RULER's, scored by string match), ``data_dir`` the context length, as kvpress's
  RULER sets are named (``4096``);
- press: kvpress's registry name where kvsieve's method with default hyperparameters is the same method (``snapkv``,
  ``streaming_llm``, ``tova``, ``knorm``, ``random``, ``pyramidkv``, ``adakv_snapkv``; ``full`` is ``no_press``),
  else ``kvsieve-<spec>``; token budgets (``--budgets``) take the ratio's place as ``budget<N>``; multi-turn rows get
  a ``turns-multiturn`` component;
- ``metrics.json`` is computed as kvpress's RULER ``calculate_metrics`` computes it from ``predictions.csv``
  (``string_match_part`` for ``qa*`` tasks, ``string_match_all`` else, on the prediction stripped of control
  characters, x100, 2 decimals); a test runs kvpress's own function on the export in kvpress's environment;
- ``config.yaml`` holds only fields ``EvaluationConfig`` accepts; kvsieve's own description of the run (method spec and
  hyperparameters, budget, mode, versions) is in ``kvsieve.json`` beside it.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import KVSieveError
from .results import ResultsFile, prepare_out_dir

KVPRESS_NAMES = {
    "full": "no_press",
    "snapkv": "snapkv",
    "streaming_llm": "streaming_llm",
    "tova": "tova",
    "knorm": "knorm",
    "random": "random",
    "pyramidkv:snapkv": "pyramidkv",
    "adakv:snapkv": "adakv_snapkv",
}
"""kvsieve spec (default hyperparameters) -> kvpress ``PRESS_REGISTRY`` name of the same method."""

CSV_COLUMNS = [
    "task", "question", "answer_prefix", "answer", "max_new_tokens", "predicted_answer", "compression_ratio",
    "length", "sample", "depth", "question_index", "turn_mode", "kv_bytes", "kv_bytes_full", "kvsieve_score",
]  # fmt: skip
_CONTROL = re.compile(r"[\x00-\x1f]")


def press_name(spec: str) -> str:
    return KVPRESS_NAMES.get(spec, "kvsieve-" + re.sub(r"[^\w.=-]+", "_", spec).strip("_"))


def _directory(row: dict, model: str) -> str:
    """kvpress's ``get_results_dir`` name for this row's configuration."""
    last = f"budget{row['budget_tokens']}" if row.get("budget_tokens") is not None else f"{row['compression']:.2f}"
    parts = ["ruler", str(row["length"]), model.replace("/", "--"), press_name(row["method"]), last]
    if row.get("mode") == "aware":
        parts.append("query_aware")
    if row.get("turn_mode") == "multiturn":
        parts.append("turns-multiturn")
    return "__".join(parts)


def ruler_metrics(records: list[dict]) -> dict[str, dict[str, float]]:
    """kvpress's RULER ``calculate_metrics`` on ``predictions.csv`` records (answers as lists)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    scores = {}
    for task in sorted(by_task):
        rows = by_task[task]
        total = 0.0
        for r in rows:
            pred = _CONTROL.sub("", str(r["predicted_answer"]).strip()).strip().lower()
            hits = [1.0 if a.lower() in pred else 0.0 for a in r["answer"]]
            total += max(hits) if task.split("_")[0] == "qa" else sum(hits) / len(hits)
        scores[task] = {"string_match": round(total / len(rows) * 100, 2)}
    return scores


def _config_yaml(row: dict, model: str, max_new_tokens: int | None) -> dict[str, Any]:
    # Only fields of kvpress's EvaluationConfig (0.5.5 and later), so EvaluationConfig(**yaml) loads it.
    return {
        "dataset": "ruler",
        "data_dir": str(row["length"]),
        "model": model,
        "device": "cpu",
        "press_name": press_name(row["method"]),
        "compression_ratio": float(row["compression"]),
        "key_channel_compression_ratio": None,
        "fraction": 1.0,
        "max_new_tokens": max_new_tokens,
        "max_context_length": None,
        "query_aware": row.get("mode") == "aware",
        "needle_depth": None,
        "compression_interval": None,
        "target_size": None,
        "hidden_states_buffer_size": None,
        "output_dir": ".",
        "log_level": "INFO",
        "model_kwargs": {},
        "press_init_command": f"kvsieve {row['method']} {json.dumps(row.get('method_params', {}), sort_keys=True)}",
        "seed": int(row.get("seed", 0)),
        "fp8": False,
    }


def export_kvpress(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write ``run_dir``'s rows in kvpress's layout under ``out`` (default ``run_dir/kvpress``); returns the dirs."""
    import yaml  # a dependency of transformers

    run = Path(run_dir)
    results = ResultsFile(run / "results.jsonl")
    if not results.path.is_file():
        raise KVSieveError(f"{run} has no results.jsonl; pass a `kvsieve bench --out` directory")
    rows = results.rows()
    if not rows:
        raise KVSieveError(f"{results.path} holds no complete rows; run `kvsieve bench --out {run}` first")
    target = prepare_out_dir(out if out is not None else run / "kvpress", flag="--out")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[_directory(row, str(row["model"]))].append(row)
    written = []
    for name, members in sorted(groups.items()):
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        records = [_record(r) for r in members]
        with (folder / "predictions.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows({**r, "answer": repr(list(r["answer"]))} for r in records)
        (folder / "metrics.json").write_text(json.dumps(ruler_metrics(records), indent=4))
        allowances = {r.get("max_new_tokens") for r in members}
        first = members[0]
        config = _config_yaml(first, str(first["model"]), allowances.pop() if len(allowances) == 1 else None)
        (folder / "config.yaml").write_text(yaml.safe_dump(config, default_flow_style=False, sort_keys=False))
        about = {key: first.get(key) for key in ("method", "method_params", "compression", "budget_tokens", "mode",
                                                 "turn_mode", "model", "seed", "versions")}  # fmt: skip
        about.update(rows=len(members), source=str(results.path.resolve()))
        (folder / "kvsieve.json").write_text(json.dumps(about, indent=2))
        written.append(folder)
    return written


def _record(row: dict) -> dict:
    return {
        "task": row["task"],
        "question": row.get("question", ""),
        "answer_prefix": row.get("answer_prefix", ""),
        "answer": list(row.get("answers", [])),
        "max_new_tokens": row.get("max_new_tokens"),
        "predicted_answer": row.get("prediction", ""),
        "compression_ratio": float(row["compression"]),
        "length": row["length"],
        "sample": row["sample"],
        "depth": row.get("depth"),
        "question_index": row.get("question_index", 0),
        "turn_mode": row.get("turn_mode"),
        "kv_bytes": row.get("kv_bytes"),
        "kv_bytes_full": row.get("kv_bytes_full"),
        "kvsieve_score": row.get("score"),
    }
