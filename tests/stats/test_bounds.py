"""Clopper-Pearson, pooling and Goodman bounds against exact tail sums and statsmodels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom, multinomial
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from pipeline.stats.bounds import (
    class_upper_family,
    clopper_pearson_lower,
    clopper_pearson_upper,
    goodman_upper,
    largest_other_upper,
    other_class_upper,
    pooled_groups,
)
from pipeline.errors import UserError


def reduce_counts_reference(counts: np.ndarray, c: int) -> list[int]:
    """Line-by-line transcription of the published ``_reduce_counts`` (Jeong & Shin), one image."""
    counts = counts.copy()
    nc = counts[c]
    counts[c] = 0
    r_counts = [nc]
    reg = 0
    for ci in np.argsort(counts)[::-1]:
        ni = counts[ci]
        if ni >= 5:
            r_counts.append(ni)
        else:
            reg += ni
            if reg >= 5:
                r_counts.append(reg)
                reg = 0
    if reg > 0:
        r_counts[-1] += reg
    return [int(v) for v in r_counts]


TRIALS = [1, 2, 7, 50, 100, 1000, 10000]
LEVELS = [0.4, 0.05, 0.001, 1e-6]


@pytest.mark.parametrize("n", TRIALS)
@pytest.mark.parametrize("level", LEVELS)
def test_clopper_pearson_solves_the_binomial_tail_equations(n: int, level: float) -> None:
    k = np.unique(np.linspace(0, n, 25).astype(int))
    lower = clopper_pearson_lower(k, n, level)
    upper = clopper_pearson_upper(k, n, level)
    inner = (k > 0) & (k < n)
    # p̲ is the p with P[Bin(n, p) >= k] = level, p̄ the p with P[Bin(n, p) <= k] = level.
    np.testing.assert_allclose(binom.sf(k[k > 0] - 1, n, lower[k > 0]), level, rtol=1e-6)
    np.testing.assert_allclose(binom.cdf(k[k < n], n, upper[k < n]), level, rtol=1e-6)
    assert np.all(lower[inner] < k[inner] / n) and np.all(upper[inner] > k[inner] / n)


@pytest.mark.parametrize("n", TRIALS)
def test_clopper_pearson_edges_match_closed_forms(n: int) -> None:
    level = 0.01
    assert clopper_pearson_lower(0, n, level) == 0.0
    assert clopper_pearson_upper(n, n, level) == 1.0
    # Bin(n, p) = n has probability p^n, Bin(n, p) = 0 has probability (1-p)^n.
    np.testing.assert_allclose(clopper_pearson_lower(n, n, level), level ** (1 / n), rtol=1e-12)
    np.testing.assert_allclose(clopper_pearson_upper(0, n, level), 1 - level ** (1 / n), rtol=1e-10)


def test_clopper_pearson_matches_statsmodels_and_broadcasts() -> None:
    rng = np.random.default_rng(1)
    n = rng.integers(1, 5000, size=(40, 1))
    k = (rng.random((40, 3)) * (n + 1)).astype(int)
    level = np.array([0.1, 0.001, 1e-5])
    lower = clopper_pearson_lower(k, n, level)
    upper = clopper_pearson_upper(k, n, level)
    assert lower.shape == upper.shape == (40, 3)
    n_full = np.broadcast_to(n, k.shape)
    expected_low, expected_up = proportion_confint(k, n_full, alpha=2 * level, method="beta")
    np.testing.assert_allclose(lower, expected_low, rtol=1e-12, atol=0)
    np.testing.assert_allclose(upper, expected_up, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "successes, trials, level",
    [(-1, 10, 0.1), (11, 10, 0.1), (3, 10, 0.0), (3, 10, 1.0)],
)
def test_clopper_pearson_rejects_bad_input(successes: int, trials: int, level: float) -> None:
    with pytest.raises(UserError):
        clopper_pearson_lower(successes, trials, level)
    with pytest.raises(UserError):
        clopper_pearson_upper(successes, trials, level)


@pytest.mark.parametrize(
    "counts, exclude, expected",
    [
        # Large classes are groups; 3 + 2 reaches 5 and flushes; the leftover 1 joins the last group.
        ([50, 30, 3, 2, 1, 0], 0, [50, 30, 6]),
        # Nothing but a small pool: the leftover joins group 0, the excluded class itself.
        ([90, 2, 1, 1], 0, [94]),
        # The leftover pool joins the last large class.
        ([10, 20, 4], 0, [10, 24]),
        # The excluded class need not be the largest; it is always group 0.
        ([7, 60, 8], 1, [60, 8, 7]),
        # Two flushes of 4 + 4.
        ([100, 4, 4, 4, 4], 0, [100, 8, 8]),
        # A class with exactly 5 votes is large; ties in any order give the same groups.
        ([5, 5, 5, 0], 2, [5, 5, 5]),
    ],
)
def test_pooled_groups_hand_cases(counts: list[int], exclude: int, expected: list[int]) -> None:
    groups, num_groups = pooled_groups(np.array([counts]), np.array([exclude]))
    assert num_groups[0] == len(expected)
    assert groups[0, : len(expected)].tolist() == expected
    assert not groups[0, len(expected) :].any()
    assert reduce_counts_reference(np.array(counts), exclude) == expected


def test_pooled_groups_match_the_published_reduction_on_random_counts() -> None:
    rng = np.random.default_rng(2)
    num_classes = 12
    # Mostly small counts so that pooling, flushing and leftovers all happen, many ties.
    counts = rng.integers(0, 9, size=(500, num_classes)) * (rng.random((500, num_classes)) < 0.7)
    counts[:100, 0] += 200
    exclude = rng.integers(0, num_classes, size=500)
    groups, num_groups = pooled_groups(counts, exclude)
    for row in range(len(counts)):
        expected = reduce_counts_reference(counts[row], int(exclude[row]))
        assert groups[row, : num_groups[row]].tolist() == expected


def test_goodman_matches_statsmodels_on_random_vectors() -> None:
    rng = np.random.default_rng(3)
    rows, width = 400, 9
    num_groups = rng.integers(1, width + 1, size=rows)
    groups = rng.integers(0, 3000, size=(rows, width)) * (rng.random((rows, width)) < 0.8)
    groups[:, 0] += 1  # every row needs a positive total
    groups[np.arange(width)[None, :] >= num_groups[:, None]] = 0
    level = rng.choice([0.05, 0.001, 1e-4 / 3], size=rows)
    upper = goodman_upper(groups, num_groups, level)
    for row in range(rows):
        g = num_groups[row]
        confint = multinomial_proportions_confint(groups[row, :g], alpha=2 * level[row], method="goodman")
        expected = confint[:, 1]
        np.testing.assert_allclose(upper[row, :g], expected, rtol=1e-13)
        assert np.isnan(upper[row, g:]).all()


def test_other_class_upper_uses_goodman_beyond_two_groups() -> None:
    counts = np.array([[400, 300, 200, 100, 3, 2]])
    level = 0.001
    # Groups: class 1 itself, then 400, 200, 100, and the pool 3 + 2 = 5.
    expected = multinomial_proportions_confint([300, 400, 200, 100, 5], alpha=2 * level)[1:, 1].max()
    q = other_class_upper(counts, np.array([1]), level, fallback_class=np.array([0]))
    np.testing.assert_allclose(q, [expected], rtol=1e-13)
    assert expected > 400 / 1005  # the largest other class, plus a margin


def test_other_class_upper_two_groups_falls_back_to_clopper_pearson_of_the_given_class() -> None:
    counts = np.array([[700, 290, 3, 1], [990, 2, 1, 0]])  # 2 groups, then 1 group
    level = 0.001
    for fallback in ([0, 0], [1, 2]):
        q = other_class_upper(counts, np.array([0, 0]), level, fallback_class=np.array(fallback))
        lower = [
            proportion_confint(counts[r, fallback[r]], counts[r].sum(), alpha=2 * level, method="beta")[0]
            for r in range(2)
        ]
        np.testing.assert_allclose(q, 1 - np.array(lower), rtol=1e-13)


# ---------------------------------------------------------------- exact miss rates (binomial law, no Monte Carlo)


def lower_miss_rate(n: int, p: np.ndarray, level: float) -> np.ndarray:
    """P[p̲(K) > p] for K ~ Bin(n, p), summed exactly over every outcome k."""
    k = np.arange(n + 1)
    misses = clopper_pearson_lower(k, n, level)[None, :] > p[:, None]
    return (binom.pmf(k[None, :], n, p[:, None]) * misses).sum(axis=1)


def upper_miss_rate(n: int, p: np.ndarray, level: float) -> np.ndarray:
    k = np.arange(n + 1)
    misses = clopper_pearson_upper(k, n, level)[None, :] < p[:, None]
    return (binom.pmf(k[None, :], n, p[:, None]) * misses).sum(axis=1)


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("level", [0.2, 0.02, 1e-4])
def test_clopper_pearson_miss_rate_is_at_most_its_level_and_reaches_it(n: int, level: float) -> None:
    """The miss rate is a step function of p: at most `level` everywhere, and it reaches `level` just
    below each bound value (p̲(k) is the p with P[Bin(n, p) >= k] = level), so the level is exact."""
    grid = np.linspace(1e-6, 1 - 1e-6, 2001)
    assert lower_miss_rate(n, grid, level).max() <= level * (1 + 1e-9)
    assert upper_miss_rate(n, grid, level).max() <= level * (1 + 1e-9)
    k = np.arange(1, n + 1)
    just_below = clopper_pearson_lower(k, n, level) * (1 - 1e-9)
    np.testing.assert_allclose(lower_miss_rate(n, just_below, level), level, rtol=1e-5)
    just_above = 1 - (1 - clopper_pearson_upper(k - 1, n, level)) * (1 - 1e-9)
    np.testing.assert_allclose(upper_miss_rate(n, just_above, level), level, rtol=1e-5)


def multinomial_outcomes(n: int, num_classes: int) -> np.ndarray:
    """Every vote vector of n votes over num_classes classes, (outcomes, C)."""
    if num_classes == 1:
        return np.array([[n]])
    return np.concatenate([np.column_stack([np.full(len(rest), first), rest])
                           for first in range(n + 1) for rest in [multinomial_outcomes(n - first, num_classes - 1)]])


@pytest.mark.parametrize("probabilities", [[0.5, 0.3, 0.2], [0.34, 0.33, 0.33], [0.9, 0.05, 0.05], [0.6, 0.4, 0.0]])
def test_class_upper_family_holds_jointly_with_probability_one_minus_level(probabilities) -> None:
    """Exact, by enumerating every multinomial outcome: all C bounds hold together with probability
    >= 1 - level; each class alone misses with its binomial rate at level / C (Bonferroni)."""
    n, level = 40, 0.3
    p = np.array(probabilities)
    outcomes = multinomial_outcomes(n, len(p))
    weights = multinomial.pmf(outcomes, n, p)
    assert weights.sum() == pytest.approx(1.0)
    misses = class_upper_family(outcomes, level) < p[None, :]
    joint = weights[misses.any(axis=1)].sum()
    assert joint <= level
    for c in range(len(p)):
        assert weights[misses[:, c]].sum() == pytest.approx(upper_miss_rate(n, p[c:c + 1], level / 3)[0], rel=1e-9)
    # q̄ for any excluded class bounds every other class whenever the family holds
    holds = ~misses.any(axis=1)
    for exclude in range(len(p)):
        q = largest_other_upper(class_upper_family(outcomes[holds], level), np.full(holds.sum(), exclude))
        assert np.all(q >= np.delete(p, exclude).max())


def test_class_upper_family_matches_statsmodels_per_class() -> None:
    counts = np.array([[700, 290, 3, 7], [0, 0, 10, 990]])
    family = class_upper_family(counts, 0.004)
    expected = proportion_confint(counts, counts.sum(axis=1, keepdims=True), alpha=2 * 0.001, method="beta")[1]
    np.testing.assert_allclose(family, expected, rtol=1e-12)
    np.testing.assert_array_equal(largest_other_upper(family, np.array([0, 3])), [family[0, 1], family[1, 2]])
