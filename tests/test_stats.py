"""The statistics of the score cells against published values and values computed by hand from the binomial."""

from __future__ import annotations

import math
import random

import pytest

from kvsieve.bench.stats import (
    Comparison,
    adjust,
    bootstrap_interval,
    holm,
    mcnemar_exact,
    mean_interval,
    paired_test,
    sign_flip_test,
    wilson_interval,
)


# ------------------------------------------------------------------------------------------- Wilson
@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (8, 10, 0.490, 0.943),  # Newcombe (1998), Stat. Med. 17:857, and every textbook since
        (0, 10, 0.0, 0.278),  # upper bound z^2 / (n + z^2)
        (10, 10, 0.722, 1.0),
        (1, 2, 0.095, 0.905),
        (81, 263, 0.255, 0.366),  # Wikipedia "Binomial proportion confidence interval", Wilson example
    ],
)
def test_wilson_interval_matches_published_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no sample: nothing known
    lo, hi = wilson_interval(5, 5)
    assert hi == 1.0 and 0 < lo < 1  # all correct: clipped at 1, never above
    lo, hi = wilson_interval(0, 5)
    assert lo == 0.0 and 0 < hi < 1  # all wrong
    # a 90% interval is narrower than a 95% one
    assert wilson_interval(8, 10, 0.90)[0] > wilson_interval(8, 10)[0]


# ------------------------------------------------------------------------------------------- McNemar
def binomial_two_sided(b: int, c: int) -> float:
    """By hand: P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), doubled, at most 1."""
    n = b + c
    tail = sum(math.factorial(n) / (math.factorial(i) * math.factorial(n - i)) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail * 0.5**n)


@pytest.mark.parametrize(("b", "c"), [(0, 6), (1, 9), (9, 1), (3, 3), (2, 12), (10, 21), (0, 1), (40, 60)])
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(b: int, c: int) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c), rel=1e-12)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(0, 6) == 2 / 64  # 0.03125: six wins out of six, the smallest n significant at 5%
    assert mcnemar_exact(0, 5) == 2 / 32  # 0.0625: five out of five is not
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence
    assert mcnemar_exact(7, 7) == 1.0


# ------------------------------------------------------------------------------------------- sign flip
@pytest.mark.parametrize(("wins", "losses", "ties"), [(0, 6, 3), (1, 9, 0), (4, 4, 2), (2, 12, 5), (0, 0, 4)])
def test_sign_flip_on_0_1_scores_equals_mcnemar(wins: int, losses: int, ties: int) -> None:
    diffs = [1.0] * wins + [-1.0] * losses + [0.0] * ties
    assert sign_flip_test(diffs) == pytest.approx(mcnemar_exact(wins, losses), rel=1e-12)


def test_sign_flip_small_samples_are_not_overconfident() -> None:
    # Two samples both +0.5: a paired bootstrap would give p = 0; of the 4 sign patterns 2 are as extreme.
    assert sign_flip_test([0.5, 0.5]) == 0.5
    assert sign_flip_test([0.5, -0.5]) == 1.0
    assert sign_flip_test([]) == 1.0


def test_sign_flip_monte_carlo_above_the_exact_limit_is_deterministic_and_close() -> None:
    rng = random.Random(1)
    diffs = [rng.choice([0.5, 1.0, -0.5]) for _ in range(40)]
    p = sign_flip_test(diffs)
    assert p == sign_flip_test(diffs)  # fixed seed
    # normal approximation of the randomisation distribution: sum ~ N(0, sum d^2)
    z = abs(sum(diffs)) / math.sqrt(sum(d * d for d in diffs))
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.02)


# ------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_interval() -> None:
    scores = [0.5, 1.0, 0.0, 0.5, 1.0, 0.5, 0.0, 1.0]
    lo, hi = bootstrap_interval(scores)
    assert (lo, hi) == bootstrap_interval(scores)  # deterministic
    assert 0.0 <= lo < sum(scores) / len(scores) < hi <= 1.0
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)  # no variation seen
    assert bootstrap_interval([0.25]) == (0.25, 0.25)
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def test_mean_interval_picks_the_method() -> None:
    assert mean_interval([1.0, 0.0, 1.0, 1.0])[2] == "Wilson"
    assert mean_interval([1.0, 0.0, 1.0, 1.0])[:2] == wilson_interval(3, 4)
    assert mean_interval([1.0, 0.5, 1.0])[2] == "bootstrap"
    assert mean_interval([1.0] * 7) == (*wilson_interval(7, 7), "Wilson")  # all correct
    assert mean_interval([0.0] * 7) == (*wilson_interval(0, 7), "Wilson")  # all wrong


# ------------------------------------------------------------------------------------------- paired tests
def test_paired_test_dispatches_on_the_kind_of_scores() -> None:
    a = [1.0] * 10
    b = [0.0] * 8 + [1.0] * 2
    c = paired_test(a, b)
    assert (c.n, c.test, c.delta) == (10, "McNemar exact", 0.8)
    assert c.p == mcnemar_exact(8, 0)
    g = paired_test([1.0, 0.5, 1.0], [0.5, 0.5, 0.0])
    assert g.test == "sign-flip"
    assert g.p == sign_flip_test([0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="equal lengths"):
        paired_test([1.0], [])
    assert paired_test([], []).p == 1.0


def test_holm() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> made non-decreasing
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
    assert holm([0.01]) == [0.01]


def test_adjust_and_significance() -> None:
    tests = {"a": Comparison(10, -0.5, 0.02, "McNemar exact"), "b": Comparison(10, 0.1, 0.03, "McNemar exact")}
    adjusted = adjust(tests)
    assert adjusted["a"].p_holm == pytest.approx(0.04) and adjusted["a"].significant
    assert adjusted["b"].p_holm == pytest.approx(0.04) and adjusted["b"].significant
    three = adjust({**tests, "c": Comparison(10, 0.0, 0.9, "McNemar exact")})
    assert three["a"].p_holm == pytest.approx(0.06) and not three["a"].significant  # a larger family costs
    assert Comparison(5, 0.2, 0.04, "sign-flip").significant  # unadjusted: the raw p decides
