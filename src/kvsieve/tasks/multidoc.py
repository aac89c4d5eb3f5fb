"""Multi-document question answering with the answer document at a chosen position (position-bias studies, PINE).

Like Liu et al.'s "Lost in the Middle" setting, without a dataset: ``n_documents`` documents of haystack prose, each
holding one invented fact (:mod:`kvsieve.tasks.qa`'s relations); one holds the fact the question asks about, the
others facts about other invented entities (a third with the same relation). The sample's depth places the answer
document: depth 0 is the first document, 100 the last (``round(depth / 100 x (n - 1))``), so ``depth=None`` spreads
the samples over every position. ``meta["document_chars"]`` gives each document's contiguous character range in the
context (each with its trailing blank line) and :func:`document_token_spans` turns them into token ranges of a
prompt, which is what ``pine`` (``kvsieve.methods.pine.set_segments``) takes.
"""

from __future__ import annotations

from typing import Any

from kvsieve.tasks.base import (
    CONTEXT_END,
    HaystackTask,
    Needles,
    Sample,
    Task,
    TaskError,
    _verify,
    count_tokens,
    fit_length,
    sample_rng,
)
from kvsieve.tasks.haystack import haystack_index
from kvsieve.tasks.qa import QATask

__all__ = ["MultiDocQATask", "document_token_spans"]


class MultiDocQATask(Task):
    """Answer a question whose fact sits in one of ``n_documents`` documents, at the position the depth gives."""

    name = "multidoc_qa"
    description = "Multi-document QA: one of several documents holds the asked fact, at a chosen position."
    max_new_tokens = 32
    prefix = (
        "Answer the question based on the documents below. Only give the answer and do not output any other words.\n\n"
    )

    def __init__(self, n_documents: int = 5) -> None:
        if n_documents < 2:
            raise TaskError(f"multidoc_qa needs at least 2 documents, got {n_documents}")
        self.n_documents = n_documents
        self._facts = QATask(num_distractors=n_documents - 1)

    def gold_position(self, depth: float) -> int:
        return round(depth / 100.0 * (self.n_documents - 1))

    def _generate_one(
        self, tokenizer: Any, length: int, seed: int, index: int, depth: float | None, haystack: str | None
    ) -> Sample:
        if haystack is None:
            raise TaskError(f"{self.name}: needs a haystack")
        rng = sample_rng(self.name, seed, index)
        hay = haystack_index(tokenizer, haystack)
        depth = 50.0 if depth is None else depth
        gold_at = self.gold_position(depth)
        starts = [hay.start_offset(rng) for _ in range(self.n_documents)]
        for _ in range(HaystackTask.max_attempts):
            drawn = self._facts.draw(rng, 50.0, hay)
            facts = [s for s, _ in drawn.needles]
            order = [*facts[1 : gold_at + 1], facts[0], *facts[gold_at + 1 :]]
            spec = Needles(self.prefix, [], drawn.question, drawn.answers, drawn.answer_prefix, drawn.expected)

            def build(h: int, order: list[str] = order) -> tuple[str, list[tuple[int, int]], list[int]]:
                text, spans, fact_at = self.prefix, [], []
                for k, (fact, start) in enumerate(zip(order, starts, strict=True)):
                    body = hay.slice(start, h)
                    cut = body.rfind(". ", 0, len(body) // 2) + 1 or len(body) // 2  # a sentence end mid-way
                    head = f"Document [{k + 1}]: {body[:cut].strip()} "
                    doc = f"{head}{fact} {body[cut:].strip()}".rstrip()
                    fact_at.append(len(text) + len(head))
                    spans.append((len(text), len(text) + len(doc) + len(CONTEXT_END)))
                    text += doc + CONTEXT_END
                return text, spans, fact_at

            def measure(h: int, spec: Needles = spec) -> int:
                return count_tokens(tokenizer, build(h)[0] + spec.question)

            base = measure(0)
            n = self.n_documents
            h, n_tokens = fit_length(measure, length, x0=max(0, (length - base) // n), slope=float(n))
            context, spans, fact_at = build(h)
            if _verify(context, spec):
                break
        else:
            raise TaskError(f"{self.name}: no collision-free draw in {HaystackTask.max_attempts} attempts")
        meta = {
            "expected_occurrences": {a: spec.expected[a] for a in spec.answers},
            "checked_occurrences": dict(spec.expected),
            "haystack": haystack,
            "gold_document": gold_at,
            "n_documents": self.n_documents,
            "document_chars": spans,
            # where each fact starts, the asked one first (as the other tasks' needle_offsets)
            "needle_offsets": [fact_at[gold_at]] + [o for k, o in enumerate(fact_at) if k != gold_at],
            "fact": drawn.meta["fact"],
        }
        return self._sample(
            context=context, question=spec.question, answers=spec.answers, answer_prefix=spec.answer_prefix,
            length=length, n_tokens=n_tokens, depth=depth, seed=seed, index=index, meta=meta,
        )  # fmt: skip


def document_token_spans(tokenizer: Any, prompt: str, context_at: int, sample: Sample) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the sample's documents in ``prompt`` (the context starting at character
    ``context_at`` of it): contiguous, each from its first token to the next document's first token."""
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    starts = [a for a, _ in enc["offset_mapping"]]
    chars = sample.meta["document_chars"]

    def first_token(char: int) -> int:
        return next(i for i, s in enumerate(starts) if s >= char)

    firsts = [first_token(context_at + a) for a, _ in chars]
    end = first_token(context_at + chars[-1][1]) if context_at + chars[-1][1] < len(prompt) else len(starts)
    return [(a, b) for a, b in zip(firsts, [*firsts[1:], end], strict=True)]
