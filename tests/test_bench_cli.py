"""`kvsieve bench` / `stream` / `export` arguments: every bad input is one line and exit code 2, before any model
loads; progress is visible when stderr is not a terminal."""

from __future__ import annotations

import io
import re

import pytest

import kvsieve.models
from kvsieve.bench.progress import PlainProgress, progress
from kvsieve.cli import main


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(kvsieve.models, "load_model", refuse)
    monkeypatch.setattr(kvsieve.models, "load_tokenizer", refuse)


def one_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvsieve: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stream", "--tokens", "-5"], "--tokens must be at least 2"),
        (["stream", "--tokens", "0"], "--tokens must be at least 2"),
        (["stream", "--chunk-size", "0"], "--chunk-size must be at least 1"),
        (["stream", "--bucket", "0"], "--bucket must be at least 1"),
        (["stream", "--budget", "0"], "budget"),
        (["stream", "--methods", ""], "--methods is empty"),
        (["stream", "--methods", "snapkvv"], "unknown method"),
        (["bench", "--methods", ""], "--methods is empty"),
        (["bench", "--tasks", ""], "--tasks is empty"),
        (["bench", "--lengths", "100000"], "length 100000 does not fit smollm2-135m's window of 8192"),
        (["bench", "--samples", "0"], "--samples must be"),
        (["bench", "--compression", "", "--methods", "snapkv"], "needs a budget"),
        (["bench", "--workers", "0", "--ray"], "--workers must be at least 1"),
        (["bench", "--workers", "2"], "add --ray"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(no_model, capsys, tmp_path, argv, message):
    assert message in one_error(capsys, [*argv, "--out", str(tmp_path / "out")])


def test_out_that_is_a_file_or_unwritable(no_model, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file, not a directory" in one_error(capsys, ["bench", "--out", str(a_file)])
    assert "cannot be created" in one_error(capsys, ["bench", "--out", str(a_file / "sub")])
    assert "is a file, not a directory" in one_error(capsys, ["stream", "--out", str(a_file)])


def test_stream_text_must_be_text(no_model, capsys, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not UTF-8 text" in one_error(capsys, ["stream", "--text", str(binary), "--out", str(tmp_path / "o")])
    assert "is a directory" in one_error(capsys, ["stream", "--text", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "unknown haystack" in one_error(capsys, ["stream", "--text", "nope", "--out", str(tmp_path / "o")]).lower()


def test_export_of_a_directory_without_results(capsys, tmp_path):
    assert "has no results.jsonl" in one_error(capsys, ["export", "--format", "kvpress", str(tmp_path)])


def test_bench_help_states_what_the_presets_cost(capsys):
    try:
        code = main(["bench", "--help"])
    except SystemExit as done:  # argparse's own exit, where the top-level CLI lets it through
        code = done.code
    assert code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "quick" in text and re.search(r"quick = .*\d+ min \d+ s measured", text)
    assert "standard" in text and "20 samples per task" in text and "not run whole" in text


def test_plain_progress_lines_when_not_a_terminal():
    stream = io.StringIO()  # not a terminal, like `kvsieve bench > log 2>&1`
    with progress("bench", 20, stream=stream) as advance:
        advance(5)  # rows already done
        for _ in range(15):
            advance(1)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("bench: 5/20 (25%)") and "ETA" not in lines[0]  # resumed rows say nothing of speed
    assert "ETA" in lines[1]
    assert lines[-1].startswith("bench: 20/20 (100%)")
    assert 3 <= len(lines) <= 12  # every 10% (or 30 s), not every row


def test_plain_progress_prints_every_interval():
    stream = io.StringIO()
    bar = PlainProgress("stream", 10**6, stream, every=0.0)
    bar.advance(1)
    bar.advance(1)
    assert len(stream.getvalue().splitlines()) == 2
