"""Needle-in-a-haystack tasks: Landmark Attention's passkey and RULER's NIAH family."""

from __future__ import annotations

import random
from typing import Any, ClassVar, Literal

from kvsieve.tasks.base import HaystackTask, Needles, Question, count_tokens, draw_fresh, seeded_uuid
from kvsieve.tasks.haystack import HaystackIndex
from kvsieve.tasks.words import ADJECTIVES, NOUNS

__all__ = ["MultiNumberTask", "MultiPasskeyTask", "NIAHTask", "PasskeyTask"]

ValueType = Literal["number", "word", "uuid"]


class PasskeyTask(HaystackTask):
    """Landmark Attention's passkey retrieval: a 5-digit key stated twice in one sentence, in noise."""

    name = "passkey"
    description = "Passkey retrieval (Landmark Attention): find a 5-digit pass key hidden in repeated noise."
    max_new_tokens = 16
    default_haystack = "noise"
    prefix: ClassVar[str] = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there. "
    )
    # Landmark's question plus one instruction: instruct models (SmolLM2-135M) otherwise tend to describe what a
    # pass key is instead of quoting it (measured: 2/3 -> 3/3 at 1k tokens with full attention).
    question: ClassVar[str] = "What is the pass key? Answer with the number only."
    answer_prefix: ClassVar[str] = "The pass key is"

    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        depth = 50.0 if depth is None else depth
        key = draw_fresh(rng, lambda r: str(r.randint(10000, 99999)), index, set(), avoid=self.prefix)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        return Needles(
            prefix=self.prefix,
            needles=[(needle, depth)],
            question=self.question,
            answers=[key],
            answer_prefix=self.answer_prefix,
            expected={key: 2},
            meta={"needle": needle},
        )


_PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}


def _english_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class NIAHTask(HaystackTask):
    """RULER's needle in a haystack: ``"One of the special magic {numbers} for {key} is: {value}."``.

    ``num_keys`` needles with distinct ``adjective-noun`` keys, ``num_values`` values per key, and the first
    ``num_queries`` keys asked. The first needle of the first asked key sits at the sample's depth; the
    others at depths drawn from the seed. Every value and key is checked to be absent from the haystack.

    Generation allowance: each asked value's own tokens plus 16, at most 128 (RULER allots 128 to every NIAH sample).
    The answer prefix ends right where the values go, so the two differ only for a model that starts a value more
    than 16 tokens late; the saving is most of the decoding time of a wrong answer (1 value: about 23 tokens).
    """

    slack_per_answer: ClassVar[int] = 16

    def __init__(
        self,
        name: str,
        description: str,
        value_type: ValueType = "number",
        num_keys: int = 1,
        num_values: int = 1,
        num_queries: int = 1,
    ) -> None:
        if not 1 <= num_queries <= num_keys or num_values < 1:
            raise ValueError("need 1 <= num_queries <= num_keys and num_values >= 1")
        self.name = name
        self.description = description
        self.value_type = value_type
        self.num_keys = num_keys
        self.num_values = num_values
        self.num_queries = num_queries

    def tokens_to_generate(self, tokenizer: Any, answers: list[str]) -> int:
        need = sum(count_tokens(tokenizer, " " + a) + self.slack_per_answer for a in answers)
        return min(self.max_new_tokens, need)

    def _value(self, rng: random.Random) -> str:
        if self.value_type == "number":
            return str(rng.randint(1_000_000, 9_999_999))
        if self.value_type == "uuid":
            return seeded_uuid(rng)
        return rng.choice(NOUNS)

    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        depth = 50.0 if depth is None else depth
        kind = _PLURAL[self.value_type]
        prefix = (
            f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kind} afterwards.\n\n"
        )
        taken: set[str] = set()
        keys = [
            draw_fresh(rng, lambda r: f"{r.choice(ADJECTIVES)}-{r.choice(NOUNS)}", index, taken, avoid=prefix)
            for _ in range(self.num_keys)
        ]
        if self.value_type == "word":  # a value word must not hide inside a key
            taken |= {part for k in keys for part in k.split("-")}
        values = [
            [draw_fresh(rng, self._value, index, taken, avoid=prefix) for _ in range(self.num_values)] for _ in keys
        ]
        needles = []
        for k, (key, vals) in enumerate(zip(keys, values, strict=True)):
            for j, value in enumerate(vals):
                d = depth if k == 0 and j == 0 else rng.uniform(0.0, 100.0)
                needles.append((f"One of the special magic {kind} for {key} is: {value}.", d))
        asked = keys[: self.num_queries]
        answers = [v for vals in values[: self.num_queries] for v in vals]
        query = _english_list(asked)
        if len(answers) == 1:
            question = f"What is the special magic {self.value_type} for {query} mentioned in the provided text?"
            answer_prefix = f"The special magic {self.value_type} for {query} mentioned in the provided text is"
        else:
            question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
            answer_prefix = f"The special magic {kind} for {query} mentioned in the provided text are"
        expected = {v: 1 for v in answers}
        expected |= {v: 1 for vals in values for v in vals}
        expected |= {key: self.num_values for key in keys}
        return Needles(
            prefix=prefix,
            needles=needles,
            question=question,
            answers=answers,
            answer_prefix=answer_prefix,
            expected=expected,
            meta={"keys": keys, "values": values, "queried_keys": asked},
        )


