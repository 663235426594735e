"""Confidence bounds on vote counts (docs/statistics.md: "One scale (Cohen et al.)", "The cascade and
its caps"), vectorized over images.

Everything here is pure numpy/scipy so that the statistics can be read against docs/statistics.md and
tested exhaustively without a model. Every ``level`` is a *one-sided miss probability*: the returned bound is
on the wrong side of the true probability with probability at most ``level``. Clopper-Pearson and the
per-class family built from it are exact (the miss probability is at most ``level`` for every n and p,
by the binomial law); Goodman is a chi-square approximation, kept only for the reference mode.
"""

from __future__ import annotations

import numpy as np
from scipy.special import betaincinv, betainccinv, gammaincinv

from pipeline.errors import UserError

#: Classes with fewer votes than this are pooled before the Goodman bound (the chi-square
#: approximation behind it is poor for tiny cells); the published reference uses 5.
MIN_GROUP_VOTES = 5


def _check_level(level: np.ndarray) -> None:
    if not np.all((level > 0) & (level < 1)):
        raise UserError(f"confidence level must lie strictly between 0 and 1, got {level}")


def _check_counts(successes: np.ndarray, trials: np.ndarray) -> None:
    if np.any(successes < 0) or np.any(successes > trials):
        raise UserError("vote counts must satisfy 0 <= successes <= trials")


def clopper_pearson_lower(
    successes: np.ndarray | int, trials: np.ndarray | int, level: np.ndarray | float
) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound: Beta(level; k, n-k+1) quantile, 0 when k = 0.

    This is the p with P[Bin(n, p) >= k] = level, so P[bound > true p] <= level.
    Arguments broadcast against each other.
    """
    k, n, a = np.broadcast_arrays(
        np.asarray(successes, dtype=np.float64),
        np.asarray(trials, dtype=np.float64),
        np.asarray(level, dtype=np.float64),
    )
    _check_level(a)
    _check_counts(k, n)
    positive = k > 0
    # Where k = 0 the Beta shape would be 0; evaluate a harmless placeholder and overwrite it.
    bound = betaincinv(np.where(positive, k, 1.0), n - k + 1.0, a)  # = scipy.stats.beta.ppf
    return np.where(positive, bound, 0.0)


def clopper_pearson_upper(
    successes: np.ndarray | int, trials: np.ndarray | int, level: np.ndarray | float
) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound: Beta(1 - level; k+1, n-k) quantile, 1 when k = n.

    This is the p with P[Bin(n, p) <= k] = level. ``beta.isf`` (as statsmodels uses) keeps full
    precision where 1 - level would round.
    """
    k, n, a = np.broadcast_arrays(
        np.asarray(successes, dtype=np.float64),
        np.asarray(trials, dtype=np.float64),
        np.asarray(level, dtype=np.float64),
    )
    _check_level(a)
    _check_counts(k, n)
    below_all = k < n
    bound = betainccinv(k + 1.0, np.where(below_all, n - k, 1.0), a)  # = scipy.stats.beta.isf
    return np.where(below_all, bound, 1.0)


def class_upper_family(counts: np.ndarray, level: np.ndarray | float) -> np.ndarray:
    """Exact simultaneous upper bounds on every class's probability (docs/statistics.md, "The cascade and
    its caps", exact caps): (M, C).

    Each class c gets the one-sided Clopper-Pearson upper bound on its share of the row's votes at
    level / C. Class c's count is Binomial(n, p_c), so each bound misses with probability at most
    level / C, and by Bonferroni all C hold together with probability at least 1 - level, for any
    n and any class probabilities. The max over the classes other than any ĉ is then an upper bound
    on every class but ĉ, whichever ĉ a later stage selects: one family serves every later stage.
    counts: (M, C) estimation votes; level: scalar or (M,).
    """
    counts = np.asarray(counts, dtype=np.int64)
    per_class = np.asarray(level, dtype=np.float64) / counts.shape[1]
    per_class = per_class[..., None] if per_class.ndim else per_class
    return clopper_pearson_upper(counts, counts.sum(axis=1, keepdims=True), per_class)


