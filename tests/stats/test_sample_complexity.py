"""The information bound on the votes any valid sequential test needs (pipeline/stats/sample_complexity.py):
exact on the unanimous case, respected by our own confidence sequence looked at after every vote, and
broken only by a rule that is not valid (the negative control)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from pipeline.config import CertifyConfig
from pipeline.errors import UserError
from pipeline.perf.benchmark import BenchmarkImages, fewest_forward_passes
from pipeline.sampling.adaptive import SamplingOutcome
from pipeline.stats.cascade import CascadeResult
from pipeline.stats.confidence_sequences import log_capital
from pipeline.stats.sample_complexity import bernoulli_divergence, fewest_expected_votes
from pipeline.stats.sequential_cascade import sequential_level

LEVEL, THRESHOLD, RATE = 0.01, float(ndtr(0.5)), 0.85  # R = 0.25 at sigma = 0.5: p must exceed Φ(0.5)
HORIZON, PATHS = 600, 4000


def test_divergence_and_the_unanimous_case_are_exact() -> None:
    """KL against its definition, and p = 1: the best valid test claims after t unanimous votes, where
    m^t ≤ level first (its chance at rate m is m^t); the bound lies below that t and within log 2 of it."""
    p, m = 0.7, 0.4
    assert bernoulli_divergence(p, m) == pytest.approx(p * np.log(p / m) + (1 - p) * np.log((1 - p) / (1 - m)))
    best = np.ceil(np.log(LEVEL) / np.log(THRESHOLD))
    bound = float(fewest_expected_votes(1.0, THRESHOLD, LEVEL))
    assert bound <= best and bound == pytest.approx((np.log(1 / LEVEL) - np.log(2)) / np.log(1 / THRESHOLD))
    assert fewest_expected_votes(THRESHOLD, THRESHOLD, LEVEL) == np.inf  # a claim at the threshold is wrong
    with pytest.raises(UserError):
        fewest_expected_votes(0.9, 1.0, LEVEL)


def first_claims(claims_at: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """(PATHS,) the first t (1-based) at which `claims_at[t, successes]` holds on Bernoulli(rate) paths;
    HORIZON + 1 where it never does."""
    votes = np.random.default_rng(seed).random((PATHS, HORIZON)) < rate
    successes = np.cumsum(votes, axis=1)
    claimed = claims_at[np.arange(1, HORIZON + 1), successes]
    return np.where(claimed.any(axis=1), claimed.argmax(axis=1) + 1, HORIZON + 1)


def test_a_valid_sequential_test_needs_at_least_the_bound() -> None:
    """Our betting sequence's test of "p > m", looked at after every single vote (the most a sequential test
    can look), at a rate it surely certifies: its mean stopping time is at least the bound for the claim
    probability it reached, and not far above it (the bound is what the benchmark measures against).
    Negative control: a rule that claims once the vote rate exceeds m by 0.05 after 16 votes stops sooner
    than the bound allows, and it is not valid: at rate m it claims far more often than the level."""
    trials = np.arange(HORIZON + 1)[:, None]
    successes = np.arange(HORIZON + 1)[None, :]
    valid = log_capital(np.minimum(successes, trials), trials, THRESHOLD) >= np.log(1 / LEVEL)
    valid &= successes <= trials
    stops = first_claims(valid, RATE, seed=1)
    missed = np.mean(stops > HORIZON)
    bound = ((1 - missed) * np.log(1 / LEVEL) - np.log(2)) / bernoulli_divergence(RATE, THRESHOLD)
    assert missed < 0.01 and bound <= np.minimum(stops, HORIZON).mean() <= 3 * bound
    assert np.mean(first_claims(valid, THRESHOLD, seed=2) <= HORIZON) <= LEVEL + 4 * np.sqrt(LEVEL / PATHS)

    with np.errstate(divide="ignore", invalid="ignore"):
        naive = (trials >= 16) & (successes / trials >= THRESHOLD + 0.05) & (successes <= trials)
    naive_stops = first_claims(naive, RATE, seed=3)
    assert np.minimum(naive_stops, HORIZON).mean() < fewest_expected_votes(RATE, THRESHOLD, LEVEL)
    assert np.mean(first_claims(naive, THRESHOLD, seed=4) <= HORIZON) > 10 * LEVEL


def test_fewest_forward_passes_charges_selection_and_proofs_and_leaves_one_image_out() -> None:
    """Three images certified at sigma 0.5 by a fixed run of 1,000 votes: two correct ones at R = 0.25 (the
    costlier is left out), one whose prediction is wrong (it need not be proven): the bound is three
    images' selection samples plus the cheaper proof, at the run's per-interval level."""
    config = CertifyConfig(sigmas=(0.5, 0.25), n_select=50, n=1000, alpha=0.001)
    votes = np.array([900, 990, 950])
    estimate = np.zeros((3, 2, 10), dtype=np.int64)
    estimate[np.arange(3), 0, [1, 2, 3]] = votes
    estimate[np.arange(3), 0, 0] = 1000 - votes
    result = CascadeResult(prediction=np.array([1, 2, 3]), radius=np.array([0.4, 1.0, 0.6]), stage=np.zeros(3, int))
    fixed = SamplingOutcome(result, np.zeros_like(estimate), estimate, rounds=1)
    work = BenchmarkImages(np.zeros((3, 1, 8, 8)), np.array([10, 11, 12]), np.array([1, 2, 7]), config)
    bound = fewest_forward_passes(fixed, work, [0.25])
    level = sequential_level(2, 0.001)
    cheaper = fewest_expected_votes(0.99, ndtr(0.5), level)
    assert bound["left_out_image"] == 10 and bound["level"] == level
    assert bound["forward_passes"] == pytest.approx(3 * config.replace(strategy="adaptive").selection_samples + cheaper)
