"""The bench runner on a tiny random-weight model: crash-safe rows, resume, work units, multi-question samples."""

from __future__ import annotations

import json

import pytest

from bench_tiny import tiny_model
from kvsieve.bench.results import ResultsFile, prepare_out_dir
from kvsieve.bench.runner import BenchConfig, Runner, model_window, row_key
from kvsieve.bench.units import Conversation
from kvsieve.errors import BudgetError, ContextLengthError, KVSieveError
from kvsieve.tasks import get_task

TIMING = {"run_id", "timestamp", "prefill_seconds", "decode_seconds_per_token"}


@pytest.fixture(scope="module")
def tokenizer():
    from kvsieve.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(len(tokenizer))


def stable(rows: list[dict]) -> dict:
    """Rows by key without the fields that change from run to run (times, run id)."""
    return {row_key(r): {k: v for k, v in r.items() if k not in TIMING} for r in rows}


# -- result files ------------------------------------------------------------------------------------------


def test_results_file_sets_a_torn_last_line_aside(tmp_path):
    file = ResultsFile(tmp_path / "results.jsonl")
    file.append({"a": 1})
    file.append({"a": 2})
    with file.path.open("ab") as f:
        f.write(b'{"a": 3, "pred')  # a crash in the middle of a write
    recovery = file.recover()
    assert recovery is not None and recovery.lines == 1
    assert file.partial.read_bytes() == b'{"a": 3, "pred\n'
    assert file.path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    file.append({"a": 3})
    assert [json.loads(line) for line in file.path.read_text().splitlines()] == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert file.recover() is None  # sound now: nothing more set aside
    assert file.partial.read_bytes() == b'{"a": 3, "pred\n'


