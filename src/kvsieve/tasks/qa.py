"""Question answering over invented facts hidden in prose (a RULER-style qa without a dataset)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvsieve.tasks.base import HaystackTask, Needles, draw_fresh
from kvsieve.tasks.haystack import HaystackIndex
from kvsieve.tasks.words import FIRST_NAMES, NAME_CODAS, NAME_ONSETS, NAME_VOWELS

__all__ = ["QATask"]


@dataclass(frozen=True)
class Relation:
    """A fact template: ``{e}`` is the entity, ``{a}`` the answer; ``entity``/``answer`` say how to draw them."""

    fact: str
    question: str
    answer_prefix: str
    entity: str  # "place" | "person"
    answer: str  # "place" | "person" | "year"


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "The capital of the Republic of {e} is {a}.",
        "What is the capital of the Republic of {e}?",
        "The capital of the Republic of {e} is",
        "place",
        "place",
    ),
    Relation(
        "The {e} River flows into Lake {a}.",
        "Into which lake does the {e} River flow?",
        "The {e} River flows into Lake",
        "place",
        "place",
    ),
    Relation(
        "The composer {e} was born in the town of {a}.",
        "In which town was the composer {e} born?",
        "The composer {e} was born in the town of",
        "person",
        "place",
    ),
    Relation(
        "The {e} Trading Company was founded by {a}.",
        "Who founded the {e} Trading Company?",
        "The {e} Trading Company was founded by",
        "place",
        "person",
    ),
    Relation(
        "The Treaty of {e} was signed in the year {a}.",
        "In which year was the Treaty of {e} signed?",
        "The Treaty of {e} was signed in the year",
        "place",
        "year",
    ),
    Relation(
        "The highest peak of the {e} Mountains is Mount {a}.",
        "What is the highest peak of the {e} Mountains?",
        "The highest peak of the {e} Mountains is Mount",
        "place",
        "place",
    ),
    Relation(
        "The astronomer {e} discovered the comet {a}.",
        "Which comet did the astronomer {e} discover?",
        "The astronomer {e} discovered the comet",
        "person",
        "place",
    ),
)


def invented_name(rng: random.Random) -> str:
    """A pronounceable made-up proper name, e.g. ``"Veltrian"``."""
    syllables = [rng.choice(NAME_ONSETS) + rng.choice(NAME_VOWELS) for _ in range(rng.randint(2, 3))]
    return ("".join(syllables) + rng.choice(NAME_CODAS)).capitalize()


class QATask(HaystackTask):
    """Answer one question about invented facts (capitals, rivers, founders, treaties ...) hidden in prose.

    The asked fact sits at the sample's depth; ``num_distractors`` facts about other invented entities
    (some with the same relation) sit at depths drawn from the seed. Every name is made up and checked to
    be absent from the haystack and to not hide inside another name, so the answer occurs exactly once.
    """

    name = "qa"
    description = "Question answering over invented facts hidden in Python documentation prose."
    max_new_tokens = 32
    prefix = (
        "Answer the question based on the facts stated in the text below. Only give the answer and do "
        "not output any other words.\n\n"
    )

    def __init__(self, num_distractors: int = 8) -> None:
        self.num_distractors = num_distractors

    def draw(self, rng: random.Random, depth: float | None, index: HaystackIndex) -> Needles:
        depth = 50.0 if depth is None else depth
        taken: set[str] = set()
        avoid = self.prefix + " ".join(r.fact + r.question for r in RELATIONS) + " Question Answer"

        def draw_slot(kind: str) -> str:
            if kind == "year":
                return draw_fresh(rng, lambda r: str(r.randint(1100, 1899)), index, taken, avoid=avoid)
            if kind == "person":
                return draw_fresh(
                    rng, lambda r: f"{r.choice(FIRST_NAMES)} {invented_name(r)}", index, taken, avoid=avoid
                )
            return draw_fresh(rng, invented_name, index, taken, avoid=avoid)

        gold = rng.choice(RELATIONS)
        facts = [(gold, draw_slot(gold.entity), draw_slot(gold.answer))]
        for k in range(self.num_distractors):
            rel = gold if k % 3 == 0 else rng.choice(RELATIONS)  # a third share the asked relation
            facts.append((rel, draw_slot(rel.entity), draw_slot(rel.answer)))
        needles = [
            (rel.fact.format(e=e, a=a), depth if k == 0 else rng.uniform(0.0, 100.0))
            for k, (rel, e, a) in enumerate(facts)
        ]
        _, entity, answer = facts[0]
        expected = {answer: 1} | {s: 1 for _, e, a in facts for s in (e, a)}
        return Needles(
            prefix=self.prefix,
            needles=needles,
            question=f"Question: {gold.question.format(e=entity)}",
            answers=[answer],
            answer_prefix=gold.answer_prefix.format(e=entity),
            expected=expected,
            meta={"fact": needles[0][0], "entity": entity, "distractors": [n for n, _ in needles[1:]]},
        )
