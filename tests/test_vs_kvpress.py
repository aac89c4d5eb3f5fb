"""benchmarks/vs_kvpress.py's bookkeeping (no kvpress needed): each side's rows survive a crash, a rerun runs only
what is missing, and a folder measured with other settings is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "vs_kvpress", Path(__file__).parent.parent / "benchmarks" / "vs_kvpress.py"
)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)


def test_rows_are_keyed_by_item_pair_ratio_and_press(tmp_path) -> None:
    items = [{"id": "passkey/0/agnostic", "prefix_ids": list(range(100))}]
    rows = vs.jobs(items, ["snapkv", "dms"], [0.25, 0.5])
    assert [(r["label"], r["ratio"]) for r in rows] == [("snapkv", 0.25), ("snapkv", 0.5), ("dms", None)]
    assert len({vs.row_key(r) for r in rows}) == 3
    path = tmp_path / "ours.jsonl"
    first = {**rows[0], "prediction_ids": [1], "prefill_seconds": 1.0, "kept": 0.75}
    again = {**first, "prediction_ids": [2]}
    failed = {**rows[1], "error": "RuntimeError: boom"}
    cut = json.dumps({**rows[2], "prediction_ids": [3]})[:20]  # a line a crash cut short
    path.write_text("\n".join([json.dumps(first), json.dumps(failed), json.dumps(again), cut]) + "\n")
    done = vs.load_rows(path)
    assert done[vs.row_key(rows[0])]["prediction_ids"] == [2]  # the last line of a key wins
    assert "error" in done[vs.row_key(rows[1])]  # an error is a result: it does not run again
    assert vs.row_key(rows[2]) not in done  # the cut line runs again
    assert vs.load_rows(tmp_path / "missing.jsonl") == {}


def test_an_out_folder_keeps_one_setting(tmp_path) -> None:
    vs.open_out(tmp_path / "out", {"length": 2048, "threads": 2})
    vs.open_out(tmp_path / "out", {"length": 2048, "threads": 2})  # the same settings: resumes
    with pytest.raises(SystemExit, match="another --out"):
        vs.open_out(tmp_path / "out", {"length": 1024, "threads": 2})
