"""The sample record, the task interface, length fitting and the needle-in-a-haystack machinery."""

from __future__ import annotations

import bisect
import dataclasses
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvsieve.errors import KVSieveError
from kvsieve.tasks.haystack import HaystackIndex, canonical_haystack, haystack_index, insertion_points

__all__ = [
    "CONTEXT_END",
    "DEFAULT_HAYSTACK",
    "LENGTH_TOLERANCE",
    "HaystackTask",
    "Needles",
    "Question",
    "Sample",
    "Task",
    "TaskError",
    "count_occurrences",
    "count_tokens",
    "fit_length",
    "place_needles",
    "string_match_all",
]

DEFAULT_HAYSTACK = "<default>"
"""Sentinel for ``generate(haystack=...)``: the task's own default haystack."""

LENGTH_TOLERANCE = 0.01
"""``n_tokens`` lands within this fraction of the target length (the fit usually hits it exactly)."""

CONTEXT_END = "\n\n"
"""Every context ends with this separator, so ``context + question`` reads naturally."""


class TaskError(KVSieveError, ValueError):
    """A task that cannot be generated as asked (length too short, bad depth, no collision-free draw)."""


@dataclass
class Question:
    """One more question about a sample's context (multi-question tasks), with its own answers."""

    question: str
    answers: list[str]
    answer_prefix: str
    max_new_tokens: int
    depth: float | None = None