def largest_other_upper(family: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """q̄ from a ``class_upper_family``: the largest bound over the classes other than ``exclude`` (M,)."""
    others = np.array(family, dtype=np.float64)
    others[np.arange(len(others)), np.asarray(exclude, dtype=np.int64)] = -np.inf
    return others.max(axis=1)


def pooled_groups(counts: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group the votes of every class but ``exclude`` the way the published reference does.

    Returns ``(groups, num_groups)``: ``groups`` is (M, C+1), zero-padded on the right, and row m
    holds ``num_groups[m]`` groups. Group 0 is the count of ``exclude`` itself. The other classes
    are walked in order of descending count: a class with >= 5 votes is its own group; smaller ones
    accumulate in a pool that becomes a group (and restarts) whenever it reaches 5; a leftover pool
    is added to the *last* group, which is group 0 when no other group formed. Only the sorted
    values matter, so the tie order of the reference's ``np.argsort(...)[::-1]`` cannot change
    the result.
    """
    counts = np.asarray(counts, dtype=np.int64)
    exclude = np.asarray(exclude, dtype=np.int64)
    num_images, num_classes = counts.shape
    rows = np.arange(num_images)
    others = counts.copy()
    others[rows, exclude] = 0
    descending = -np.sort(-others, axis=1)

    groups = np.zeros((num_images, num_classes + 1), dtype=np.int64)
    groups[:, 0] = counts[rows, exclude]
    num_groups = np.ones(num_images, dtype=np.int64)
    pool = np.zeros(num_images, dtype=np.int64)
    # Columns past the last non-zero vote of every row only add zeros to the pool.
    num_columns = int((descending > 0).sum(axis=1).max(initial=0))
    for column in range(num_columns):
        votes = descending[:, column]
        large = votes >= MIN_GROUP_VOTES
        pooled = pool + np.where(large, 0, votes)
        flush = ~large & (pooled >= MIN_GROUP_VOTES)
        append = large | flush
        groups[rows[append], num_groups[append]] = np.where(large, votes, pooled)[append]
        num_groups += append
        pool = np.where(flush, 0, pooled)
    groups[rows, num_groups - 1] += pool
    return groups, num_groups


def goodman_upper(groups: np.ndarray, num_groups: np.ndarray, level: np.ndarray | float) -> np.ndarray:
    """Goodman simultaneous upper bounds per group, as statsmodels computes them.

    Equals ``multinomial_proportions_confint(groups[m, :g], alpha=2*level, method="goodman")[:, 1]``
    for each row m with g = num_groups[m]: with chi = chi2.ppf(1 - 2*level/g, 1) (Bonferroni over
    the g two-sided intervals) and N the row total, the upper bound on group i is
    (2 n_i + chi + sqrt(chi^2 + 4 n_i chi (1 - n_i/N))) / (2 (chi + N)).
    Passing 2*level makes each one-sided upper bound miss with probability about level/g, so the
    whole family of upper bounds holds with probability about 1 - level (asymptotically: the
    chi-square approximation is why small classes are pooled first). Padding columns get NaN.
    """
    groups = np.asarray(groups, dtype=np.float64)
    num_groups = np.asarray(num_groups, dtype=np.int64)
    level = np.asarray(level, dtype=np.float64)
    _check_level(level)
    total = groups.sum(axis=1, keepdims=True)
    chi = 2.0 * gammaincinv(0.5, 1.0 - 2.0 * level / num_groups)[:, None]  # = scipy.stats.chi2.ppf(·, 1)
    share = groups / total
    delta = chi**2 + 4.0 * total * share * chi * (1.0 - share)
    upper = (2.0 * total * share + chi + np.sqrt(delta)) / (2.0 * (chi + total))
    valid = np.arange(groups.shape[1])[None, :] < num_groups[:, None]
    return np.where(valid, upper, np.nan)


def other_class_upper(
    counts: np.ndarray, exclude: np.ndarray, level: np.ndarray | float, fallback_class: np.ndarray
) -> np.ndarray:
    """Goodman q̄ (reference mode only): bound on the largest probability of any class other than
    ``exclude`` as the published code computes it (docs/statistics.md, "What exactly is guaranteed",
    reference mode).

    counts: (M, C) estimation votes of one stage; exclude: (M,) the class set aside (ĉ_k of the
    deciding stage); level: one-sided miss probability of the whole family.

    With >= 3 pooled groups (see ``pooled_groups``) q̄ is the largest Goodman upper bound over the
    groups other than group 0; a class's probability is at most its group's, so this bounds every
    class but ``exclude``. With <= 2 groups the Goodman family is too coarse and q̄ is
    1 - Clopper-Pearson lower bound on the share of ``fallback_class``.

    ``fallback_class`` exists because the published code (Jeong & Shin, ``off_class_upper_radius``)
    passes the *stage's own* selected class ĉ_j there, while the cap's argument (docs/statistics.md,
    "The cascade and its caps") needs ĉ_k (= ``exclude``).
    Only ĉ_k is a valid bound (1 - p̲(ĉ_k) bounds the total of all other classes); ĉ_j is what
    reproduces the reference. The reference parquet does not tell them apart (no certified image
    there reaches the two-group case), so reference mode follows the published code. Union mode does
    not use this function: it reads q̄ from the exact ``class_upper_family``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    rows = np.arange(counts.shape[0])
    groups, num_groups = pooled_groups(counts, exclude)
    uppers = goodman_upper(groups, num_groups, level)[:, 1:]
    has_other_groups = num_groups > 2
    # Rows with <= 2 groups take the fallback below; fill them so the max stays NaN-free.
    goodman = np.max(np.where(np.isnan(uppers), -np.inf, uppers), axis=1)
    fallback = 1.0 - clopper_pearson_lower(
        counts[rows, np.asarray(fallback_class, dtype=np.int64)], counts.sum(axis=1), level
    )
    return np.where(has_other_groups, goodman, fallback)
