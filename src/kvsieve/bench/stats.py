"""The statistics behind the benchmark's score cells: 95% intervals and paired tests between methods.

Scores are per-sample numbers in [0, 1]. Two kinds are told apart by their values:

* **0/1 scores** (accuracy: every score is 0 or 1). Interval: Wilson's score interval
  (:func:`wilson_interval`), which stays inside [0, 1] and behaves at 0/n and n/n, unlike the normal
  approximation. Paired test: McNemar's exact test (:func:`mcnemar_exact`), the two-sided binomial test on the
  discordant pairs (one method right where the other is wrong).
* **Graded scores** (e.g. ``string_match_all`` giving 1/2 when one of two answers is found). Interval: the
  percentile bootstrap of the mean (:func:`bootstrap_interval`; 2000 resamples from a fixed seed, so the same scores
  always give the same interval). Paired test: the exact sign-flip (randomisation) test on the per-sample
  differences (:func:`sign_flip_test`), chosen over a paired-bootstrap p-value because it stays valid at the
  benchmark's small n: with two samples that both differ by +0.5 a bootstrap p-value is 0, the sign-flip test
  gives 0.5. On 0/1 scores it equals McNemar's exact test (the tests check this).

Comparisons made together (every method against ``full`` in one table; the best method against the runner-up at
every budget) are corrected for multiple comparisons with Holm's step-down method (:func:`holm`), which controls the
family-wise error rate like Bonferroni and rejects at least as often.

Only the standard library and numpy are used: ``scipy.stats.binomtest`` would replace the five lines of
:func:`mcnemar_exact` and nothing else, which does not pay for a 40 MB dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000
SIGN_FLIP_EXACT_MAX = 16  # up to 2**16 sign patterns are enumerated; above, 20000 random ones from a fixed seed
SIGN_FLIP_RESAMPLES = 20000
SEED = 0


def is_binary(scores: Sequence[float]) -> bool:
    """Whether every score is exactly 0 or 1 (an accuracy)."""
    return all(s in (0.0, 1.0) for s in scores)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``successes / n``.

    ``n == 0`` gives ``(0.0, 1.0)``: with no sample, nothing is known. At 0/n the lower bound is exactly 0 and at
    n/n the upper bound exactly 1.
    """
    if n <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at 0/n and n/n (else off by rounding)
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(
    scores: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (deterministic: fixed seed).

    One score, or scores that are all equal, give a zero-width interval (the bootstrap cannot see variation that
    the sample does not show); no score gives ``(nan, nan)``.
    """
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1) for n in _chunks(resamples, x.size)]
    )
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _chunks(total: int, width: int, cells: int = 2_000_000) -> list[int]:
    """Split ``total`` resamples into chunks of at most ``cells`` drawn indices (bounded memory for large n)."""
    per = max(1, cells // max(width, 1))
    return [min(per, total - i) for i in range(0, total, per)]


def mean_interval(scores: Sequence[float]) -> tuple[float, float, str]:
    """``(lo, hi, method)``: Wilson for 0/1 scores, else the bootstrap; ``method`` names which."""
    if is_binary(scores):
        lo, hi = wilson_interval(sum(scores), len(scores))
        return lo, hi, "Wilson"
    lo, hi = bootstrap_interval(scores)
    return lo, hi, "bootstrap"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (A right, B wrong) and ``c`` (the reverse).

    Under the null hypothesis each discordant pair goes either way with probability 1/2, so ``min(b, c)`` follows
    Binomial(b + c, 1/2); the p-value is twice its lower tail, at most 1. No discordant pair gives 1.
    """
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def sign_flip_test(differences: Sequence[float], seed: int = SEED) -> float:
    """Two-sided paired randomisation test of "mean difference = 0".

    Under the null hypothesis each per-sample difference is as likely to have either sign; the p-value is the share
    of sign assignments whose ``|sum|`` is at least the observed one. Exact (every assignment) for up to
    :data:`SIGN_FLIP_EXACT_MAX` non-zero differences, else estimated from :data:`SIGN_FLIP_RESAMPLES` random ones
    (fixed seed) as ``(1 + hits) / (1 + resamples)``.
    """
    d = np.asarray([x for x in differences if x != 0], dtype=float)
    if d.size == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-9 * np.abs(d).sum()  # tolerance: equal sums must count despite float rounding
    if d.size <= SIGN_FLIP_EXACT_MAX:
        patterns = np.arange(2**d.size)[:, None] >> np.arange(d.size) & 1
        sums = np.abs(((2 * patterns - 1) * d).sum(axis=1))
        return float(np.mean(sums >= observed))
    signs = np.random.default_rng(seed).integers(0, 2, size=(SIGN_FLIP_RESAMPLES, d.size)) * 2 - 1
    hits = int(np.sum(np.abs((signs * d).sum(axis=1)) >= observed))
    return (1 + hits) / (1 + SIGN_FLIP_RESAMPLES)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of method A with method B on the samples both have.

    ``delta`` is mean(A) - mean(B) over those ``n`` pairs; ``p`` the test's two-sided p-value; ``p_holm`` the
    Holm-adjusted one within its family (``None`` until :func:`adjust` sets it).
    """

    n: int
    delta: float
    p: float
    test: str
    p_holm: float | None = None

    @property
    def significant(self) -> bool:
        """Whether the difference is significant at 5% after Holm's correction (before it, if not adjusted)."""
        return (self.p if self.p_holm is None else self.p_holm) < ALPHA


def paired_test(a: Sequence[float], b: Sequence[float]) -> Comparison:
    """Compare paired scores ``a[i]`` vs ``b[i]``: McNemar's exact test when all are 0/1, else the sign-flip test."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    n = len(a)
    delta = (math.fsum(a) - math.fsum(b)) / n if n else 0.0
    if is_binary(a) and is_binary(b):
        wins = sum(1 for x, y in zip(a, b, strict=True) if x > y)
        losses = sum(1 for x, y in zip(a, b, strict=True) if x < y)
        return Comparison(n, delta, mcnemar_exact(wins, losses), "McNemar exact")
    return Comparison(n, delta, sign_flip_test([x - y for x, y in zip(a, b, strict=True)]), "sign-flip")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the k-th smallest is multiplied by ``m - k + 1``,
    made non-decreasing, and capped at 1."""
    m = len(pvalues)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def adjust(comparisons: dict) -> dict:
    """The same mapping with each :class:`Comparison` given its Holm-adjusted p-value within the mapping."""
    keys = list(comparisons)
    adjusted = holm([comparisons[k].p for k in keys])
    return {
        k: Comparison(c.n, c.delta, c.p, c.test, p)
        for k, c, p in zip(keys, comparisons.values(), adjusted, strict=True)
    }