class MultiPasskeyTask(HaystackTask):
    """Several pass keys, one per labelled door, in the passkey noise; each asked in its own question.

    The needles sit at evenly spread depths (``100 * (k + 0.5) / num_keys``: 12.5, 37.5, 62.5, 87.5 for four) and are
    asked in reading order, one question per key (``Sample.followups``), so the bench compresses the context once and
    answers every question from that one cache (independently, or as turns of one conversation).
    """

    name = "multi_passkey"
    description = "Multi-question pass keys: four doors' 5-digit keys hidden in noise, each asked in turn."
    max_new_tokens = 16
    default_haystack = "noise"
    uses_depth = False
    questions_per_sample = 4
    labels: ClassVar[tuple[str, ...]] = ("red", "black", "white", "orange", "purple", "silver", "golden", "brown")
    prefix: ClassVar[str] = (
        "There are several important pass keys hidden inside a lot of irrelevant text, one for each door. "
        "Find them and memorize them. I will quiz you about them. "
    )

    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        n = self.questions_per_sample
        labels = rng.sample(self.labels, n)
        taken: set[str] = set()
        keys = [
            draw_fresh(rng, lambda r: str(r.randint(10000, 99999)), index, taken, avoid=self.prefix) for _ in labels
        ]
        return self.assemble(
            labels,
            keys,
            needle="The pass key of the {label} door is {value}. Remember it. "
            "{value} is the pass key of the {label} door.",
            question="What is the pass key of the {label} door? Answer with the number only.",
            answer_prefix="The pass key of the {label} door is",
        )

    def assemble(self, labels: list[str], values: list[str], needle: str, question: str, answer_prefix: str) -> Needles:
        """One needle per (label, value) at evenly spread depths, asked in reading order, one question each."""
        n = len(labels)
        depths = [100.0 * (k + 0.5) / n for k in range(n)]
        fill = [dict(label=label, value=value) for label, value in zip(labels, values, strict=True)]
        questions = [
            Question(
                question=question.format(**f),
                answers=[f["value"]],
                answer_prefix=answer_prefix.format(**f),
                max_new_tokens=self.max_new_tokens,
                depth=d,
            )
            for f, d in zip(fill, depths, strict=True)
        ]
        first = questions[0]
        return Needles(
            prefix=self.prefix,
            needles=[(needle.format(**f), d) for f, d in zip(fill, depths, strict=True)],
            question=first.question,
            answers=first.answers,
            answer_prefix=first.answer_prefix,
            expected={value: 2 for value in values},
            meta={"labels": labels, "keys": values, "question_depths": depths},
            followups=questions[1:],
        )


class MultiNumberTask(MultiPasskeyTask):
    """Four differently named numbers in the passkey noise, each asked in its own question, in reading order.

    ``multi_passkey``'s four doors share one label pattern and one key length, and SmolLM2-135M often answers a
    door's question with the most recent door's key (full attention: 50-62% at 2k tokens). Here each fact has its own
    name and its own number of digits (pass key 5, door code 4, room number 3, ticket number 6), in passkey's
    sentence ("The door code is 4817. Remember it. 4817 is the door code."), so a full cache answers nearly every
    question (measured: 23 of 24 at 1,024 tokens) and what a compressed cache loses shows per question.
    """

    name = "multi_number"
    description = "Multi-question numbers: a pass key, door code, room number and ticket number in noise, each asked."
    facts: ClassVar[tuple[tuple[str, int], ...]] = (
        ("pass key", 5),
        ("door code", 4),
        ("room number", 3),
        ("ticket number", 6),
    )
    prefix: ClassVar[str] = (
        "There are several important numbers hidden inside a lot of irrelevant text. "
        "Find them and memorize them. I will quiz you about them. "
    )

    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        n = self.questions_per_sample
        taken: set[str] = set()
        values = [
            draw_fresh(rng, lambda r, d=digits: str(r.randint(10 ** (d - 1), 10**d - 1)), index, taken, self.prefix)
            for _, digits in self.facts
        ]
        order = rng.sample(range(n), n)
        labels = [self.facts[i][0] for i in order]
        return self.assemble(
            labels,
            [values[i] for i in order],
            needle="The {label} is {value}. Remember it. {value} is the {label}.",
            question="What is the {label}? Answer with the number only.",
            answer_prefix="The {label} is",
        )
