"""The multi-scale certification cascade (method.md §4) and single-scale certification (§3).

Scales are ordered from the highest sigma. At stage k the Clopper-Pearson bounds [p̲_k, p̄_k] on the
selected class ĉ_k decide: p̲_k >= p0 certifies ĉ_k, p̄_k >= p0 > p̲_k abstains (undecided), and
p̄_k < p0 falls through to stage k+1. A certificate at stage k is capped by every earlier stage j:
r = min(sigma_k (Φ⁻¹(p̲_k) - Φ⁻¹(p0)), min_j sigma_j (Φ⁻¹(p0) - Φ⁻¹(q̄_j))); r <= 0 abstains.

Alpha split (``alpha_mode``)
----------------------------
The population cascade outputs, at the first stage where some class has probability > p0, that
class. A certificate (ĉ_k, r) issued at stage k is correct (the population cascade outputs ĉ_k on
the whole ball of radius r, since Φ⁻¹ of each class probability is 1/sigma-Lipschitz) when
(i) p̲_k is below the true probability of ĉ_k at stage k, and (ii) for every earlier stage j < k,
q̄_j is above the true probability of every class other than ĉ_k at stage j.
Which stage decides is random, so ``"union"`` (the default) covers every interval any certificate
could rely on: the K Clopper-Pearson lower bounds, plus one Goodman family for every pair j < k
(the class set aside, ĉ_k, depends on the deciding stage k). That is T = K + K(K-1)/2 = K(K+1)/2
intervals, each at one-sided level alpha / T (alpha/6 for three scales); by the union bound they all
hold together with probability >= 1 - alpha, and then every certificate the cascade issues is
correct. ĉ_k comes from the selection votes, which are independent of the estimation votes the
intervals use, so each interval keeps its level given ĉ_k. The upper bounds p̄_k only route images
(undecided or fall through) and need no coverage; they use the same level alpha / T. Because
alpha / T <= alpha / k, every union bound is at least as wide as its reference counterpart, so a
union certificate is also a reference certificate of the same class with a radius at least as
large. ``"reference"`` reproduces the published code: stage k (1-based) uses alpha / k for its
bounds and for the caps it computes from every earlier stage; it carries no joint guarantee (at an
input on the sigma=1.0 decision boundary jobs/coverage.py measures a violation rate above alpha:
a stage-1 false certificate and a fall-through followed by a too-large stage-1 cap add up).
Caveat for both: the Goodman bound is a chi-square approximation and the pooling of small
classes depends on the data, so (ii) holds at its level only approximately; (i) is exact.

The two-group case of q̄ (see ``pipeline.stats.bounds.other_class_upper``): the published code uses
1 - p̲ of stage j's own class ĉ_j, which is not a bound on the classes other than ĉ_k; the valid
bound is 1 - p̲ of ĉ_k. Reference mode follows the code; union mode takes the larger of the two,
which is still a valid upper bound (no extra interval needed) and keeps union no more permissive
than reference. When p0 <= 1/2 this case never certifies in either mode: stage j fell through and
the cap's level is at most stage j's own, so p̲_j(ĉ_j) <= p̄_j(ĉ_j) < p0, hence
1 - p̲_j(ĉ_j) > 1 - p0 >= p0 and the cap is negative.

Radius exactly 0: method.md says r <= 0 abstains, the published code abstains only on r < 0. The
reference parquet holds no zero radius, so both modes follow method.md (r <= 0 abstains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy.special import ndtri

from pipeline.stats.bounds import clopper_pearson_lower, clopper_pearson_upper, other_class_upper
from pipeline.errors import UserError

AlphaMode = Literal["union", "reference"]
ALPHA_MODES: tuple[AlphaMode, ...] = ("union", "reference")
Routing = Literal["cascade", "continue", "best"]
ROUTINGS: tuple[Routing, ...] = ("cascade", "continue", "best")


@dataclass(frozen=True)
class CascadeResult:
    """Per-image outcome of certification."""

    prediction: np.ndarray  # int64 (M,), -1 = abstain
    radius: np.ndarray  # float64 (M,), 0.0 when abstaining
    stage: np.ndarray  # int64 (M,), index of the deciding stage; -1 when every stage fell through


def stage_levels(num_scales: int, alpha: float, alpha_mode: AlphaMode) -> np.ndarray:
    """One-sided level per stage, (K,): stage k uses it for its Clopper-Pearson bounds and for the
    caps it computes from earlier stages. Union: alpha / (K(K+1)/2) everywhere; reference: alpha / k
    (k = 1..K). See the module docstring for why."""
    if num_scales < 1:
        raise UserError(f"need at least one scale, got {num_scales}")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if alpha_mode == "union":
        return np.full(num_scales, alpha / (num_scales * (num_scales + 1) / 2))
    if alpha_mode == "reference":
        return alpha / np.arange(1, num_scales + 1, dtype=np.float64)
    raise UserError(f"alpha mode must be one of {', '.join(ALPHA_MODES)}, got {alpha_mode!r}")


def _as_counts(counts: np.ndarray, name: str) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 3:
        raise UserError(f"{name} must have shape (images, scales, classes), got {counts.shape}")
    if not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
        raise UserError(f"{name} must hold non-negative integer vote counts")
    return counts.astype(np.int64, copy=False)


def _check_pair(select_counts: np.ndarray, estimate_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    select = _as_counts(select_counts, "select_counts")
    estimate = _as_counts(estimate_counts, "estimate_counts")
    if select.shape != estimate.shape:
        raise UserError(
            f"select_counts {select.shape} and estimate_counts {estimate.shape} must have the same shape"
        )
    return select, estimate


def _check_p0(p0: float) -> None:
    if not 0.0 < p0 < 1.0:
        raise UserError(f"p0 must lie strictly between 0 and 1, got {p0}")


def _stage_bounds(
    select: np.ndarray, estimate: np.ndarray, level: float, stage_name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ĉ, p̲, p̄ for the images that need this stage; they must have been sampled."""
    n = estimate.sum(axis=1)
    unsampled = (n == 0) | (select.sum(axis=1) == 0)
    if np.any(unsampled):
        raise UserError(
            f"{stage_name} is needed for {int(unsampled.sum())} image(s) that have no selection or "
            "estimation votes there; sample that scale for them first"
        )
    selected = np.argmax(select, axis=1)
    votes = estimate[np.arange(len(selected)), selected]
    return selected, clopper_pearson_lower(votes, n, level), clopper_pearson_upper(votes, n, level)


