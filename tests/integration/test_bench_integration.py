"""The benchmark on the embedded model: rows, resumability, the report, and what full attention really solves."""

from __future__ import annotations

import json

import pytest

from kvsieve.bench.runner import BenchConfig, Runner, row_key
from kvsieve.errors import BudgetError, KVSieveError


def test_bench_writes_rows_resumes_and_reports(smollm2, tmp_path):
    model, tok = smollm2
    config = BenchConfig(
        tasks=["niah_single_number"],
        methods=["full", "snapkv", "streaming_llm"],
        compressions=[0.5],
        lengths=[512],
        samples=1,
        out=str(tmp_path),
    )
    runner = Runner(config, model, tok)
    assert runner.total_rows() == 3
    rows = runner.run()
    assert [r["method"] for r in rows] == ["full", "snapkv", "streaming_llm"]
    full, snap = rows[0], rows[1]
    assert full["kv_bytes"] == full["kv_bytes_full"]
    # bytes held = tokens kept, int(n * 0.5) of n context tokens, x 30 layers x 3 KV heads x 64 dims x K,V x fp32
    assert snap["kv_bytes"] == int(snap["context_tokens"] * 0.5) * 30 * 3 * 64 * 2 * 4
    for r in rows:
        assert set(r) >= {
            "method",
            "method_params",
            "compression",
            "task",
            "length",
            "depth",
            "mode",
            "score",
            "kv_bytes",
            "prefill_seconds",
            "decode_seconds_per_token",
            "model",
            "versions",
            "seed",
        }
        assert 0.0 <= r["score"] <= 1.0
    # full attention finds the needle at 512 tokens, and decoding stops once the answer is there (score settled)
    answer = full["answers"][0]
    assert full["score"] == 1.0
    assert len(full["prediction"]) - (full["prediction"].find(answer) + len(answer)) <= 2, full["prediction"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3
    # a second run skips every row already there
    again = Runner(config, model, tok).run()
    assert again == [] and len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    assert {row_key(json.loads(line)) for line in lines} == {row_key(r) for r in rows}
    assert json.loads((tmp_path / "config.json").read_text())["methods"] == config.methods

    from kvsieve.bench.report import write_report

    html = write_report(tmp_path).read_text()
    assert "snapkv" in html and "<svg" in html


def test_bench_validates_before_loading_anything():
    with pytest.raises(BudgetError, match="outside"):
        BenchConfig(compressions=[1.5]).validate()
    with pytest.raises(KVSieveError, match="unknown task"):
        BenchConfig(tasks=["nope"]).validate()


# Measured with `kvsieve bench --methods full --tasks passkey --lengths 2048,4096 --samples 4` (see README).
PASSKEY_FLOOR = {2048: 1.0, 4096: 1.0}  # measured: 4/4 at 2k and 4/4 at 4k (seed 0)


@pytest.mark.parametrize("length", [2048, 4096])
def test_full_attention_solves_passkey(smollm2, tmp_path, length):
    model, tok = smollm2
    config = BenchConfig(tasks=["passkey"], methods=["full"], lengths=[length], samples=4, out=str(tmp_path))
    rows = Runner(config, model, tok).run()
    accuracy = sum(r["score"] for r in rows) / len(rows)
    print(f"full attention, passkey at {length} tokens: {accuracy:.2f} over {len(rows)} samples")
    assert accuracy >= PASSKEY_FLOOR[length]
