"""RULER's aggregation tasks: common words (cwe) and frequent coded words (fwe).

Neither uses a haystack: the list of words is the filler, and its length is fitted to the target.
"""

from __future__ import annotations

import math
import random
from functools import cache
from typing import Any

from kvsieve.tasks.base import (
    CONTEXT_END,
    Sample,
    Task,
    TaskError,
    count_occurrences,
    count_tokens,
    fit_length,
    sample_rng,
)
from kvsieve.tasks.words import cwe_vocabulary

__all__ = ["CommonWordsTask", "FrequentWordsTask"]


class CommonWordsTask(Task):
    """A numbered list of words in which ``num_cw`` words appear far more often than the rest; name them.

    RULER's cwe: the common words appear ``freq_cw`` times (up to 30, scaled down so that they make about
    30% of a short list), every other word at most ``freq_ucw`` (3) times; ``freq_ucw`` is raised (with
    ``freq_cw`` kept at three times it or more) when the target length needs more entries than the
    embedded vocabulary has words (beyond about 15k tokens); short lists (under about 1k tokens) use 1 for
    the others and 3 or 4 for the common words. The list length is fitted to the target; ``depth`` and
    ``haystack`` do not apply.
    """

    name = "common_words"
    description = "Common words extraction (RULER cwe): name the 10 most frequent words of a long list."
    max_new_tokens = 120
    default_haystack = None
    uses_depth = False
    prefix = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n\n"
    )

    def __init__(self, num_cw: int = 10, freq_cw: int = 30, freq_ucw: int = 3) -> None:
        if num_cw < 1 or freq_ucw < 1 or freq_cw <= freq_ucw:
            raise ValueError("need num_cw >= 1, freq_ucw >= 1 and freq_cw > freq_ucw")
        self.num_cw = num_cw
        self.freq_cw = freq_cw
        self.freq_ucw = freq_ucw
        self.question = f"Question: What are the {num_cw} most common words in the above list?"
        self.answer_prefix = f"Answer: The top {num_cw} words that appear most often in the list are:"

    def _generate_one(
        self, tokenizer: Any, length: int, seed: int, index: int, depth: float | None, haystack: str | None
    ) -> Sample:
        rng = sample_rng(self.name, seed, index)
        templates = (self.prefix + self.question + self.answer_prefix).lower()
        vocab = [w for w in cwe_vocabulary() if w not in templates]
        rng.shuffle(vocab)
        common, pool = vocab[: self.num_cw], vocab[self.num_cw :]
        shuffle_seed = rng.getrandbits(64)

        def entries(counts: list[tuple[str, int]], u: int) -> list[str]:
            words = [w for w, c in counts for _ in range(c)]
            random.Random(f"{shuffle_seed}:{u}").shuffle(words)
            return words

        def render(words: list[str]) -> str:
            return self.prefix + "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1)) + CONTEXT_END

        # Size the list: tokens per entry from a probe of 100 entries.
        base = count_tokens(tokenizer, render([]) + self.question)
        per_entry = max(
            1.0,
            (count_tokens(tokenizer, render(pool[:100])) - count_tokens(tokenizer, render([]))) / min(100, len(pool)),
        )
        n_entries = max(1.0, (length - base) / per_entry)
        freq_ucw = max(self.freq_ucw, math.ceil(0.7 * n_entries / len(pool)))
        freq_cw = min(max(self.freq_cw, 3 * freq_ucw), round(0.3 * n_entries / self.num_cw))
        if freq_cw < freq_ucw + 2:  # a short list: common words three times, the others once
            freq_ucw, freq_cw = 1, max(3, freq_cw)
        counts_cw = [(w, freq_cw) for w in common]

        def counts(u: int, v: int = 0) -> list[tuple[str, int]]:
            words = pool[v:] + pool[:v]  # variant v: other uncommon words, other token counts
            full, rest = divmod(u, freq_ucw)
            tail = [(words[full], rest)] if rest else []
            return counts_cw + [(w, freq_ucw) for w in words[:full]] + tail

        def measure(u: int, v: int = 0) -> int:
            return count_tokens(tokenizer, render(entries(counts(u, v), u)) + self.question)

        u_max = len(pool) * freq_ucw - 1
        u0 = min(u_max, round(n_entries) - freq_cw * self.num_cw)
        u, n_tokens = fit_length(lambda x: measure(min(x, u_max)), length, x0=max(0, u0), slope=per_entry)
        u, v = min(u, u_max), 0
        # One entry is several tokens: swap in other uncommon words to land closer.
        for variant in range(1, 9):
            if n_tokens == length:
                break
            for x in (u - 1, u, u + 1) if 0 < u < u_max else (u,):
                got = measure(x, variant)
                if abs(got - length) < abs(n_tokens - length):
                    u, v, n_tokens = x, variant, got
        context = render(entries(counts(u, v), u))
        expected = {w: freq_cw for w in common}
        if any(count_occurrences(context, w) != c for w, c in expected.items()):
            raise TaskError(f"{self.name}: a common word occurs an unexpected number of times")
        meta = {
            "expected_occurrences": expected,
            "freq_cw": freq_cw,
            "freq_ucw": freq_ucw,
            "num_entries": freq_cw * self.num_cw + u,
            "num_uncommon_words": math.ceil(u / freq_ucw),
        }
        return self._sample(
            context=context,
            question=self.question,
            answers=list(common),
            answer_prefix=self.answer_prefix,
            length=length,
            n_tokens=n_tokens,
            depth=None,
            seed=seed,
            index=index,
            meta=meta,
        )


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@cache
def _zipf_weights(alpha: float, size: int = 10_000) -> tuple[float, ...]:
    raw = [r**-alpha for r in range(1, size + 1)]
    total = sum(raw)
    return tuple(w / total for w in raw)