def _earlier_stage_upper(
    estimate: np.ndarray, chat_k: np.ndarray, chat_j: np.ndarray, level: float, alpha_mode: AlphaMode
) -> np.ndarray:
    """q̄_j with ĉ_k set aside; the two-group fallback class differs by mode (module docstring)."""
    as_published = other_class_upper(estimate, chat_k, level, fallback_class=chat_j)
    if alpha_mode == "reference":
        return as_published
    return np.maximum(as_published, other_class_upper(estimate, chat_k, level, fallback_class=chat_k))


def certify_cascade(
    select_counts: np.ndarray,
    estimate_counts: np.ndarray,
    sigmas: Sequence[float],
    alpha: float,
    alpha_mode: AlphaMode = "union",
    p0: float = 0.5,
) -> CascadeResult:
    """Certify every image with the cascade over ``sigmas`` (strictly decreasing).

    select_counts, estimate_counts: (M, K, C) votes per image, scale (in ``sigmas`` order), class.
    n may differ per image and scale. Stages the cascade never consults for an image may be all
    zeros (early exit left them unsampled); a needed stage without votes raises UserError.
    """
    select, estimate = _check_pair(select_counts, estimate_counts)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) != select.shape[1]:
        raise UserError(f"got {sigmas.size} sigma(s) for counts with {select.shape[1]} scale(s)")
    if np.any(sigmas <= 0) or np.any(np.diff(sigmas) >= 0):
        raise UserError(f"sigmas must be positive and strictly decreasing, got {sigmas.tolist()}")
    _check_p0(p0)
    levels = stage_levels(len(sigmas), alpha, alpha_mode)

    num_images = select.shape[0]
    prediction = np.full(num_images, -1, dtype=np.int64)
    radius = np.zeros(num_images, dtype=np.float64)
    stage = np.full(num_images, -1, dtype=np.int64)
    selected_all = np.argmax(select, axis=2)
    pending = np.ones(num_images, dtype=bool)
    for k, sigma in enumerate(sigmas):
        rows = np.flatnonzero(pending)
        if rows.size == 0:
            break
        selected, lower, upper = _stage_bounds(
            select[rows, k], estimate[rows, k], levels[k], f"scale sigma={sigma:g}"
        )
        certified = lower >= p0
        decided = certified | (upper >= p0)
        stage[rows[decided]] = k
        pending[rows[decided]] = False

        cert_rows, cert_class = rows[certified], selected[certified]
        r = sigma * (ndtri(lower[certified]) - ndtri(p0))
        for j in range(k):
            q = _earlier_stage_upper(
                estimate[cert_rows, j], cert_class, selected_all[cert_rows, j], levels[k], alpha_mode
            )
            r = np.minimum(r, sigmas[j] * (ndtri(p0) - ndtri(q)))
        positive = r > 0
        prediction[cert_rows[positive]] = cert_class[positive]
        radius[cert_rows[positive]] = r[positive]
    return CascadeResult(prediction=prediction, radius=radius, stage=stage)


