"""Adaptive sampling for the multi-scale cascade: stop sampling an (image, scale) once it is settled.

A fixed-n run spends n samples on every (image, scale) it consults, although most decisions are
clear long before: an image whose selected class gets 20 % of the votes will fall through, one with
every vote already has nearly the radius n would give. Here each (image, scale) is sampled in rounds
(cumulative estimation sizes `round_ends`: 128, 192, 320, 512, … growing ×1.5 up to n_max, in whole
noise chunks, so the votes are a prefix of the fixed-n run's votes) and stops at the first round
where, with the time-uniform bounds [p̲_t, p̄_t] of pipeline/stats/confidence_sequences.py on the selected class ĉ:

- fall through  — p̄_t < p0: go to the next (lower) scale, as the fixed-n cascade would;
- certify        — p̲_t ≥ p0 and the radius now, r_t, is within `radius_tolerance` of r̂, the radius
                   the sequence would give at n_max if the vote rate stayed at its current value
                   (both capped by the earlier stages as in method.md §4): more samples would add
                   at most about `radius_tolerance`;
- abstain        — p̲_t < p0 ≤ p̄_t and neither exit is reachable by n_max: at rate p̄_t for the
                   remaining samples p̲ would stay below p0, and at rate p̲_t p̄ would stay above
                   it (futility);
- or n_max is reached.
Radius vs. samples: for ĉ's rate p < 1 the bound approaches p at rate 1/sqrt(t), so r_t closes in on
r̂ quickly; with every vote for ĉ, 1 − p̲_t ≈ c/t and the radius keeps growing like sigma·sqrt(2 log t),
so a small tolerance keeps confident images sampling longer. `radius_tolerance` is the dial: 0 means
"run to n_max whenever certifiable", a large value means "stop as soon as the decision is made".

Why the certificate stays valid at `alpha`: every bound is a confidence *sequence*, valid
simultaneously at all sample sizes, so it holds at the (data-dependent) stopping time. The argument
of pipeline/stats/cascade.py carries over with these intervals (union split, T = 2K − 1 of them, each at
alpha / T): the K lower sequences on ĉ_k (ĉ_k comes from the independent selection votes), and for
each of the K − 1 scales that can be an earlier stage, one family of upper sequences on *every*
class at level alpha / (T·C) (Bonferroni over the C classes), from which q̄_j = max over c ≠ ĉ_k is
read whatever ĉ_k turns out to be. (The fixed-n cascade needs one Goodman family per pair (j, k)
because it sets ĉ_k aside before pooling; the per-class family serves every k at once, and, unlike
Goodman's chi-square approximation, it is exact.) The upper sequence on ĉ_k only routes images and
needs no coverage; it uses the same level.

The final decision depends only on the stored counts at the stopping time (the bets of the sequence
are fixed, so the bounds are functions of (votes, n)): `certify_cascade_sequential` recomputes it
from a counts table, like `pipeline.stats.cascade.certify_cascade` does for fixed n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from pipeline.stats.cascade import CascadeResult
from pipeline.errors import UserError
from pipeline.stats.confidence_sequences import sequence_lower, sequence_upper


@dataclass(frozen=True)
class AdaptiveSettings:
    """What decides the counts and the certificates of an adaptive run."""

    sigmas: tuple[float, ...]
    n_select: int
    n_max: int
    alpha: float
    p0: float = 0.5
    radius_tolerance: float = 0.05
    first_round: int = 128
    growth: float = 1.5

    def __post_init__(self) -> None:
        if self.n_select < 1 or self.n_max < 1:
            raise UserError("--n-select and --n must be >= 1")
        if not 0.0 < self.alpha < 1.0 or not 0.0 < self.p0 < 1.0:
            raise UserError(f"alpha and p0 must lie strictly between 0 and 1, got {self.alpha}, {self.p0}")
        if self.radius_tolerance < 0:
            raise UserError(f"--radius-tolerance must be >= 0, got {self.radius_tolerance}")
        if self.growth <= 1.0:
            raise UserError(f"round growth must be > 1, got {self.growth}")


def sequential_level(num_scales: int, alpha: float) -> float:
    """One-sided level of each of the T = 2K − 1 intervals (module docstring)."""
    return alpha / (2 * num_scales - 1)


def _radius(sigma: float, lower: np.ndarray, p0: float) -> np.ndarray:
    return sigma * (ndtri(lower) - ndtri(p0))


def _cap_terms(estimate: np.ndarray, selected: np.ndarray, sigmas: np.ndarray, level: float, p0: float,
               trials: int | None = None) -> np.ndarray:
    """(M, j) caps sigma_j (Φ⁻¹(p0) − Φ⁻¹(q̄_j)) of the earlier stages (estimate is (M, j, C)).

    With `trials`, the votes are first rescaled to that many samples at the same rates: the cap
    those stages would give after `trials` samples (used to judge whether sampling them pays)."""
    terms = np.empty((len(selected), estimate.shape[1]))
    for j in range(estimate.shape[1]):
        votes = estimate[:, j].astype(np.float64)
        if trials is not None:
            votes = votes * (trials / votes.sum(axis=1, keepdims=True))
        uppers = sequence_upper(votes, votes.sum(axis=1, keepdims=True), level / votes.shape[1])
        uppers[np.arange(len(selected)), selected] = -np.inf
        terms[:, j] = sigmas[j] * (ndtri(p0) - ndtri(uppers.max(axis=1)))
    return terms


def _check_counts(select_counts: np.ndarray, estimate_counts: np.ndarray, sigmas: np.ndarray) -> None:
    if select_counts.ndim != 3 or select_counts.shape != estimate_counts.shape:
        raise UserError(f"counts must be (images, scales, classes) of one shape, got {select_counts.shape} "
                        f"and {estimate_counts.shape}")
    if len(sigmas) != select_counts.shape[1] or np.any(sigmas <= 0) or np.any(np.diff(sigmas) >= 0):
        raise UserError(f"sigmas must be positive, strictly decreasing, one per scale; got {sigmas.tolist()}")
    if np.any(select_counts < 0) or np.any(estimate_counts < 0):
        raise UserError("vote counts must be non-negative")


def certify_cascade_sequential(
    select_counts: np.ndarray,
    estimate_counts: np.ndarray,
    sigmas: Sequence[float],
    alpha: float,
    p0: float = 0.5,
    fell_through: np.ndarray | None = None,
) -> CascadeResult:
    """The method.md §4 cascade with confidence-sequence bounds: valid at any stopping time.

    Same rule as `certify_cascade` (p̲ ≥ p0 certifies, p̄ ≥ p0 > p̲ abstains, p̄ < p0 falls
    through; radii capped by earlier stages), with each stage's own n (its stopping time).
    fell_through: optional (M, K-1) bool, the routing an adaptive run took at stages 1..K-1 (it has
    votes at the next stage). `run_adaptive` routes on p̄ < p0 when it is seen, and may later sample
    a stage again for a tighter cap, which can lift p̄ back above p0; routing needs no coverage, so
    the routing actually taken stands. None: route on the final counts.
    """
    select = np.asarray(select_counts, dtype=np.int64)
    estimate = np.asarray(estimate_counts, dtype=np.int64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    _check_counts(select, estimate, sigmas)
    level = sequential_level(len(sigmas), alpha)
    num_images = select.shape[0]
    prediction = np.full(num_images, -1, dtype=np.int64)
    radius = np.zeros(num_images)
    stage = np.full(num_images, -1, dtype=np.int64)
    pending = np.ones(num_images, dtype=bool)
    for k, sigma in enumerate(sigmas):
        rows = np.flatnonzero(pending)
        if rows.size == 0:
            break
        n = estimate[rows, k].sum(axis=1)
        if np.any(n == 0) or np.any(select[rows, k].sum(axis=1) == 0):
            raise UserError(f"scale sigma={sigma:g} is needed for images that have no votes there")
        selected = select[rows, k].argmax(axis=1)
        votes = estimate[rows, k][np.arange(len(rows)), selected]
        lower, upper = sequence_lower(votes, n, level), sequence_upper(votes, n, level)
        moved_on = upper < p0 if fell_through is None or k == len(sigmas) - 1 else fell_through[rows, k]
        decided = ~moved_on
        certified = decided & (lower >= p0)
        stage[rows[decided]] = k
        pending[rows[decided]] = False
        caps = _cap_terms(estimate[rows[certified], :k], selected[certified], sigmas, level, p0)
        r = np.min(np.column_stack([_radius(sigma, lower[certified], p0), caps]), axis=1)
        positive = r > 0
        prediction[rows[certified][positive]] = selected[certified][positive]
        radius[rows[certified][positive]] = r[positive]
    return CascadeResult(prediction=prediction, radius=radius, stage=stage)


CONTINUE, STOP, FALL_THROUGH = 0, 1, 2


def round_status(
    select: np.ndarray, estimate: np.ndarray, stage: int, settings: AdaptiveSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(status, stage to sample next) for images deciding at `stage`; select/estimate are (M, K, C).

    A certifiable image whose radius is limited by an earlier stage's cap (few samples there,
    because it fell through early) samples that stage next: the caps' sequences are time-uniform
    too, so sampling a stage again later is as valid as sampling it longer at once.
    """
    sigmas = np.asarray(settings.sigmas, dtype=np.float64)
    level = sequential_level(len(sigmas), settings.alpha)
    p0, n_max = settings.p0, settings.n_max
    rows = np.arange(select.shape[0])
    selected = select[:, stage].argmax(axis=1)
    n = estimate[:, stage].sum(axis=1)
    votes = estimate[rows, stage, selected]
    lower, upper = sequence_lower(votes, n, level), sequence_upper(votes, n, level)
    remaining = n_max - n
    # Radius terms now and as projected to n_max at the current rates: own bound, then each cap.
    terms_now = np.column_stack([_radius(sigmas[stage], lower, p0),
                                 _cap_terms(estimate[:, :stage], selected, sigmas, level, p0)])
    own_at_n_max = sequence_lower(votes + votes / n * remaining, n_max, level)
    terms_at_n_max = np.column_stack([_radius(sigmas[stage], own_at_n_max, p0),
                                      _cap_terms(estimate[:, :stage], selected, sigmas, level, p0, n_max)])
    binding = terms_now.argmin(axis=1)  # 0 = this stage's own bound, j + 1 = the cap of stage j
    certifiable = lower >= p0
    settled = terms_now.min(axis=1) >= terms_at_n_max.min(axis=1) - settings.radius_tolerance
    # Undecided and settled: neither exit is reachable by n_max even at the most favourable rate.
    futile = (sequence_lower(votes + upper * remaining, n_max, level) < p0) & (
        sequence_upper(votes + lower * remaining, n_max, level) >= p0)
    status = np.where(certifiable, np.where(settled, STOP, CONTINUE),
                      np.where((n >= n_max) | futile, STOP, CONTINUE))
    target = np.where(certifiable & (binding > 0), binding - 1, stage)
    return np.where(upper < p0, FALL_THROUGH, status), target
