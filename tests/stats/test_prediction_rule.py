"""The cascaded prediction rule: its test statistic, its branches, and its error/abstain rates.

Promise checked on analytic counts: a stage whose top two classes are equally likely outputs a class
with probability <= alpha (so K such stages abstain with probability >= 1 - K·alpha), and a stage
outputs a class that is not its most probable one with probability <= alpha. Tolerances are
4·sqrt(alpha(1-alpha)/T) for T trials (false failure about 3e-5); seeds are fixed.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pipeline.stats.analytic import sample_votes
from pipeline.errors import UserError
from pipeline.stats.prediction import predict_cascade, top_two_pvalue

ALPHA = 0.05
TRIALS = 20_000
TOLERANCE = 4 * np.sqrt(ALPHA * (1 - ALPHA) / TRIALS)


def test_pvalue_matches_scipy_binomtest() -> None:
    rng = np.random.default_rng(20)
    top = rng.integers(0, 3000, size=300)
    runner_up = (rng.random(300) * (top + 1)).astype(int)
    top[:5], runner_up[:5] = [0, 1, 7, 10, 500], [0, 0, 7, 3, 499]
    expected = [binomtest(int(a), int(a + b), 0.5).pvalue if a + b else 1.0 for a, b in zip(top, runner_up)]
    np.testing.assert_allclose(top_two_pvalue(top, runner_up), expected, rtol=1e-9)


def test_branches_on_hand_made_counts() -> None:
    zero = [0, 0, 0]
    counts = np.array(
        [
            [[10, 80, 10], zero, zero],  # decided at the first stage
            [[40, 45, 15], [5, 10, 85], zero],  # first stage too close, second decides
            [[40, 45, 15], [30, 35, 35], [34, 33, 33]],  # never decided: abstain
        ]
    )
    prediction, stage = predict_cascade(counts, ALPHA)
    assert prediction.tolist() == [1, 2, -1]
    assert stage.tolist() == [0, 1, -1]


def test_a_needed_stage_without_votes_is_an_error() -> None:
    counts = np.array([[[40, 45, 15], [0, 0, 0]]])
    with pytest.raises(UserError, match="stage 2 is needed for 1 image"):
        predict_cascade(counts, ALPHA)


def rates(probabilities: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and deciding stages for TRIALS draws of (K, C) probabilities."""
    repeated = np.broadcast_to(probabilities, (TRIALS, *probabilities.shape))
    counts = sample_votes(repeated, n, np.random.default_rng(seed))
    return predict_cascade(counts, ALPHA)


def test_equal_top_two_abstains_at_least_one_minus_alpha() -> None:
    prediction, _ = rates(np.array([[0.45, 0.45, 0.10]]), 1000, seed=21)
    assert (prediction == -1).mean() >= 1 - ALPHA - TOLERANCE


def test_three_tied_stages_abstain_at_least_one_minus_three_alpha() -> None:
    probabilities = np.array([[0.45, 0.45, 0.10], [0.10, 0.45, 0.45], [0.45, 0.10, 0.45]])
    prediction, _ = rates(probabilities, 500, seed=22)
    assert (prediction == -1).mean() >= 1 - 3 * ALPHA - TOLERANCE


def test_wrong_top_class_at_most_alpha_and_a_clear_top_class_is_found() -> None:
    prediction, stage = rates(np.array([[0.46, 0.44, 0.10]]), 1000, seed=23)
    assert (prediction == 1).mean() <= ALPHA + TOLERANCE
    prediction, stage = rates(np.array([[0.7, 0.2, 0.1]]), 100, seed=24)
    assert ((prediction == 0) & (stage == 0)).mean() >= 0.99


def test_cascade_error_rate_with_a_different_top_class_per_stage() -> None:
    # Stage 1 is tied, stage 2 prefers class 2 slightly, stage 3 prefers class 0 clearly: an error is
    # a class that is not the most probable one of the stage that output it.
    probabilities = np.array([[0.4, 0.4, 0.2], [0.3, 0.32, 0.38], [0.8, 0.1, 0.1]])
    prediction, stage = rates(probabilities, 300, seed=25)
    top = probabilities.argmax(axis=1)
    decided = stage >= 0
    wrong = decided & (prediction != top[np.maximum(stage, 0)])
    # Stage 1 is tied, so any output there is an error with probability <= alpha; stage 2 errs with
    # probability <= alpha; union bound over the stages.
    assert wrong.mean() <= 2 * ALPHA + TOLERANCE
    assert decided.mean() >= 0.95  # stage 3 decides whatever the earlier ones left
