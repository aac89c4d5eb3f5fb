"""`kvsieve stream` writes a row per bucket as it goes and resumes after an interruption (tiny model)."""

from __future__ import annotations

import json

import pytest

from kvsieve.bench.streaming import STREAM_FILE, expected_buckets, ppl_between, run_stream, stream_key
from kvsieve.errors import KVSieveError
from tiny_models import make_model, prompt_ids

SETTINGS = {"model": "tiny", "text": "random", "chunk_size": 16, "bucket": 50}
SPECS = ["full", "streaming_llm"]


class Interrupted(Exception):
    pass


def stream(model, ids, out, progress=None):
    return run_stream(model, ids, SPECS, out=out, budget=40, chunk=16, bucket=50, tokens=300, dense_limit=200,
                      settings=SETTINGS, progress=progress)  # fmt: skip


def values(rows):
    return {stream_key(r): (r["nll"], r["kv_tokens"]) for r in rows}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, ids = make_model("llama"), prompt_ids(300)
    reference = stream(model, ids, tmp_path_factory.mktemp("reference"))
    return model, ids, reference


def test_rows_per_bucket(setup):
    _, _, rows = setup
    assert expected_buckets(200, 50) == [(1, 50), (51, 100), (101, 150), (151, 199)]
    assert [(r["bucket_start"], r["bucket_end"]) for r in rows if r["method"] == "full"] == expected_buckets(200, 50)
    assert len([r for r in rows if r["method"] == "streaming_llm"]) == 6
    assert all(r["kv_tokens"] <= 40 + 16 for r in rows if r["method"] == "streaming_llm")
    assert all({**SETTINGS}.items() <= r.items() for r in rows)


def test_interrupted_stream_resumes_without_losing_or_repeating_rows(setup, tmp_path):
    model, ids, reference = setup
    seen = {"streaming_llm": 0}

    def stop_midway(spec, k, total):
        if spec == "streaming_llm":
            seen[spec] += k
            if seen[spec] >= 160:  # three of six buckets written
                raise Interrupted

    with pytest.raises(Interrupted):
        stream(model, ids, tmp_path, progress=stop_midway)
    written = [json.loads(line) for line in (tmp_path / STREAM_FILE).read_text().splitlines()]
    assert len([r for r in written if r["method"] == "full"]) == 4  # the finished method is all there
    assert 1 <= len([r for r in written if r["method"] == "streaming_llm"]) < 6  # and the buckets done so far

    calls = []
    rows = stream(model, ids, tmp_path, progress=lambda spec, k, total: calls.append((spec, k, total)))
    assert [c for c in calls if c[0] == "full"] == [("full", 200, 200)]  # skipped: reported done at once
    lines = (tmp_path / STREAM_FILE).read_text().splitlines()
    keys = [stream_key(json.loads(line)) for line in lines]
    assert len(keys) == len(set(keys)) == len(reference)
    assert values(rows) == values(reference)


def test_torn_stream_line_is_set_aside(setup, tmp_path):
    model, ids, reference = setup
    stream(model, ids, tmp_path)
    path = tmp_path / STREAM_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # the last row torn
    rows = stream(model, ids, tmp_path)
    assert values(rows) == values(reference)
    assert len(path.read_text().splitlines()) == len(reference)
    assert (tmp_path / (STREAM_FILE + ".partial")).read_bytes().endswith(b"\n")


def test_other_settings_are_refused(setup, tmp_path):
    model, ids, _ = setup
    (tmp_path / STREAM_FILE).write_text(json.dumps({"method": "full", **SETTINGS, "chunk_size": 1}) + "\n")
    with pytest.raises(KVSieveError, match="other settings"):
        stream(model, ids, tmp_path)


def test_ppl_between_weights_buckets():
    rows = [
        {"bucket_start": 1, "bucket_end": 10, "nll": 1.0},
        {"bucket_start": 11, "bucket_end": 15, "nll": 4.0},
    ]
    assert ppl_between(rows, 0) == pytest.approx(2.718281828 ** ((10 * 1 + 5 * 4) / 15))
    assert ppl_between(rows, 0, 10) == pytest.approx(2.718281828)


def test_kvsieve_stream_killed_with_sigkill_resumes(tmp_path):
    """The CLI end to end: `kvsieve stream` killed -9 mid-run keeps its finished buckets; a rerun completes the file
    with exactly the rows of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from bench_tiny import tiny_model
    from kvsieve.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    model_dir = tmp_path / "tiny"
    tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = ["--model", str(model_dir), "--methods", "streaming_llm", "--budget", "64", "--tokens", "3000",
            "--chunk-size", "20", "--bucket", "100", "--text", "pydoc"]  # fmt: skip
    command = [sys.executable, "-m", "kvsieve.cli", "stream", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run([*command, "--out", str(whole)], check=True, capture_output=True, env=env, timeout=300)
    process = subprocess.Popen([*command, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)  # fmt: skip
    rows = cut / STREAM_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not rows.exists() or len(rows.read_text().splitlines()) < 5):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    kept = len(rows.read_bytes().split(b"\n")) - 1
    assert 5 <= kept < 30, kept  # killed mid-stream, its finished buckets on disk
    subprocess.run([*command, "--out", str(cut)], check=True, capture_output=True, env=env, timeout=300)

    def load(path):
        return [json.loads(line) for line in (path / STREAM_FILE).read_text().splitlines()]

    assert values(load(cut)) == values(load(whole))
    assert len(load(cut)) == len(load(whole)) == 30