def zipf_counts(n_words: int, alpha: float) -> list[int]:
    """Counts by rank summing to ``n_words``: ``floor(n * p_r)`` with Zipf ``p_r``, the rest as singletons."""
    counts = [c for c in (math.floor(n_words * p) for p in _zipf_weights(alpha)) if c > 0]
    return counts + [1] * (n_words - sum(counts))


class FrequentWordsTask(Task):
    """Coded (made-up) words with Zipf frequencies; name the three most frequent (RULER fwe).

    The words are pronounceable five-letter strings (consonant-vowel-consonant-vowel-consonant) drawn from
    the seed, so they are whole words in the space-separated text and never hide inside each other. The
    rank-``r`` word appears ``floor(n * r**-alpha / zeta)`` times (``alpha`` = 2), the remainder as words
    seen once; the number of words ``n`` is fitted to the target. ``depth`` and ``haystack`` do not apply.
    """

    name = "frequent_words"
    description = "Frequent words extraction (RULER fwe): name the 3 most frequent coded words (Zipf)."
    max_new_tokens = 50
    default_haystack = None
    uses_depth = False
    prefix = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words.\n\n"
    )
    question = (
        "Question: Do not provide any explanation. "
        "What are the three most frequently appeared words in the above coded text?"
    )
    answer_prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"

    def __init__(self, alpha: float = 2.0, top: int = 3) -> None:
        self.alpha = alpha
        self.top = top

    def _generate_one(
        self, tokenizer: Any, length: int, seed: int, index: int, depth: float | None, haystack: str | None
    ) -> Sample:
        rng = sample_rng(self.name, seed, index)
        templates = (self.prefix + self.question + self.answer_prefix).lower()
        pool: list[str] = []
        seen: set[str] = set()
        while len(pool) < 2 * math.isqrt(length) + 50:
            word = "".join(rng.choice(_CONSONANTS if k % 2 == 0 else _VOWELS) for k in range(5))
            if word not in seen and word not in templates:
                seen.add(word)
                pool.append(word)
        shuffle_seed = rng.getrandbits(64)

        def words(n: int) -> list[str]:
            counts = zipf_counts(n, self.alpha)
            if len(counts) > len(pool):
                raise TaskError(f"{self.name}: target length {length} needs more coded words than drawn")
            out = [w for w, c in zip(pool, counts, strict=False) for _ in range(c)]
            random.Random(f"{shuffle_seed}:{n}").shuffle(out)
            return out

        def render(n: int) -> str:
            return self.prefix + " ".join(words(n)) + CONTEXT_END

        base = count_tokens(tokenizer, render(0) + self.question)
        per_word = max(1.0, (count_tokens(tokenizer, " ".join(pool[:50])) + 1) / 50)
        n, n_tokens = fit_length(
            lambda x: count_tokens(tokenizer, render(x) + self.question),
            length,
            x0=max(1, round((length - base) / per_word)),
            slope=per_word,
            lo=1,
        )
        counts = zipf_counts(n, self.alpha)
        if len(counts) <= self.top or counts[self.top - 1] <= counts[self.top]:
            raise TaskError(f"{self.name}: length {length} is too short for a clear top {self.top}")
        context = render(n)
        answers = pool[: self.top]
        expected = {w: c for w, c in zip(answers, counts, strict=False)}
        if any(count_occurrences(context, w) != c for w, c in expected.items()):
            raise TaskError(f"{self.name}: a coded word occurs an unexpected number of times")
        meta = {"expected_occurrences": expected, "num_words": n, "counts": counts[: self.top + 2], "alpha": self.alpha}
        return self._sample(
            context=context,
            question=self.question,
            answers=answers,
            answer_prefix=self.answer_prefix,
            length=length,
            n_tokens=n_tokens,
            depth=None,
            seed=seed,
            index=index,
            meta=meta,
        )
