"""`kvsieve export --format kvpress`: kvpress's evaluation layout, checked by hand here and by kvpress's own code in
its environment (`.venv-kvpress`, made by benchmarks/vs_kvpress.py) when that exists."""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from bench_tiny import tiny_model
from kvsieve.bench.export import CSV_COLUMNS, export_kvpress, ruler_metrics
from kvsieve.bench.runner import BenchConfig, Runner
from kvsieve.cli import main

ROOT = Path(__file__).resolve().parent.parent
KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_VERSION = "0.5.5"
# kvpress's EvaluationConfig fields (0.5.5); config.yaml may hold no others, or EvaluationConfig(**yaml) fails
EVALUATION_FIELDS = {
    "dataset", "data_dir", "model", "device", "press_name", "compression_ratio", "key_channel_compression_ratio",
    "head_compression_ratio", "threshold", "fraction", "max_new_tokens", "max_context_length", "query_aware",
    "needle_depth", "compression_interval", "target_size", "hidden_states_buffer_size", "output_dir", "log_level",
    "model_kwargs", "trust_remote_code", "press_init_command", "seed", "fp8",
}  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from kvsieve.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_model(len(tokenizer))
    out = tmp_path_factory.mktemp("run")
    for mode, tasks, turns in (("agnostic", ["passkey", "multi_passkey"], "both"), ("aware", ["passkey"], "both")):
        config = BenchConfig(tasks=tasks, methods=["full", "snapkv", "h2o"], compressions=[0.5], budgets=[128],
                             lengths=[384], samples=1, mode=mode, turns=turns, out=str(out))  # fmt: skip
        Runner(config, model, tokenizer).run()
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_layout(run_dir, tmp_path):
    written = export_kvpress(run_dir, tmp_path / "kv")
    names = {p.name for p in written}
    assert "ruler__384__smollm2-135m__no_press__0.00" in names
    assert "ruler__384__smollm2-135m__snapkv__0.50" in names
    assert "ruler__384__smollm2-135m__snapkv__0.50__query_aware" in names
    assert "ruler__384__smollm2-135m__snapkv__budget128" in names
    assert "ruler__384__smollm2-135m__kvsieve-h2o__0.50__turns-multiturn" in names  # no kvpress twin: own name
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert sum(len(read_csv(p / "predictions.csv")) for p in written) == len(rows)
    for folder in written:
        assert {f.name for f in folder.iterdir()} == {"predictions.csv", "metrics.json", "config.yaml", "kvsieve.json"}
        records = read_csv(folder / "predictions.csv")
        assert list(records[0]) == CSV_COLUMNS
        for r in records:
            r["answer"] = ast.literal_eval(r["answer"])
            assert isinstance(r["answer"], list) and r["answer"]
        assert json.loads((folder / "metrics.json").read_text()) == ruler_metrics(records)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert set(config) <= EVALUATION_FIELDS and config["dataset"] == "ruler" and config["data_dir"] == "384"
        assert config["query_aware"] == folder.name.endswith("query_aware")
        about = json.loads((folder / "kvsieve.json").read_text())
        assert about["rows"] == len(records)


def test_metrics_follow_kvpress_ruler_scoring():
    records = [
        {"task": "qa_1", "predicted_answer": "Paris", "answer": ["Paris", "Lyon"]},  # qa: any answer counts
        {"task": "niah_multivalue", "predicted_answer": "12\n34 and 56", "answer": ["1234", "56", "78"]},  # \n dropped
        {"task": "niah_multivalue", "predicted_answer": "", "answer": ["1"]},
    ]
    assert ruler_metrics(records) == {"niah_multivalue": {"string_match": 33.33}, "qa_1": {"string_match": 100.0}}


def test_export_command(run_dir, tmp_path, capsys):
    assert main(["export", "--format", "kvpress", str(run_dir), "--out", str(tmp_path / "x")]) == 0
    assert "kvpress result directories" in capsys.readouterr().out
    assert (tmp_path / "x" / "ruler__384__smollm2-135m__no_press__0.00" / "predictions.csv").is_file()


def kvpress_evaluation() -> Path:
    """kvpress's evaluation/ folder (not in its wheel; its sdist has it), fetched once next to its venv."""
    folder = KVPRESS_VENV / f"kvpress-{KVPRESS_VERSION}"
    if not (folder / "evaluation" / "evaluate.py").is_file():
        download = KVPRESS_VENV / "sdist"
        subprocess.run([str(KVPRESS_VENV / "bin" / "python"), "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", f"kvpress=={KVPRESS_VERSION}", "-d", str(download)],
                       check=True, capture_output=True, timeout=300)  # fmt: skip
        with tarfile.open(download / f"kvpress-{KVPRESS_VERSION}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"kvpress-{KVPRESS_VERSION}/evaluation/")]
            tar.extractall(KVPRESS_VENV, members=members, filter="data")
    return folder / "evaluation"


CHECK = r"""
import ast, importlib, json, sys, tempfile, types
from pathlib import Path
import pandas as pd, yaml
sys.path.insert(0, sys.argv[1])
# evaluate_registry imports every dataset's scorer; those of other datasets need kvpress's "eval" extra (jieba, rouge,
# nltk, ...), which RULER's scorer does not use: stand-ins for the ones not installed, so the registry imports.
for name in ("jieba", "rouge", "fuzzywuzzy", "bert_score", "nltk", "nltk.translate", "nltk.translate.bleu_score",
             "nltk.translate.meteor_score"):
    try:
        importlib.import_module(name)
    except ImportError:
        stub = types.ModuleType(name)
        stub.__getattr__ = lambda attr: (lambda *a, **k: None) if not attr.startswith("__") else None
        sys.modules[name] = stub
from evaluate import EvaluationConfig            # kvpress's own loader of config.yaml
from evaluate_registry import PRESS_REGISTRY, SCORER_REGISTRY
fields = set(EvaluationConfig.__dataclass_fields__)
checked = 0
for folder in sorted(Path(sys.argv[2]).iterdir()):
    df = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    df["answer"] = df["answer"].apply(ast.literal_eval)
    metrics = SCORER_REGISTRY["ruler"](df)       # kvpress's own calculate_metrics
    assert metrics == json.loads((folder / "metrics.json").read_text()), (folder.name, metrics)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert set(config) <= fields, set(config) - fields
    if config["press_name"] in PRESS_REGISTRY and "budget" not in folder.name and "turns" not in folder.name:
        cfg = EvaluationConfig(**config)
        made = cfg.get_results_dir(Path(tempfile.mkdtemp()))
        assert made.name == folder.name, (made.name, folder.name)
    checked += 1
print("checked", checked)
"""


NO_VENV = ".venv-kvpress is missing: `python benchmarks/vs_kvpress.py` creates it (kvpress 0.5.5)"


@pytest.mark.skipif(not (KVPRESS_VENV / "bin" / "python").exists(), reason=NO_VENV)
def test_kvpress_reads_the_export(run_dir, tmp_path):
    try:
        evaluation = kvpress_evaluation()
    except (subprocess.SubprocessError, OSError, tarfile.TarError) as exc:
        pytest.skip(f"kvpress's evaluation code (its sdist) could not be fetched: {exc}")
    written = export_kvpress(run_dir, tmp_path / "kv")
    result = subprocess.run([str(KVPRESS_VENV / "bin" / "python"), "-c", CHECK, str(evaluation), str(tmp_path / "kv")],
                            capture_output=True, text=True, timeout=300, cwd=evaluation)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checked {len(written)}" in result.stdout
    assert sys.executable != str(KVPRESS_VENV / "bin" / "python")
