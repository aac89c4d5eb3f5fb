"""kvpress evaluation directories read into benchmark rows, and shown in the report beside kvsieve's own runs.

The fixtures are written here the way kvpress's ``evaluation/evaluate.py`` writes them (directory name from
``EvaluationConfig.get_results_dir``, ``config.yaml`` by ``yaml.dump(asdict(config), sort_keys=False)``,
``predictions.csv`` by ``DataFrame.to_csv`` without the context column, list answers as numpy arrays print them, and
``metrics.json`` from RULER's ``calculate_metrics``), reimplemented without pandas.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvsieve.bench.kvpress_reader import find_kvpress_dirs, parse_answers, read_kvpress_dir, read_kvpress_results
from kvsieve.bench.report import has_report_inputs, write_report
from kvsieve.bench.summary import Budget, load_rows, mean_scores, score_table
from test_report import make_run_dir

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
# (task, question, answers) of a tiny RULER-like dataset: a multi-answer needle task and a QA task
DATASET = [
    ("niah_multikey_2", "What are the numbers for k1 and k2?", ["7236", "1189"]),
    ("niah_multikey_2", "What are the numbers for k3 and k4?", ["5550", "2001"]),
    ("niah_multikey_2", "What are the numbers for k5 and k6?", ["4242", "9090"]),
    ("qa_1", "Who wrote it?", ["Ada Lovelace", "Lovelace"]),
    ("qa_1", "Where?", ["London"]),
    ("qa_1", "When?", ["1843"]),
]
# predictions per press: full finds everything; snapkv loses answers at 50%
PREDICTIONS = {
    ("no_press", 0.0): ["7236 and 1189", "5550, 2001", "4242 9090", "It was Lovelace.", "In London", "1843."],
    ("snapkv", 0.5): ["7236 and 0000", "no idea", "4242 9090", "Ada Lovelace", "Paris", "\x07 1843 \n"],
    ("knorm", 0.5): ["1189", "", "9090 4242", "Byron", "London", "1842"],
}


def ruler_metric(task: str, prediction: str, answers: list[str]) -> float:
    """kvpress's RULER scorer for one question, written from evaluation/benchmarks/ruler/calculate_metrics.py."""
    pred = re.sub(r"[\x00-\x1f]", "", prediction.strip()).strip()
    hits = [1.0 if a.lower() in pred.lower() else 0.0 for a in answers]
    return max(hits) if task.split("_")[0] == "qa" else sum(hits) / len(hits)


def numpy_repr(answers: list[str]) -> str:
    """How pandas writes a numpy array of strings into a CSV cell."""
    return "[" + " ".join(f"'{a}'" for a in answers) + "]"


def write_kvpress_run(
    root: Path,
    press: str,
    ratio: float,
    *,
    query_aware: bool = False,
    data_dir: str = "4096",
    metrics: Any = None,
    predictions: list[str] | None = None,
    dataset: str = "ruler",
) -> Path:
    """One evaluation directory, as kvpress's evaluate.py writes it."""
    components = [dataset, data_dir, MODEL.replace("/", "--"), press, f"{ratio:.2f}"]
    if query_aware:
        components.append("query_aware")
    run = root / "__".join(components)
    run.mkdir(parents=True)
    config = {
        "dataset": dataset, "data_dir": data_dir, "model": MODEL, "device": None, "press_name": press,
        "compression_ratio": ratio, "key_channel_compression_ratio": None, "fraction": 1.0, "max_new_tokens": None,
        "max_context_length": None, "query_aware": query_aware, "needle_depth": None, "compression_interval": None,
        "target_size": None, "hidden_states_buffer_size": None, "output_dir": str(root), "log_level": "INFO",
        "model_kwargs": {"attn_implementation": None, "dtype": "auto"}, "press_init_command": f"{press}()",
        "seed": 42, "fp8": False,
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.dump(config, default_flow_style=False, indent=2, sort_keys=False))
    preds = predictions or PREDICTIONS[(press, ratio)]
    columns = ["predicted_answer", "task", "answer", "max_new_tokens", "question", "answer_prefix", "compression_ratio"]
    with (run / "predictions.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for (task, question, answers), pred in zip(DATASET, preds, strict=True):
            writer.writerow([pred, task, numpy_repr(answers), 128, question, "Answer:", ratio])
    if metrics is None:
        metrics = {}
        for task in dict.fromkeys(t for t, _q, _a in DATASET):
            scores = [ruler_metric(t, p, a) for (t, _q, a), p in zip(DATASET, preds, strict=True) if t == task]
            metrics[task] = {"string_match": round(sum(scores) / len(scores) * 100, 2)}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=4))
    return run


