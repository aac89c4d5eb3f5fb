"""Long-context evaluation tasks generated locally from a seed (RULER-style), with their scorers.

Each :class:`Sample` is a context, a question asked after it, the answers and an answer prefix, with the
token length of ``context + question`` fitted to a target under the model's own tokenizer (counted with
``add_special_tokens=False``; the chat template comes on top) to within 1%, usually exactly.

Tasks (:data:`TASKS`):

* ``passkey``: Landmark Attention's pass key in repeated noise.
* ``niah_single_number`` / ``niah_single_word`` / ``niah_single_uuid``: RULER's single needle with a
  7-digit number, a word or a UUID as the value.
* ``niah_multikey``: four needles with different keys, one asked.
* ``niah_multivalue``: one key with four values, all asked.
* ``niah_multiquery``: four keys asked at once.
* ``variable_tracking``: chains of ``VAR X = VAR Y`` assignments.
* ``common_words``: the 10 most common words of a numbered list.
* ``frequent_words``: the 3 most frequent coded words under a Zipf law.
* ``qa``: a question about invented facts, with distractor facts.
* ``multi_passkey``: four doors' pass keys in one context, each asked in its own question (``Sample.followups``):
  the bench compresses the context once and answers every question from that cache.
* ``multi_number``: four differently named numbers (pass key, door code, room number, ticket number) in one
  context, each asked in its own question, as ``multi_passkey``.

Haystacks (:mod:`kvsieve.tasks.haystack`, all offline): ``"pydoc"`` (CPython's ``pydoc_data`` topics, the
default of the NIAH tasks and ``qa``), ``"licenses"`` (``/usr/share/common-licenses``) and ``"noise"`` (the
repeated "The grass is green. ..." of ``passkey`` and ``variable_tracking``).

Metric (every task): RULER's ``string_match_all``, the fraction of ``answers`` that occur
case-insensitively in the prediction; 0 or 1 for single-answer tasks.

Example::

    from kvsieve.tasks import get_task
    task = get_task("passkey")
    samples = task.generate(tokenizer, length=2000, n=5, seed=0)
    score = task.score(samples[0], model_output)
"""

from __future__ import annotations

from kvsieve.errors import KVSieveError
from kvsieve.tasks.aggregation import CommonWordsTask, FrequentWordsTask
from kvsieve.tasks.base import (
    DEFAULT_HAYSTACK,
    LENGTH_TOLERANCE,
    HaystackTask,
    Question,
    Sample,
    Task,
    TaskError,
    count_occurrences,
    count_tokens,
    string_match_all,
)
from kvsieve.tasks.haystack import HAYSTACKS, HaystackNotFoundError, UnknownHaystackError, load_haystack
from kvsieve.tasks.image import IMAGE_TASKS, ImageTask
from kvsieve.tasks.multidoc import MultiDocQATask
from kvsieve.tasks.niah import MultiNumberTask, MultiPasskeyTask, NIAHTask, PasskeyTask
from kvsieve.tasks.qa import QATask
from kvsieve.tasks.tracking import VariableTrackingTask

__all__ = [
    "DEFAULT_HAYSTACK",
    "DEFAULT_TASK_MIX",
    "HAYSTACKS",
    "LENGTH_TOLERANCE",
    "TASKS",
    "CommonWordsTask",
    "FrequentWordsTask",
    "HaystackNotFoundError",
    "HaystackTask",
    "ImageTask",
    "MultiNumberTask",
    "MultiPasskeyTask",
    "NIAHTask",
    "PasskeyTask",
    "QATask",
    "Question",
    "Sample",
    "Task",
    "TaskError",
    "UnknownHaystackError",
    "UnknownTaskError",
    "VariableTrackingTask",
    "count_occurrences",
    "count_tokens",
    "get_task",
    "list_tasks",
    "load_haystack",
    "string_match_all",
]


class UnknownTaskError(KVSieveError, KeyError):
    """A task name that is not in :data:`TASKS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _build() -> dict[str, Task]:
    tasks: list[Task] = [
        PasskeyTask(),
        NIAHTask("niah_single_number", "RULER single needle: a 7-digit magic number for a key, in prose.", "number"),
        NIAHTask("niah_single_word", "RULER single needle: a magic word for a key, in prose.", "word"),
        NIAHTask("niah_single_uuid", "RULER single needle: a magic UUID for a key, in prose.", "uuid"),
        NIAHTask(
            "niah_multikey", "RULER multi-key needle: four keys with numbers hidden, one asked.", "number", num_keys=4
        ),
        NIAHTask(
            "niah_multivalue", "RULER multi-value needle: one key with four numbers, all asked.", "number", num_values=4
        ),
        NIAHTask(
            "niah_multiquery",
            "RULER multi-query needle: four keys with numbers, all asked at once.",
            "number",
            num_keys=4,
            num_queries=4,
        ),
        VariableTrackingTask(),
        CommonWordsTask(),
        FrequentWordsTask(),
        QATask(),
        MultiPasskeyTask(),
        MultiNumberTask(),
        MultiDocQATask(),
        *IMAGE_TASKS,  # image_text, image_objects, image_needle, image_document (vision-language models)
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _build()
"""Every task by name."""

DEFAULT_TASK_MIX: list[str] = ["passkey", "niah_single_number", "niah_multikey", "variable_tracking", "qa"]
"""The short mix the default benchmark runs (at 2k tokens)."""


def get_task(name: str) -> Task:
    """The task called ``name``; :class:`UnknownTaskError` (a ``KeyError``) listing the valid names."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UnknownTaskError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def list_tasks() -> list[Task]:
    """Every task, in registry order."""
    return list(TASKS.values())