def undecided_mask(
    select_counts: np.ndarray,
    estimate_counts: np.ndarray,
    num_scales: int,
    alpha: float,
    alpha_mode: AlphaMode = "union",
    p0: float = 0.5,
) -> np.ndarray:
    """(M,) True where the first k stages given, (M, k, C), all fell through, so that stage k+1 must
    be sampled (early exit). Uses the levels ``certify_cascade`` uses with ``num_scales`` scales, so
    an image it marks decided never needs a later stage there."""
    select, estimate = _check_pair(select_counts, estimate_counts)
    if select.shape[1] > num_scales:
        raise UserError(f"got votes for {select.shape[1]} stages of a {num_scales}-scale cascade")
    _check_p0(p0)
    levels = stage_levels(num_scales, alpha, alpha_mode)
    pending = np.ones(select.shape[0], dtype=bool)
    for k in range(select.shape[1]):
        rows = np.flatnonzero(pending)
        _, lower, upper = _stage_bounds(
            select[rows, k], estimate[rows, k], levels[k], f"stage {k + 1} of {num_scales}"
        )
        pending[rows[(lower >= p0) | (upper >= p0)]] = False
    return pending


def needs_next_stage(
    select_counts: np.ndarray,
    estimate_counts: np.ndarray,
    num_scales: int,
    alpha: float,
    alpha_mode: AlphaMode = "union",
    p0: float = 0.5,
    routing: Routing = "cascade",
) -> np.ndarray:
    """(M,) True where an image whose first k stages are given, (M, k, C), must be sampled at stage
    k+1 under `routing`: the one rule the sampling strategies (early exit) and the resume share."""
    if routing == "cascade":
        return undecided_mask(select_counts, estimate_counts, num_scales, alpha, alpha_mode, p0)
    raise UserError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")


def certify_single_scale(
    select_counts: np.ndarray, estimate_counts: np.ndarray, sigma: float, alpha: float, p0: float = 0.5
) -> CascadeResult:
    """Cohen et al. at one scale: (M, C) votes. The one-stage cascade (both alpha modes agree at
    K = 1), so stage is 0 when p̄ >= p0 and -1 when p̄ < p0; either way p̲ < p0 abstains."""
    select = np.asarray(select_counts)
    estimate = np.asarray(estimate_counts)
    if select.ndim != 2 or estimate.ndim != 2:
        raise UserError("single-scale counts must have shape (images, classes)")
    return certify_cascade(select[:, None, :], estimate[:, None, :], [sigma], alpha, "union", p0)