@dataclass
class Sample:
    """One generated evaluation sample.

    The prompt is ``context + question`` (:attr:`prompt`); in query-agnostic mode the context is
    compressed before the question is seen. ``answer_prefix`` is meant to be appended after the chat
    template's assistant header (it may be ``""``); the model's continuation is what :meth:`Task.score`
    grades.
    """

    task: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str
    max_new_tokens: int
    length: int
    n_tokens: int
    depth: float | None
    seed: int
    index: int
    meta: dict[str, Any] = field(default_factory=dict)
    followups: list[Question] = field(default_factory=list)
    """Further questions about the same context (multi-question tasks); asked after ``question``, in order."""

    @property
    def prompt(self) -> str:
        """``context + question``: the text whose token count is :attr:`n_tokens`."""
        return self.context + self.question

    @property
    def n_questions(self) -> int:
        return 1 + len(self.followups)

    def for_question(self, i: int) -> Sample:
        """This sample as if question ``i`` were its only one (0: itself), so a task scores it as usual."""
        if i == 0:
            return self
        q = self.followups[i - 1]
        return dataclasses.replace(
            self,
            question=q.question,
            answers=list(q.answers),
            answer_prefix=q.answer_prefix,
            max_new_tokens=q.max_new_tokens,
            depth=q.depth,
            followups=[],
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy of every field."""
        return dataclasses.asdict(self)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` under ``tokenizer`` with ``add_special_tokens=False``."""
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def count_occurrences(text: str, needle: str) -> int:
    """Non-overlapping, case-insensitive occurrences of ``needle`` in ``text`` (what the scorer sees)."""
    return text.lower().count(needle.lower())


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` found (case-insensitive) in ``prediction``."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def fit_length(
    measure: Callable[[int], int], target: int, x0: int, slope: float = 1.0, lo: int = 0, max_iter: int = 16
) -> tuple[int, int]:
    """Find the knob ``x >= lo`` whose ``measure(x)`` (a token count, rising with ``x``) is nearest ``target``.

    Newton/secant steps from ``x0`` with ``slope`` tokens per unit of ``x`` as the first guess; every probe
    is one tokenization of the whole text, and a fit takes two to four. Returns ``(x, measure(x))``.
    """
    seen: dict[int, int] = {}
    x, prev = max(lo, x0), None
    while len(seen) < max_iter and x not in seen:
        n = seen[x] = measure(x)
        if n == target:
            break
        if prev is not None and prev[0] != x and (n - prev[1]) * (x - prev[0]) > 0:
            slope = min(max((n - prev[1]) / (x - prev[0]), slope / 4), slope * 4)
        prev = (x, n)
        step = round((target - n) / slope) or (1 if target > n else -1)
        x = max(lo, x + step)
        if x in seen:  # overshot back to a tried point: probe the neighbour in between, if any
            x = max(lo, prev[0] + (1 if target > n else -1))
    best = min(seen.items(), key=lambda kv: (abs(kv[1] - target), kv[0]))
    return best


def sample_rng(task: str, seed: int, index: int) -> random.Random:
    """The random generator of sample ``index``: independent of ``n`` and of the other samples."""
    return random.Random(f"kvsieve.tasks:{task}:{seed}:{index}")


def seeded_uuid(rng: random.Random) -> str:
    """A version-4 UUID string drawn from ``rng`` (reproducible, unlike :func:`uuid.uuid4`)."""
    import uuid

    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Task(ABC):
    """A generator of long-context samples plus their scorer.

    Subclasses set :attr:`name`, :attr:`description`, :attr:`metric`, :attr:`max_new_tokens` and implement
    :meth:`_generate_one`. The default scorer is RULER's ``string_match_all``.
    """

    name: str = ""
    description: str = ""
    metric: str = "string_match_all"
    max_new_tokens: int = 128
    default_haystack: ClassVar[str | None] = "pydoc"
    """The haystack used for ``haystack="<default>"``; ``None`` for tasks that build their own filler."""
    uses_depth: ClassVar[bool] = True
    """Whether ``depth`` means anything (needle tasks); others ignore it and report ``depth=None``."""
    questions_per_sample: ClassVar[int] = 1
    """Questions asked about one context; above 1 the bench compresses once and asks each (``Sample.followups``)."""

    def generate(
        self,
        tokenizer: Any,
        length: int,
        n: int,
        seed: int,
        depth: float | None = None,
        haystack: str = DEFAULT_HAYSTACK,
    ) -> list[Sample]:
        """Generate ``n`` samples of about ``length`` tokens (``context + question``, within 1%).

        Args:
            tokenizer: the model's tokenizer; lengths are counted with ``add_special_tokens=False``.
            length: target token count of ``context + question`` (the chat template comes on top).
            n: number of samples; sample ``i`` depends only on ``(task, seed, i)`` and its depth.
            seed: the seed; same seed gives identical samples.
            depth: needle depth in percent of the haystack (0 = start, 100 = end) for every sample; ``None``
                spreads the samples evenly, sample ``i`` at ``100 * i / (n - 1)`` (50 when ``n == 1``).
                Ignored, and reported as ``None``, by tasks without a needle.
            haystack: ``"pydoc"``, ``"licenses"``, ``"noise"``, or ``"<default>"`` for the task's own. Tasks
                that build their own filler (``common_words``, ``frequent_words``) check the name, then ignore it.
        """
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise TaskError(f"length must be a positive number of tokens, got {length!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TaskError(f"n must be a non-negative integer, got {n!r}")
        if depth is not None and not 0 <= depth <= 100:
            raise TaskError(f"depth is a percentage in [0, 100], got {depth!r}")
        hay = None if haystack in (DEFAULT_HAYSTACK, None) else canonical_haystack(haystack)  # typos fail early
        if self.default_haystack is None:
            hay = None
        elif hay is None:
            hay = self.default_haystack
        samples = []
        for i in range(n):
            d: float | None = None
            if self.uses_depth:
                d = float(depth) if depth is not None else (50.0 if n == 1 else 100.0 * i / (n - 1))
            samples.append(self._generate_one(tokenizer, length, seed, i, d, hay))
        return samples

    @abstractmethod
    def _generate_one(
        self, tokenizer: Any, length: int, seed: int, index: int, depth: float | None, haystack: str | None
    ) -> Sample:
        """Sample ``index`` of the given seed."""

    def score(self, sample: Sample, prediction: str) -> float:
        """Fraction of ``sample.answers`` contained (case-insensitive) in ``prediction``, in [0, 1]."""
        return string_match_all(prediction, sample.answers)

    def settled(self, sample: Sample, prediction: str) -> bool:
        """True when generating more text cannot change the score, so decoding may stop early.

        String match only grows as text is appended, so a prediction that already scores 1 keeps scoring 1. A task
        whose metric could fall with more text must return False here.
        """
        return self.score(sample, prediction) >= 1.0

    def tokens_to_generate(self, tokenizer: Any, answers: list[str]) -> int:
        """The generation allowance of a sample with these answers (default: the task's :attr:`max_new_tokens`)."""
        return self.max_new_tokens

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def _sample(
        self,
        *,
        context: str,
        question: str,
        answers: list[str],
        answer_prefix: str,
        length: int,
        n_tokens: int,
        depth: float | None,
        seed: int,
        index: int,
        meta: dict[str, Any],
        max_new_tokens: int | None = None,
        followups: list[Question] | None = None,
    ) -> Sample:
        if abs(n_tokens - length) > max(1, LENGTH_TOLERANCE * length):
            raise TaskError(
                f"{self.name}: could only reach {n_tokens} tokens for a target of {length} "
                f"(too short for the task's fixed text?)"
            )
        return Sample(
            task=self.name,
            context=context,
            question=question,
            answers=answers,
            answer_prefix=answer_prefix,
            max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens,
            length=length,
            n_tokens=n_tokens,
            depth=depth,
            seed=seed,
            index=index,
            meta=meta,
            followups=list(followups or []),
        )


@dataclass
class Needles:
    """What a needle task drew for one sample, before the haystack is cut to length."""

    prefix: str
    """Instruction text before the haystack (part of the context)."""
    needles: list[tuple[str, float]]
    """``(sentence, depth percent)`` pairs to hide in the haystack."""
    question: str
    answers: list[str]
    answer_prefix: str
    expected: dict[str, int]
    """Every string whose count in the context is fixed (answers first), with that count."""
    meta: dict[str, Any] = field(default_factory=dict)
    followups: list[Question] = field(default_factory=list)
    """Further questions (multi-question tasks); their answers must be in ``expected`` too."""


def place_needles(body: str, needles: Sequence[tuple[str, float]]) -> tuple[str, list[int]]:
    """Insert each needle sentence at the sentence boundary nearest its depth (percent of ``body``'s chars).

    A needle at a paragraph start becomes a paragraph of its own; needles sharing a boundary keep their
    depth order. Returns the text and the char offset of every needle (in the order given).
    """
    points = insertion_points(body)
    placed = []
    for order, (sentence, depth) in enumerate(needles):
        goal = depth / 100.0 * len(body)
        i = bisect.bisect_left(points, goal)
        pos = min(points[max(0, i - 1) : i + 1], key=lambda p: (abs(p - goal), p))
        placed.append((pos, depth, order, sentence))
    placed.sort()
    text, last = "", 0
    offsets = [0] * len(needles)
    for pos, _, order, sentence in placed:
        text += body[last:pos]
        last = pos
        if text and not text[-1].isspace():
            text += " "
        offsets[order] = len(text)
        text += sentence
        if pos < len(body):
            gap = body[:pos][len(body[:pos].rstrip()) :]
            text += gap if "\n" in gap else " "
    return text + body[last:], offsets


class HaystackTask(Task):
    """A task that hides needle sentences in a haystack slice whose token length is fitted to the target."""

    max_attempts: ClassVar[int] = 64

    @abstractmethod
    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        """Draw the needles, question and answers; avoid strings that ``index.contains``."""

    def _generate_one(
        self, tokenizer: Any, length: int, seed: int, index: int, depth: float | None, haystack: str | None
    ) -> Sample:
        if haystack is None:
            raise TaskError(f"{self.name}: a needle task needs a haystack")
        rng = sample_rng(self.name, seed, index)
        hay = haystack_index(tokenizer, haystack)
        start = hay.start_offset(rng)
        for _ in range(self.max_attempts):
            spec = self.draw(rng, depth, hay)

            def build(h: int, spec: Needles = spec) -> tuple[str, list[int]]:
                body, offsets = place_needles(hay.slice(start, h), spec.needles)
                return spec.prefix + body + CONTEXT_END, [o + len(spec.prefix) for o in offsets]

            def measure(h: int, spec: Needles = spec) -> int:
                return count_tokens(tokenizer, build(h)[0] + spec.question)

            base = measure(0)
            h, n_tokens = fit_length(measure, length, x0=length - base, slope=1.0)
            context, offsets = build(h)
            if _verify(context, spec):
                break
        else:
            raise TaskError(f"{self.name}: no collision-free draw in {self.max_attempts} attempts")
        meta = {
            "expected_occurrences": {a: spec.expected[a] for a in spec.answers},
            "checked_occurrences": dict(spec.expected),
            "haystack": haystack,
            "haystack_start": start,
            "haystack_tokens": h,
            "needle_depths": [d for _, d in spec.needles],
            "needle_offsets": offsets,
            **spec.meta,
        }
        return self._sample(
            context=context,
            question=spec.question,
            answers=spec.answers,
            answer_prefix=spec.answer_prefix,
            length=length,
            n_tokens=n_tokens,
            depth=depth,
            seed=seed,
            index=index,
            meta=meta,
            max_new_tokens=self.tokens_to_generate(tokenizer, spec.answers),
            followups=spec.followups,
        )


def _verify(context: str, spec: Needles) -> bool:
    """Counts as intended, and no answer given away by a question or an answer prefix."""
    if any(count_occurrences(context, s) != c for s, c in spec.expected.items()):
        return False
    asked = [(spec.question, spec.answer_prefix, spec.answers)]
    asked += [(q.question, q.answer_prefix, q.answers) for q in spec.followups]
    for question, prefix, answers in asked:
        given = (question + " " + prefix).lower()
        if any(a.lower() in given for a in answers):
            return False
    return True


def draw_fresh(
    rng: random.Random,
    make: Callable[[random.Random], str],
    index: HaystackIndex | None,
    taken: set[str],
    avoid: str = "",
    tries: int = 1000,
) -> str:
    """Draw ``make(rng)`` until the value is new, absent from the haystack and from ``avoid`` text."""
    avoid = avoid.lower()
    for _ in range(tries):
        value = make(rng)
        low = value.lower()
        if low in taken or (index is not None and index.contains(value)) or (avoid and low in avoid):
            continue
        if any(low in t or t in low for t in taken):
            continue
        taken.add(low)
        return value
    raise TaskError(f"could not draw a value absent from the haystack in {tries} tries")
