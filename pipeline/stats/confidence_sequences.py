"""Anytime-valid confidence sequences for a Bernoulli mean (numpy only, vectorized).

Why: a Clopper-Pearson bound holds at one sample size fixed in advance. Adaptive sampling
(pipeline/stats/sequential_cascade.py) looks at the votes after every round and stops when the decision is settled,
so the sample size is random and depends on the votes; a fixed-n bound evaluated at such a stopping
time over-claims. A confidence sequence holds at every sample size simultaneously, so it stays
valid at any stopping time, however the stopping rule was chosen.

Construction: a betting confidence sequence (Waudby-Smith & Ramdas, "Estimating means of bounded
random variables by betting", JRSS-B 2024) with a *fixed* mixture of constant bets. For a candidate
mean m and a bet λ ∈ (0, 1], the capital after t votes X_1..X_t ∈ {0, 1} is
    K_t^λ(m) = Π_i (1 + λ (X_i − m)) = (1 + λ(1 − m))^S · (1 − λ m)^(t − S),   S = Σ X_i.
If the true mean is m, each factor has conditional mean 1, so K^λ(m) is a non-negative martingale
starting at 1, and so is the mixture K_t(m) = Σ_j w_j K_t^{λ_j}(m) over the grid `BETS` with the
fixed weights `WEIGHTS` (Σ w_j = 1). Ville's inequality then gives P[∃ t: K_t(p) ≥ 1/level] ≤ level
at the true mean p.
Every factor decreases in m (λ ≥ 0), so K_t is non-increasing in m and {m : K_t(m) ≥ 1/level} is
an interval [0, m_t]: the lower bound is p̲_t = m_t, found by bisection, and p < p̲_t implies
K_t(p) ≥ 1/level. Hence P[∃ t: p < p̲_t] ≤ level — a one-sided, time-uniform guarantee.
The upper bound is the lower bound of the failure rate 1 − p, mirrored.

Because the bets are constant (not chosen from past votes), the capital depends on the votes only
through (S, t): a bound needs nothing but the counts, which is what lets the reduce stage recompute
it from the stored counts table, and lets whole rounds of samples be processed at once. (A
predictable plug-in bet would be tighter for rates far from 0 and 1, but its capital depends on
the order of the votes, which the counts table does not keep.)

Cost of time-uniformity: at t = 10,000 and level 2e-4 the bound's Φ⁻¹ is 0.02 below
Clopper-Pearson's at p = 0.85 and 0.02 at p = 1 (0.1 and 0.08 at t = 128), in exchange for being
allowed to stop at any t.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from pipeline.errors import UserError

BETS: np.ndarray = 2.0 ** (-np.arange(13) / 2.0)
"""Bet sizes 1, 2^-1/2, …, 1/64. Large bets win quickly when the true rate is far from m
(certificates with p near 1); small bets keep power for rates just above m (decisions near p0). The
Kelly bet for true rate p against m is (p − m)/(m(1 − m)), so this geometric grid is never far from
it (a √2 grid loses at most 17 % of the optimal growth rate)."""

WEIGHTS: np.ndarray = np.r_[0.5, np.full(12, 0.5 / 12)]
"""Half the prior on the full bet λ = 1, the rest spread evenly. A bet of weight w costs log(1/w) nats
of evidence: 0.7 for λ = 1 instead of log 13 = 2.6 under uniform weights, 3.2 for the others instead
of 2.6. Why: on digits-like models most certified images get (nearly) every vote, and λ = 1 is the
best bet for them; their bounds then need ~20 % fewer samples (at p = 1 and level 2e-4: Φ⁻¹ of the
bound 1.44 instead of 1.34 after 128 votes), which is what target-radius runs stop on. Images near
a threshold at large t lose Φ⁻¹ ≈ 0.006 (measured at t = 1,000, p = 0.85-0.99)."""

BISECTION_STEPS = 40
"""Bisection halvings on [0, 1]: 2^-40 ≈ 1e-12, far below any difference a radius can show."""


def log_capital(successes: np.ndarray, trials: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """log K_t(mean) of the weighted bet mixture; arguments broadcast, result has their shape.

    Terms with zero successes (or failures) are dropped explicitly so that m = 1 with λ = 1 (a
    factor of 0 raised to the power 0) gives 0, not NaN.
    """
    s, t, m = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(trials, np.float64),
                                  np.asarray(mean, np.float64))
    s, f, m = s[..., None], (t - s)[..., None], m[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        win = np.where(s > 0, s * np.log1p(BETS * (1.0 - m)), 0.0)
        loss = np.where(f > 0, f * np.log1p(-BETS * m), 0.0)
    # The smallest bet keeps every mixture finite for m in [0, 1]; logsumexp handles the -inf terms.
    return logsumexp(win + loss + np.log(WEIGHTS), axis=-1)


def _check(successes: np.ndarray, trials: np.ndarray, level: np.ndarray) -> None:
    if not np.all((level > 0) & (level < 1)):
        raise UserError(f"confidence level must lie strictly between 0 and 1, got {level}")
    if np.any(successes < 0) or np.any(successes > trials):
        raise UserError("vote counts must satisfy 0 <= successes <= trials")


def sequence_lower(
    successes: np.ndarray | int, trials: np.ndarray | int, level: np.ndarray | float
) -> np.ndarray:
    """Time-uniform lower confidence bound on a Bernoulli mean: P[∃ t: p < bound_t] ≤ level.

    Depends only on (successes, trials); 0 when there is no evidence (trials = 0). The returned value
    is the bisection's lower end, so rounding can only make it smaller (conservative).
    """
    k, n, a = np.broadcast_arrays(np.asarray(successes, np.float64), np.asarray(trials, np.float64),
                                  np.asarray(level, np.float64))
    _check(k, n, a)
    threshold = -np.log(a)
    low = np.zeros(k.shape)
    high = np.divide(k, n, out=np.zeros(k.shape), where=n > 0)  # K_t(p̂) ≤ 1 < 1/level (Jensen)
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2.0
        rejected = log_capital(k, n, middle) >= threshold
        low = np.where(rejected, middle, low)
        high = np.where(rejected, high, middle)
    # low = 0 is returned as is: the set {m: K_t(m) >= 1/level} may be empty.
    return low


def sequence_upper(
    successes: np.ndarray | int, trials: np.ndarray | int, level: np.ndarray | float
) -> np.ndarray:
    """Time-uniform upper bound: the lower bound of the failure rate, mirrored (1 when trials = 0)."""
    k = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    return 1.0 - sequence_lower(n - k, n, level)