def test_results_file_sets_glued_lines_aside_and_keeps_the_rest(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2, "x{"a": 3}\n{"a": 4}\n')  # what older kvsieve left after a resume
    file = ResultsFile(path)
    assert file.recover().lines == 1
    assert file.rows() == [{"a": 1}, {"a": 4}]
    assert b'{"a": 2, "x{"a": 3}' in file.partial.read_bytes()
    assert file.recover() is None


def test_rows_ignore_a_torn_tail_without_touching_the_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a"')
    assert ResultsFile(path).rows() == [{"a": 1}]
    assert path.read_bytes() == b'{"a": 1}\n{"a"'


def test_out_dir_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(KVSieveError, match="is a file, not a directory"):
        prepare_out_dir(a_file)
    with pytest.raises(KVSieveError, match="cannot be created"):
        prepare_out_dir(a_file / "sub")
    assert prepare_out_dir(tmp_path / "new" / "dir").is_dir()


# -- the issue-14 repro: a resumed bench after a torn last line -------------------------------------------


def test_resume_after_a_torn_last_line_redoes_that_row(model, tokenizer, tmp_path):
    config = BenchConfig(tasks=["passkey"], methods=["full", "snapkv"], compressions=[0.5], lengths=[512], samples=4,
                         out=str(tmp_path))  # fmt: skip
    first = Runner(config, model, tokenizer).run()
    assert len(first) == 8
    path = tmp_path / "results.jsonl"
    data = path.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn = data[: last_start + (len(data) - last_start) // 2]  # the last row cut in half, no newline
    path.write_bytes(torn)
    runner = Runner(config, model, tokenizer)
    assert runner.recovery is not None and runner.recovery.lines == 1
    again = runner.run()
    assert len(again) == 1 and row_key(again[0]) == row_key(first[-1])
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is a whole row
    assert len(rows) == 8 and stable(rows) == stable(first)
    assert (tmp_path / "results.jsonl.partial").read_bytes() == data[last_start : len(torn)] + b"\n"


def test_a_row_already_there_is_never_written_twice(model, tokenizer, tmp_path):
    config = BenchConfig(tasks=["passkey"], methods=["full"], lengths=[512], samples=1, out=str(tmp_path))
    runner = Runner(config, model, tokenizer)
    [row] = runner.run()
    assert runner._append(dict(row)) is False  # a retried unit's row
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1


# -- planning ------------------------------------------------------------------------------------------------


def test_work_units_group_the_shared_prefill(model, tokenizer, tmp_path):
    from kvsieve.methods import build
    from kvsieve.snapshot import shareable

    methods = ["full", "snapkv", "zerotuning", "streaming_llm"]
    own = [m for m in methods if not shareable(build(m))]
    assert own, "the test needs a method that prefills on its own"
    config = BenchConfig(tasks=["passkey"], methods=methods, compressions=[0.5], lengths=[512], samples=2,
                         out=str(tmp_path))  # fmt: skip
    runner = Runner(config, model, tokenizer)
    units = runner.plan()
    # per sample: one unit for the methods a snapshot replays, one per method that prefills on its own
    per_sample = [([m for m in methods if m not in own], True)] + [([m], False) for m in own]
    assert [([j.method for j in u.jobs], u.shared) for u in units[: len(per_sample)]] == per_sample
    assert len(units) == 2 * len(per_sample) and runner.total_rows() == 8
    rows = runner.run()
    assert len(rows) == 8 and {r["shared_prefill"] for r in rows if r["method"] in own} == {False}
    assert Runner(config, model, tokenizer).plan() == []


def test_prefill_and_sequence_axes_are_their_own_rows_and_prefill_on_their_own(model, tokenizer, tmp_path):
    config = BenchConfig(tasks=["passkey"], methods=["full", "snapkv"], compressions=[0.5], lengths=[512], samples=1,
                         sequences=["none", "fastv(layer=0, keep=0.5)"], prefills=["dense", "oracle_topk(density=1.0)"],
                         out=str(tmp_path))  # fmt: skip
    runner = Runner(config, model, tokenizer)
    assert runner.total_rows() == 2 * 2 * 2  # methods x sequences x prefills (one budget each)
    units = runner.plan()
    assert [u.shared for u in units].count(True) == 1 and len(units) == 1 + 6  # only the plain pair shares
    rows = runner.run()
    combos = {(r["method"], r["prefill"], r["sequence"]) for r in rows}
    assert len(combos) == 8 and ("full", None, None) in combos
    assert ("snapkv", "oracle_topk(density=1.0)", "fastv(layer=0)") in combos
    plain = {r["method"]: r for r in rows if r["prefill"] is None and r["sequence"] is None}
    exact = {r["method"]: r for r in rows if r["prefill"] is not None and r["sequence"] is None}
    assert all(plain[m]["prediction"] == exact[m]["prediction"] for m in plain)  # density 1 is dense attention
    pruned = [r for r in rows if r["sequence"]]
    assert all(r["kv_tokens"] < p["kv_tokens"] for r in pruned for p in plain.values() if p["method"] == r["method"])
    assert Runner(config, model, tokenizer).plan() == []


# -- validation ------------------------------------------------------------------------------------------------


def test_config_errors_name_the_problem():
    with pytest.raises(KVSieveError, match="--methods is empty"):
        BenchConfig(methods=[]).validate()
    with pytest.raises(KVSieveError, match="--tasks is empty"):
        BenchConfig(tasks=[]).validate()
    with pytest.raises(BudgetError, match="snapkv needs a budget"):
        BenchConfig(methods=["snapkv"], compressions=[]).validate()
    with pytest.raises(KVSieveError, match="turns must be"):
        BenchConfig(turns="sideways").validate()
    with pytest.raises(ContextLengthError, match=r"length 100000 does not fit .* window of 8192.*up to 7936"):
        BenchConfig(lengths=[100000]).validate(window=8192)
    BenchConfig(lengths=[7936]).validate(window=8192)


def test_model_window_is_read_without_weights(tmp_path):
    assert model_window("smollm2-135m") == 8192
    assert model_window("some-org/some-model") is None  # a hub id: checked once loaded
    tiny_model(100, max_positions=640).config.save_pretrained(tmp_path)
    assert model_window(str(tmp_path)) == 640


def test_runner_checks_lengths_against_a_given_model(model, tokenizer, tmp_path):
    with pytest.raises(ContextLengthError, match="length 5000"):
        Runner(BenchConfig(lengths=[5000], out=str(tmp_path)), model, tokenizer)


# -- multi-question samples -------------------------------------------------------------------------------------


def test_multi_question_rows_per_question_and_turn_mode(model, tokenizer, tmp_path):
    config = BenchConfig(tasks=["multi_passkey"], methods=["full", "snapkv"], compressions=[0.75], lengths=[512],
                         samples=1, turns="both", mode="both", out=str(tmp_path))  # fmt: skip
    runner = Runner(config, model, tokenizer)
    rows = runner.run()
    assert len(rows) == runner.total_rows() == 2 * 4 * 2 * 2  # methods x questions x turn modes x modes
    sample = get_task("multi_passkey").generate(tokenizer, 512, 1, 0)[0]
    for r in rows:
        asked = sample.for_question(r["question_index"])
        assert r["answers"] == asked.answers and r["question"] == asked.question
        assert r["turn_mode"] in ("independent", "multiturn")
        assert r["depth"] == [12.5, 37.5, 62.5, 87.5][r["question_index"]]
    assert Runner(config, model, tokenizer).run() == []  # resumes to nothing


def test_independent_questions_see_the_same_compressed_cache(model, tokenizer, tmp_path):
    """Question i asked after the others (cache restored in between) answers as if asked alone."""
    sample = get_task("multi_passkey").generate(tokenizer, 512, 1, 0)[0]
    config = BenchConfig(tasks=["multi_passkey"], methods=["snapkv"], compressions=[0.75], lengths=[512],
                         samples=1, out=str(tmp_path / "a"))  # fmt: skip
    rows = {r["question_index"]: r for r in Runner(config, model, tokenizer).run()}
    from kvsieve.bench.units import Job, RunInfo, UnitRunner, WorkUnit

    units = UnitRunner(model, tokenizer, RunInfo("m", 0, "x"))
    for i in (1, 3):
        alone = sample.for_question(i)  # the same context, this question only
        [row] = units.run(WorkUnit(512, 0, alone, "agnostic", [Job("snapkv", {"compression": 0.75})], shared=True))
        assert row["prediction"] == rows[i]["prediction"] and row["kv_bytes"] == rows[i]["kv_bytes"]


def test_multiturn_follow_up_closes_the_previous_turn(tokenizer):
    sample = get_task("multi_passkey").generate(tokenizer, 512, 1, 0)[0]
    talk = Conversation(tokenizer, sample)
    history = [sample.answer_prefix + " 12345."]
    text = tokenizer.decode(talk.next_turn(history, 1)[0])
    second = sample.for_question(1)
    assert text.startswith("<|im_end|>") and second.question in text
    assert text.endswith("assistant\n" + second.answer_prefix)
    _, question = talk.first_turn(0)
    assert tokenizer.decode(question[0]).startswith(sample.question)
