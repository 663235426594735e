"""Cascaded prediction without a certificate (docs/statistics.md, "Cascaded prediction").

At stage k (highest sigma first) a two-sided binomial test asks whether the top two vote counts
could come from equal probabilities; if it rejects at level alpha the top class is output,
otherwise the next stage is tried, and after the last stage the prediction abstains. As in the
published code (Cohen et al.'s ``predict``, reused by Jeong & Shin), every stage tests at alpha
itself: a stage outputs a class that is not its most probable one with probability at most alpha,
so the cascade does with probability at most K·alpha.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError


def top_two_pvalue(top: np.ndarray, runner_up: np.ndarray) -> np.ndarray:
    """Two-sided binomial test p-value of ``top`` successes in ``top + runner_up`` trials at p = 1/2.

    The null distribution is symmetric, so the outcomes at least as extreme as ``top >= n/2`` are the
    two tails beyond it: p = min(1, 2 P[Bin(n, 1/2) >= top]), as ``scipy.stats.binomtest`` gives.
    With no votes at all (n = 0) the p-value is 1.
    """
    from scipy.stats import binom  # here, not at the top: scipy.stats takes ~0.5 s to import, in every actor

    top = np.asarray(top, dtype=np.int64)
    trials = top + np.asarray(runner_up, dtype=np.int64)
    return np.minimum(1.0, 2.0 * binom.sf(top - 1, trials, 0.5))


def predict_cascade(counts: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Cascaded prediction on votes (M, K, C), scales ordered from the highest sigma.

    Returns ``(prediction, stage)``, both int64 (M,): the output class (-1 = abstain) and the index
    of the stage that output it (-1 when abstaining). Stages after the deciding one may be all
    zeros (never sampled); a stage that is needed but has no votes raises UserError. ``alpha`` is
    trusted to lie in (0, 1) (`CertifyConfig` validates it).
    """
    counts = np.asarray(counts)
    if counts.ndim != 3 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
        raise UserError("prediction counts must be non-negative integers of shape (images, scales, classes)")
    if counts.shape[2] < 2:
        raise UserError("prediction needs at least two classes")
    num_images = counts.shape[0]
    prediction = np.full(num_images, -1, dtype=np.int64)
    stage = np.full(num_images, -1, dtype=np.int64)
    pending = np.ones(num_images, dtype=bool)
    for k in range(counts.shape[1]):
        rows = np.flatnonzero(pending)
        votes = counts[rows, k]
        unsampled = votes.sum(axis=1) == 0
        if np.any(unsampled):
            raise UserError(
                f"stage {k + 1} is needed for {int(unsampled.sum())} image(s) that have no votes there"
            )
        ordered = np.sort(votes, axis=1)
        rejects = top_two_pvalue(ordered[:, -1], ordered[:, -2]) <= alpha
        prediction[rows[rejects]] = np.argmax(votes[rejects], axis=1)
        stage[rows[rejects]] = k
        pending[rows[rejects]] = False
    return prediction, stage
