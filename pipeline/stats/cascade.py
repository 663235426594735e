"""The multi-scale certification cascade and single-scale certification (docs/statistics.md: "One
scale (Cohen et al.)", "The cascade and its caps", "The α split", "Routing needs no coverage").

Every function takes the run's `pipeline.config.CascadeRule` (per-image alpha, alpha mode, p0,
routing), validated when it was built; this module validates only the counts.

Scales are ordered from the highest sigma. At stage k the Clopper-Pearson bounds [p̲_k, p̄_k] on the
selected class ĉ_k (from the selection votes) are computed from the estimation votes. A certificate
at stage k has radius
    r_k = min(sigma_k (Φ⁻¹(p̲_k) - Φ⁻¹(p0)), min_{j<k} sigma_j (Φ⁻¹(p0) - Φ⁻¹(q̄_j)))
where q̄_j bounds every class but ĉ_k at stage j; r_k <= 0 issues nothing.

Why a certificate is correct
----------------------------
The population cascade G outputs, at the first stage where some class has probability > p0, that
class. With p0 >= 1/2 at most one class can exceed p0, so G is well defined, and Φ⁻¹ of each
class probability is 1/sigma-Lipschitz in the input. Hence, if (i) p̲_k is below the true probability
of ĉ_k at stage k and (ii) for every j < k, q̄_j is above the true probability of every class other
than ĉ_k at stage j, then on the open ball of radius r_k no class but ĉ_k exceeds p0 at any stage
j < k, and ĉ_k exceeds p0 at stage k: G outputs ĉ_k on the whole ball. This holds for every stage k
whose lower bound clears p0, whether or not that stage was the one to speak.

Union mode: exact caps, 2K-1 intervals (``alpha_mode="union"``)
---------------------------------------------------------------
q̄_j is read from one exact family per stage j: the Clopper-Pearson upper bound of every class's
share of stage j's estimation votes at level a/C (Bonferroni over the C classes,
``pipeline.stats.bounds.class_upper_family``), maximized over the classes != ĉ_k. The family does not
depend on k, so it serves every later stage. The intervals any certificate can use are the K lower
bounds and the families of stages 1..K-1: T = 2K-1 intervals, each at a = alpha / T. Let E be the
event that all T hold; by the union bound P(E) >= 1 - alpha. ĉ_k comes from the selection votes,
which are independent of the estimation votes, so each interval keeps its level given ĉ_k.

Routing needs no coverage
-------------------------
On E, (i) and (ii) hold for every k at once, so every capped certificate with r_k > 0 is correct
simultaneously. Which stages are sampled and which one speaks may therefore depend on the data in
any way; ``rule.routing`` picks it (union mode only):

- ``"cascade"``: as published. p̲_k >= p0 speaks (certifies, or abstains when r_k <= 0),
  p̄_k >= p0 > p̲_k abstains (undecided), p̄_k < p0 falls through; after stage K, abstain.
- ``"continue"``: a stage that issues no certificate (undecided, fall-through, or r_k <= 0) passes
  the image on; the first positive r_k is issued. It issues every certificate ``"cascade"`` issues,
  with the same radius, and more.
- ``"best"``: every stage is sampled and the largest positive r_k is issued.

The upper bounds p̄_k only route, need no coverage, and use the level a as well.

Reference mode (``alpha_mode="reference"``)
-------------------------------------------
Reproduces the published code: stage k (1-based) uses alpha / k for its bounds and for the Goodman
caps it computes from every earlier stage, and routes as ``"cascade"``. There is no event like E
(its levels do not sum to alpha, and Goodman is a chi-square approximation with data-dependent
pooling), so it carries no guarantee: tests/stats/test_coverage.py exhibits an input where its
certificate is wrong with probability above alpha. In the two-group case of its Goodman cap
(``pipeline.stats.bounds.other_class_upper``) it follows the published code and bounds the other
classes by 1 - p̲ of stage j's own class ĉ_j.

What is guaranteed (docs/statistics.md, "What exactly is guaranteed")
---------------------------------------------------------------------
Per image: in union mode its certificate is wrong with probability at most alpha over that image's
Monte-Carlo noise. Images draw independent noise, so a run of M images has at most alpha·M wrong
certificates in expectation; all of them hold jointly with probability >= 1 - alpha only when each
image is run at alpha / M (a family-wise run: its rule's alpha is already alpha / M).

Radius exactly 0: the certificate's definition abstains on r <= 0, the published code only on
r < 0. The reference parquet holds no zero radius, so both modes abstain on r <= 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy.special import ndtri

from pipeline.config import AlphaMode, CascadeRule
from pipeline.errors import UserError
from pipeline.stats.bounds import (
    class_upper_family,
    clopper_pearson_lower,
    clopper_pearson_upper,
    largest_other_upper,
    other_class_upper,
)


@dataclass(frozen=True)
class CascadeResult:
    """Per-image outcome of certification."""

    prediction: np.ndarray  # int64 (M,), -1 = abstain
    radius: np.ndarray  # float64 (M,), 0.0 when abstaining
    stage: np.ndarray  # int64 (M,), index of the stage that spoke (certificate, or cascade abstention); -1 if none


def stage_levels(num_scales: int, rule: CascadeRule) -> np.ndarray:
    """One-sided level per stage, (K,). Union: a = alpha / (2K - 1) everywhere, for the lower bound,
    the routing upper bound and the exact cap family of every stage (2K - 1 intervals can be used);
    reference: alpha / k at stage k (k = 1..K) for its bounds and for the caps it computes. See the
    module docstring for why."""
    if num_scales < 1:
        raise UserError(f"need at least one scale, got {num_scales}")
    if rule.alpha_mode == "union":
        return np.full(num_scales, rule.alpha / (2 * num_scales - 1))
    return rule.alpha / np.arange(1, num_scales + 1, dtype=np.float64)


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


def _cap_upper(
    estimate: np.ndarray, chat_k: np.ndarray, chat_j: np.ndarray, level: float, alpha_mode: AlphaMode
) -> np.ndarray:
    """q̄_j with ĉ_k set aside: the exact per-class family (union) or Goodman as published (reference)."""
    if alpha_mode == "union":
        return largest_other_upper(class_upper_family(estimate, level), chat_k)
    return other_class_upper(estimate, chat_k, level, fallback_class=chat_j)


def _capped_radius(
    estimate: np.ndarray, selected_all: np.ndarray, rows: np.ndarray, k: int, chat: np.ndarray,
    lower: np.ndarray, sigmas: np.ndarray, level: float, rule: CascadeRule,
) -> np.ndarray:
    """r_k of `rows` (whose p̲_k >= p0), capped by every earlier stage, whatever that stage decided."""
    r = sigmas[k] * (ndtri(lower) - ndtri(rule.p0))
    for j in range(k):
        q = _cap_upper(estimate[rows, j], chat, selected_all[rows, j], level, rule.alpha_mode)
        r = np.minimum(r, sigmas[j] * (ndtri(rule.p0) - ndtri(q)))
    return r


def _route(
    select: np.ndarray, estimate: np.ndarray, sigmas: np.ndarray, levels: np.ndarray, rule: CascadeRule,
    stage_names: Sequence[str],
) -> tuple[CascadeResult, np.ndarray]:
    """Walk the stages given under `rule.routing`: the certificates so far and (M,) whether an image
    goes on to the next stage. The one implementation behind certify_cascade and needs_next_stage.

    Whether r_k > 0 does not depend on the sigmas (they scale every term of the min by a positive
    factor), so the routing of a prefix of stages needs only the number of scales (for the levels).
    """
    num_images = select.shape[0]
    prediction = np.full(num_images, -1, dtype=np.int64)
    radius = np.zeros(num_images, dtype=np.float64)
    stage = np.full(num_images, -1, dtype=np.int64)
    selected_all = np.argmax(select, axis=2)
    pending = np.ones(num_images, dtype=bool)
    for k in range(select.shape[1]):
        rows = np.flatnonzero(pending)
        if rows.size == 0:
            break
        selected, lower, upper = _stage_bounds(select[rows, k], estimate[rows, k], levels[k], stage_names[k])
        clears = lower >= rule.p0
        r = np.zeros(rows.size)
        r[clears] = _capped_radius(estimate, selected_all, rows[clears], k, selected[clears], lower[clears],
                                   sigmas, levels[k], rule)
        issue = (r > 0) & (r > radius[rows])  # radius[rows] is 0 except under "best"
        prediction[rows[issue]], radius[rows[issue]], stage[rows[issue]] = selected[issue], r[issue], k
        if rule.routing == "cascade":
            speaks = clears | (upper >= rule.p0)
            stage[rows[speaks]] = k
            pending[rows[speaks]] = False
        elif rule.routing == "continue":
            pending[rows[issue]] = False
    return CascadeResult(prediction=prediction, radius=radius, stage=stage), pending


def certify_cascade(
    select_counts: np.ndarray, estimate_counts: np.ndarray, sigmas: Sequence[float], rule: CascadeRule
) -> CascadeResult:
    """Certify every image with the cascade over ``sigmas`` (strictly decreasing) under ``rule``.

    select_counts, estimate_counts: (M, K, C) votes per image, scale (in ``sigmas`` order), class.
    n may differ per image and scale. Stages the routing never consults for an image may be all
    zeros (early exit with the same routing left them unsampled); a needed stage without votes
    raises UserError. Union mode: each image's certificate is wrong with probability <= rule.alpha,
    for every routing (module docstring). ``stage`` is the stage that spoke: the certifying one, under
    "cascade" also the one that abstained (undecided, or r <= 0); -1 when none did.
    """
    select, estimate = _check_pair(select_counts, estimate_counts)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if sigmas.ndim != 1 or len(sigmas) != select.shape[1]:
        raise UserError(f"got {sigmas.size} sigma(s) for counts with {select.shape[1]} scale(s)")
    if np.any(sigmas <= 0) or np.any(np.diff(sigmas) >= 0):
        raise UserError(f"sigmas must be positive and strictly decreasing, got {sigmas.tolist()}")
    names = [f"scale sigma={sigma:g}" for sigma in sigmas]
    return _route(select, estimate, sigmas, stage_levels(len(sigmas), rule), rule, names)[0]


def needs_next_stage(
    select_counts: np.ndarray, estimate_counts: np.ndarray, num_scales: int, rule: CascadeRule
) -> np.ndarray:
    """(M,) True where an image whose first k stages are given, (M, k, C), must be sampled at stage
    k+1 under `rule.routing`: the one rule the sampling strategies (early exit) and the resume share.

    cascade: every stage so far fell through; continue: no stage so far issued a certificate with
    positive capped radius; best: always. Uses the levels ``certify_cascade`` uses with
    ``num_scales`` scales, so an image it stops never needs a later stage there.
    """
    select, estimate = _check_pair(select_counts, estimate_counts)
    if select.shape[1] > num_scales:
        raise UserError(f"got votes for {select.shape[1]} stages of a {num_scales}-scale cascade")
    levels = stage_levels(num_scales, rule)
    names = [f"stage {k + 1} of {num_scales}" for k in range(num_scales)]
    ones = np.ones(num_scales)  # r > 0 does not depend on the sigmas (_route)
    return _route(select, estimate, ones, levels, rule, names)[1]


def undecided_mask(
    select_counts: np.ndarray, estimate_counts: np.ndarray, num_scales: int, rule: CascadeRule
) -> np.ndarray:
    """(M,) True where the first k stages given, (M, k, C), all fell through: ``needs_next_stage``
    under the published "cascade" routing, whatever ``rule.routing`` says."""
    return needs_next_stage(select_counts, estimate_counts, num_scales, replace(rule, routing="cascade"))


def needed_stages(
    select_counts: np.ndarray, estimate_counts: np.ndarray, present: np.ndarray, rule: CascadeRule
) -> np.ndarray:
    """(M, K) True where `rule.routing` needs stage k of an image, as far as the stages present (M, K)
    tell: a stage after one that is needed but absent is unknown and left False. Reduce and certify
    report images needing an absent stage instead of certifying the others alone; on all-scales
    counts the row sums are the scales early exit would sample."""
    select, estimate = _check_pair(select_counts, estimate_counts)
    num_scales = select.shape[1]
    needed = np.zeros(select.shape[:2], dtype=bool)
    needed[:, 0] = True
    for k in range(1, num_scales):
        rows = np.flatnonzero(needed[:, k - 1] & present[:, k - 1])
        needed[rows, k] = needs_next_stage(select[rows, :k], estimate[rows, :k], num_scales, rule)
    return needed


def certify_single_scale(
    select_counts: np.ndarray, estimate_counts: np.ndarray, sigma: float, rule: CascadeRule
) -> CascadeResult:
    """Cohen et al. at one scale: (M, C) votes, at rule.alpha and rule.p0. The one-stage cascade in
    union mode (both alpha modes agree at K = 1, and with one stage every routing is the same), so
    stage is 0 when p̄ >= p0 and -1 when p̄ < p0; either way p̲ < p0 abstains."""
    select = np.asarray(select_counts)
    estimate = np.asarray(estimate_counts)
    if select.ndim != 2 or estimate.ndim != 2:
        raise UserError("single-scale counts must have shape (images, classes)")
    one_stage = CascadeRule(rule.alpha, "union", rule.p0, "cascade")
    return certify_cascade(select[:, None, :], estimate[:, None, :], [sigma], one_stage)
