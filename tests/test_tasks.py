"""Tests of the long-context evaluation tasks (kvsieve.tasks) with the real SmolLM2 tokenizer."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest

from kvsieve.errors import KVSieveError
from kvsieve.tasks import (
    DEFAULT_TASK_MIX,
    TASKS,
    Sample,
    TaskError,
    UnknownHaystackError,
    UnknownTaskError,
    count_tokens,
    get_task,
    list_tasks,
    string_match_all,
)
from kvsieve.tasks import haystack as haystack_mod

ALL_TASKS = [
    "passkey",
    "niah_single_number",
    "niah_single_word",
    "niah_single_uuid",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "qa",
    "multi_passkey",
    "multi_number",
    "multidoc_qa",
]
IMAGE_TASKS = ["image_text", "image_objects", "image_needle", "image_document"]  # tests/test_image_tasks.py
DEPTH_TASKS = [name for name in ALL_TASKS if TASKS[name].uses_depth]


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from kvsieve.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


_CACHE: dict[tuple[Any, ...], list[Sample]] = {}


def generate(tok: Any, name: str, length: int, n: int = 3, seed: int = 0, **kw: Any) -> list[Sample]:
    """Generate once per argument set; several tests look at the same samples."""
    key = (name, length, n, seed, tuple(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = TASKS[name].generate(tok, length, n, seed, **kw)
    return _CACHE[key]


# -- registry ------------------------------------------------------------------------------------------


def test_registry() -> None:
    assert list(TASKS) == ALL_TASKS + IMAGE_TASKS
    assert [t.name for t in list_tasks()] == ALL_TASKS + IMAGE_TASKS
    assert set(DEFAULT_TASK_MIX) <= set(TASKS)
    for name, task in TASKS.items():
        assert get_task(name) is task
        assert task.description and task.metric == "string_match_all" and task.max_new_tokens > 0


def test_unknown_task_lists_valid_names() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_task("niah_nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, KVSieveError)
    assert "niah_nope" in str(info.value) and "passkey" in str(info.value) and "qa" in str(info.value)


# -- every task -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_TASKS)
def test_deterministic_for_a_seed(tokenizer: Any, name: str) -> None:
    first = generate(tokenizer, name, 2000, n=2, seed=7)
    again = TASKS[name].generate(tokenizer, 2000, 2, 7)
    assert first == again
    other = generate(tokenizer, name, 2000, n=2, seed=8)
    for a, b in zip(first, other, strict=True):
        assert a.context != b.context and a.answers != b.answers
    assert first[0].context != first[1].context  # the samples of one seed differ too
    for i, s in enumerate(first):
        assert (s.task, s.seed, s.index, s.length) == (name, 7, i, 2000)


@pytest.mark.parametrize("length", [500, 2000, 4000])
@pytest.mark.parametrize("name", ALL_TASKS)
def test_length_within_one_percent(tokenizer: Any, name: str, length: int) -> None:
    for s in generate(tokenizer, name, length):
        assert s.n_tokens == len(tokenizer(s.context + s.question, add_special_tokens=False)["input_ids"])
        assert s.n_tokens == count_tokens(tokenizer, s.prompt)
        assert abs(s.n_tokens - length) <= 0.01 * length, (s.n_tokens, length)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_answers_occur_as_intended(tokenizer: Any, name: str) -> None:
    for length in (2000, 4000):
        for s in generate(tokenizer, name, length):
            expected = s.meta["expected_occurrences"]
            assert set(expected) == set(s.answers) and len(set(s.answers)) == len(s.answers)
            for answer in s.answers:
                assert s.context.lower().count(answer.lower()) == expected[answer], answer
                assert answer.lower() not in s.question.lower()
                assert answer.lower() not in s.answer_prefix.lower()
            for text, count in s.meta.get("checked_occurrences", {}).items():
                assert s.context.lower().count(text.lower()) == count, text


@pytest.mark.parametrize("name", ALL_TASKS)
def test_scorer(tokenizer: Any, name: str) -> None:
    task = TASKS[name]
    s = generate(tokenizer, name, 500)[0]
    assert task.score(s, " ".join(s.answers)) == 1.0
    assert task.score(s, ", ".join(a.upper() for a in reversed(s.answers)) + ".") == 1.0
    assert task.score(s, "") == 0.0
    assert task.score(s, "I could not find it in the text.") == 0.0
    if len(s.answers) > 1:
        assert 0.0 < task.score(s, s.answers[0]) < 1.0
    assert string_match_all(" ".join(s.answers), s.answers) == 1.0


@pytest.mark.parametrize("name", DEPTH_TASKS)
def test_depth_places_the_needle(tokenizer: Any, name: str) -> None:
    windows = {0: (0.0, 0.15), 50: (0.35, 0.65), 100: (0.85, 1.0)}
    for depth, (lo, hi) in windows.items():
        for s in generate(tokenizer, name, 2000, n=2, depth=depth):
            assert s.depth == depth
            at = s.context.lower().find(s.answers[0].lower())  # the first asked needle sits at the depth
            assert lo <= at / len(s.context) <= hi, (depth, at / len(s.context))
            assert s.meta["needle_offsets"][0] <= at < s.meta["needle_offsets"][0] + 200


@pytest.mark.parametrize("name", ALL_TASKS)
def test_depth_none_spreads_samples(tokenizer: Any, name: str) -> None:
    samples = generate(tokenizer, name, 500, n=3)
    expected = [0.0, 50.0, 100.0] if TASKS[name].uses_depth else [None] * 3
    assert [s.depth for s in samples] == expected


# -- task-specific checks ------------------------------------------------------------------------------


def test_passkey_format(tokenizer: Any) -> None:
    s = generate(tokenizer, "passkey", 2000)[1]
    key = s.answers[0]
    assert re.fullmatch(r"\d{5}", key)
    assert s.context.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in s.context
    assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in s.context
    assert (s.question, s.answer_prefix) == ("What is the pass key? Answer with the number only.", "The pass key is")
    assert not re.search(r"\d", s.context.replace(key, ""))  # the noise has no other digits


def test_niah_values(tokenizer: Any) -> None:
    number = generate(tokenizer, "niah_single_number", 2000)[0]
    assert re.fullmatch(r"\d{7}", number.answers[0])
    uuid = generate(tokenizer, "niah_single_uuid", 2000)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.answers[0])
    word = generate(tokenizer, "niah_single_word", 2000)[0]
    key = word.meta["keys"][0]
    assert f"One of the special magic words for {key} is: {word.answers[0]}." in word.context
    assert key in word.question
    multikey = generate(tokenizer, "niah_multikey", 2000)[0]
    assert len(multikey.meta["keys"]) == 4 and len(multikey.answers) == 1
    multivalue = generate(tokenizer, "niah_multivalue", 2000)[0]
    assert len(multivalue.meta["keys"]) == 1 and len(multivalue.answers) == 4
    multiquery = generate(tokenizer, "niah_multiquery", 2000)[0]
    assert len(multiquery.answers) == 4 and all(k in multiquery.question for k in multiquery.meta["keys"])


def test_variable_tracking_chain_resolves(tokenizer: Any) -> None:
    for s in generate(tokenizer, "variable_tracking", 2000):
        value: dict[str, str] = {}
        for lhs, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", s.context):
            value[lhs] = value[rhs[4:]] if rhs.startswith("VAR ") else rhs
        asked = re.search(r"assigned the value (\d+)", s.question)
        assert asked is not None
        assert sorted(k for k, v in value.items() if v == asked.group(1)) == sorted(s.answers)
        assert len(s.answers) == 5


def test_common_words_are_the_most_common(tokenizer: Any) -> None:
    for s in generate(tokenizer, "common_words", 2000):
        counts = Counter(re.findall(r"^\d+\. (\w+)$", s.context, flags=re.MULTILINE))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in top)


def test_frequent_words_are_the_most_frequent(tokenizer: Any) -> None:
    for s in generate(tokenizer, "frequent_words", 2000):
        body = s.context.split("\n\n", 1)[1]
        counts = Counter(body.split())
        ranked = [w for w, _ in counts.most_common(4)]
        assert ranked[:3] == s.answers
        assert counts[ranked[2]] > counts[ranked[3]]


def test_qa_fact_and_distractors(tokenizer: Any) -> None:
    s = generate(tokenizer, "qa", 2000)[0]
    assert s.meta["fact"] in s.context and s.meta["entity"] in s.question
    assert s.meta["fact"].startswith(s.answer_prefix) and s.meta["fact"].endswith(s.answers[0] + ".")
    assert len(s.meta["distractors"]) == 8 and all(d in s.context for d in s.meta["distractors"])


def test_multi_passkey_asks_every_door_in_reading_order(tokenizer: Any) -> None:
    task = TASKS["multi_passkey"]
    for s in generate(tokenizer, "multi_passkey", 2000):
        assert s.n_questions == task.questions_per_sample == 4 and len(s.followups) == 3
        keys = [s.for_question(i).answers[0] for i in range(4)]
        assert keys == s.meta["keys"] and len(set(keys)) == 4
        offsets = [s.context.find(k) for k in keys]
        assert offsets == sorted(offsets) and all(s.context.count(k) == 2 for k in keys)
        assert [s.for_question(i).depth for i in range(1, 4)] == [37.5, 62.5, 87.5]
        for i, label in enumerate(s.meta["labels"]):
            view = s.for_question(i)
            assert label in view.question and view.answer_prefix.endswith(f"the {label} door is")
            assert view.context == s.context and (view.followups == [] or i == 0)
            assert task.score(view, f"It is {keys[i]}.") == 1.0
            assert task.score(view, " ".join(k for j, k in enumerate(keys) if j != i)) == 0.0
    other = TASKS["multi_passkey"].generate(tokenizer, 2000, 1, 1)[0]
    assert other.meta["keys"] != generate(tokenizer, "multi_passkey", 2000)[0].meta["keys"]


def test_multi_number_asks_four_differently_named_numbers_in_reading_order(tokenizer: Any) -> None:
    task = TASKS["multi_number"]
    for s in generate(tokenizer, "multi_number", 1000):
        assert s.n_questions == 4 and sorted(s.meta["labels"]) == sorted(label for label, _ in task.facts)
        values = [s.for_question(i).answers[0] for i in range(4)]
        assert values == s.meta["keys"] and len(set(values)) == 4
        digits = dict(task.facts)
        assert [len(v) for v in values] == [digits[label] for label in s.meta["labels"]]
        offsets = [s.context.find(f"The {label} is {v}.") for label, v in zip(s.meta["labels"], values, strict=True)]
        assert min(offsets) >= 0 and offsets == sorted(offsets) and all(s.context.count(v) == 2 for v in values)
        for i, label in enumerate(s.meta["labels"]):
            view = s.for_question(i)
            assert view.question == f"What is the {label}? Answer with the number only."
            assert task.score(view, f" {values[i]}.") == 1.0
            assert task.score(view, " ".join(v for j, v in enumerate(values) if j != i)) == 0.0


def test_single_question_samples_have_no_followups(tokenizer: Any) -> None:
    s = generate(tokenizer, "passkey", 500)[0]
    assert s.n_questions == 1 and s.followups == [] and s.for_question(0) is s


# -- haystacks and errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("haystack", ["noise", "pydoc", "licenses"])
def test_other_haystacks(tokenizer: Any, haystack: str) -> None:
    if haystack == "licenses" and not haystack_mod.LICENSES_DIR.is_dir():
        pytest.skip("no /usr/share/common-licenses here")
    for name in ("passkey", "niah_multikey"):
        for s in generate(tokenizer, name, 1500, n=2, haystack=haystack):
            assert s.meta["haystack"] == haystack
            assert abs(s.n_tokens - 1500) <= 15
            for answer in s.answers:
                assert s.context.lower().count(answer.lower()) == s.meta["expected_occurrences"][answer]


def test_default_haystacks(tokenizer: Any) -> None:
    assert generate(tokenizer, "passkey", 500)[0].meta["haystack"] == "noise"
    assert generate(tokenizer, "variable_tracking", 500)[0].meta["haystack"] == "noise"
    for name in ("niah_single_number", "niah_single_word", "niah_multiquery", "qa"):
        assert generate(tokenizer, name, 500)[0].meta["haystack"] == "pydoc"


def test_haystack_starts_differ() -> None:
    text = haystack_mod.load_haystack("pydoc")
    assert len(text) > 100_000 and "\n\n" in text
    with pytest.raises(UnknownHaystackError, match="valid: licenses, noise, pydoc"):
        haystack_mod.load_haystack("wikipedia")


def test_missing_licenses_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setattr(haystack_mod, "LICENSES_DIR", tmp_path / "absent")
    haystack_mod.load_haystack.cache_clear()
    try:
        with pytest.raises(haystack_mod.HaystackNotFoundError, match="absent"):
            haystack_mod.load_haystack("licenses")
    finally:
        haystack_mod.load_haystack.cache_clear()


def test_bad_arguments(tokenizer: Any) -> None:
    task = get_task("qa")
    with pytest.raises(TaskError, match="too short"):
        task.generate(tokenizer, 40, 1, 0)
    with pytest.raises(TaskError, match="depth"):
        task.generate(tokenizer, 500, 1, 0, depth=101)
    with pytest.raises(TaskError, match="length"):
        task.generate(tokenizer, 0, 1, 0)
    with pytest.raises(UnknownHaystackError):
        task.generate(tokenizer, 500, 1, 0, haystack="nope")
    with pytest.raises(UnknownHaystackError):
        get_task("common_words").generate(tokenizer, 500, 1, 0, haystack="nope")
    assert task.generate(tokenizer, 500, 0, 0) == []


def test_sample_record(tokenizer: Any) -> None:
    s = generate(tokenizer, "niah_multivalue", 500)[0]
    assert s.prompt == s.context + s.question
    assert s.context.endswith("\n\n") and not s.question.startswith((" ", "\n"))
    d = s.to_dict()
    assert d["answers"] == s.answers and d["meta"]["expected_occurrences"] == s.meta["expected_occurrences"]
    assert s.max_new_tokens <= 128


def test_niah_allowance_is_the_answers_tokens_plus_slack(tokenizer: Any) -> None:
    for name in ("niah_single_number", "niah_single_uuid", "niah_multivalue"):
        s = generate(tokenizer, name, 500)[0]
        need = sum(len(tokenizer(" " + a, add_special_tokens=False).input_ids) + 16 for a in s.answers)
        assert s.max_new_tokens == min(128, need), name
    assert generate(tokenizer, "passkey", 500)[0].max_new_tokens == TASKS["passkey"].max_new_tokens


def test_a_prediction_that_scores_one_is_settled(tokenizer: Any) -> None:
    task = TASKS["niah_multikey"]
    s = generate(tokenizer, "niah_multikey", 500)[0]
    assert not task.settled(s, "I do not know")
    assert task.settled(s, f"it is {s.answers[0]} and more")