@pytest.fixture
def kvpress_root(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for press, ratio in PREDICTIONS:
        write_kvpress_run(root, press, ratio)
    return root


def test_parse_answers() -> None:
    assert parse_answers("['7236' '1189']") == ["7236", "1189"]  # numpy array
    assert parse_answers("['7236', '1189']") == ["7236", "1189"]  # python list
    assert parse_answers("[\"it's\" 'x']") == ["it's", "x"]
    assert parse_answers("London") == ["London"]
    assert parse_answers("") == [] and parse_answers(None) == []


def test_rows_from_a_kvpress_directory_round_trip_its_scores(kvpress_root: Path) -> None:
    dirs = find_kvpress_dirs(kvpress_root)
    assert [d.name.split("__")[3] for d in dirs] == ["knorm", "no_press", "snapkv"]
    for (press, ratio), preds in PREDICTIONS.items():
        run = next(d for d in dirs if f"__{press}__" in d.name)
        rows = read_kvpress_dir(run, kvpress_root)
        assert len(rows) == len(DATASET)
        want = [ruler_metric(t, p, a) for (t, _q, a), p in zip(DATASET, preds, strict=True)]
        assert [r["score"] for r in rows] == want  # per question, exactly kvpress's metric
        assert [(r["task"], r["sample"]) for r in rows] == [(t, i % 3) for i, (t, _q, _a) in enumerate(DATASET)]
        r = rows[0]
        assert r["method"] == ("full" if press == "no_press" else f"kvpress:{press}")
        assert (r["compression"], r["length"], r["mode"], r["model"], r["seed"]) == (ratio, 4096, "agnostic", MODEL, 42)
        assert r["answers"] == ["7236", "1189"] and r["source"] == "kvpress"
        # and the aggregate is metrics.json's, to kvpress's rounding
        metrics = json.loads((run / "metrics.json").read_text())
        for task in metrics:
            mine = [r["score"] for r in rows if r["task"] == task]
            assert round(sum(mine) / len(mine) * 100, 2) == metrics[task]["string_match"]


def test_kvpress_runs_are_compared_with_no_press_on_the_same_questions(kvpress_root: Path) -> None:
    rows = read_kvpress_results(kvpress_root)
    cells = mean_scores(rows)
    half = Budget("compression", 0.5)
    assert cells[("agnostic", "full", Budget("compression", 0.0))].mean == 1.0
    assert cells[("agnostic", "kvpress:snapkv", half)].n == 6
    table = score_table(rows, "agnostic")
    test = table.vs_full[("kvpress:snapkv", half)]
    assert test.n == 6 and test.test == "sign-flip"  # graded scores (1/2 for one of two keys) paired per question


def test_query_aware_and_aggregate_only_results(tmp_path: Path) -> None:
    write_kvpress_run(tmp_path, "snapkv", 0.5, query_aware=True)
    # a dataset whose scorer returns one number (LongBench): only the aggregate is known
    write_kvpress_run(tmp_path, "knorm", 0.25, dataset="longbench", data_dir="narrativeqa", metrics=23.45,
                      predictions=PREDICTIONS[("knorm", 0.5)])  # fmt: skip
    rows = {r["dataset"]: r for r in read_kvpress_results(tmp_path)}
    assert rows["ruler"]["mode"] == "aware"
    agg = rows["longbench"]
    assert (agg["score"], agg["n_aggregated"], agg["length"], agg["sample"]) == (0.2345, 6, None, None)
    cell = mean_scores([agg])[("agnostic", "kvpress:knorm", Budget("compression", 0.25))]
    assert (cell.n, cell.interval) == (6, "")  # no per-question scores: mean and n only


def test_metrics_that_disagree_with_the_predictions_fall_back_to_aggregates(tmp_path: Path) -> None:
    run = write_kvpress_run(tmp_path, "snapkv", 0.5, metrics={"niah_multikey_2": {"string_match": 99.0},
                                                              "qa_1": {"string_match": 50.0}})  # fmt: skip
    with pytest.warns(UserWarning, match="metrics.json says 99.0"):
        rows = read_kvpress_dir(run)
    assert [(r["task"], r["score"], r["n_aggregated"]) for r in rows] == [
        ("niah_multikey_2", 0.99, 3),
        ("qa_1", 0.5, 3),
    ]


def test_unreadable_directory_is_skipped_with_a_warning(tmp_path: Path) -> None:
    write_kvpress_run(tmp_path, "snapkv", 0.5)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.yaml").write_text("dataset: [unclosed\n")
    (bad / "metrics.json").write_text("{}")
    with pytest.warns(UserWarning, match="not a readable kvpress result directory"):
        rows = read_kvpress_results(tmp_path)
    assert len(rows) == len(DATASET)


def test_report_shows_both_libraries(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    for press, ratio in PREDICTIONS:
        write_kvpress_run(run / "kvpress-results", press, ratio)
    page = write_report(run).read_text(encoding="utf-8")
    assert "kvpress:snapkv" in page and "kvpress:knorm" in page and "pyramidkv" in page
    assert "80 from results.jsonl, 18 from 3 kvpress result directories" in page
    # one table per model, never pooled; the kvpress model's charts have their own ids
    assert '<h3 class="model">Model meta-llama/Meta-Llama-3.1-8B-Instruct</h3>' in page
    assert 'data-chart="meta-llama-meta-llama-3-1-8b-instruct-score-agnostic-all"' in page
    assert "://" not in page


def test_a_kvpress_directory_alone_is_a_report_input(kvpress_root: Path, tmp_path: Path) -> None:
    assert has_report_inputs(kvpress_root)
    assert not has_report_inputs(tmp_path / "empty")
    page = write_report(kvpress_root).read_text(encoding="utf-8")
    assert "kvpress:snapkv" in page and "No results." not in page


def test_reads_what_kvsieve_export_writes_and_never_counts_a_run_twice(tmp_path: Path) -> None:
    export = pytest.importorskip("kvsieve.bench.export")
    run = make_run_dir(tmp_path / "run")
    ours = load_rows(run)
    written = export.export_kvpress(run)  # into run/kvpress
    assert written and all(d.parent == run / "kvpress" for d in written)
    rows = read_kvpress_results(run / "kvpress")  # read as a kvpress user would, on their own
    assert len(rows) == len(ours)
    by_key = {(r["method"], r["mode"], r["compression"], r["task"], r["length"], r["sample"]): r for r in ours}
    names = {"full": "full", "snapkv": "kvpress:snapkv"}
    for r in rows:
        if r["method"] not in names.values():
            continue
        mine = by_key[(next(k for k, v in names.items() if v == r["method"]), r["mode"], r["compression"], r["task"],
                       r["length"], r["sample"])]  # fmt: skip
        assert r["score"] == ruler_metric(r["task"], mine["prediction"], mine["answers"])
    # the bench directory's own report reads results.jsonl once, not again through its export
    page = write_report(run).read_text(encoding="utf-8")
    assert "kvpress result directories" not in page and "kvpress:snapkv" not in page
