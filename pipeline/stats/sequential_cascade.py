"""Adaptive sampling for the multi-scale cascade: the stopping rule and the certificate (numpy only).

A fixed-n run spends n samples on every (image, scale) it consults, although most decisions are
clear long before. Here each (image, scale) is sampled in rounds (cumulative estimation sizes
64, 128, 192, 256, 320, 384, 512, … growing ×1.2 up to n_max, in whole noise chunks, so the votes are a prefix of
the fixed-n run's votes; pipeline/sampling/adaptive.py) and `round_status` decides after every round,
from the time-uniform bounds [p̲_t, p̄_t] of pipeline/stats/confidence_sequences.py on the selected
class ĉ and the capped radius r_t (own bound, then the caps of the earlier stages: docs/statistics.md,
"The cascade and its caps"):

- moves on      — p̄_t < p0 (falls through), or the routing sends a finished stage on (below);
- finished      — general mode: r_t > 0 and r_t is within `radius_tolerance` of r̂, the radius the
                  sequence would give at n_max if the vote rates stayed as they are (more samples
                  would add at most about that); or no certificate is within reach by n_max.
                  Target-radius mode (`target_radii` R_1 < … < R_m, the question papers report:
                  "is this image certified at R?"): every R is settled — proven (r_t ≥ R) or out of
                  reach. Within reach means: the capped radius at n_max is > 0 (≥ R), were every
                  stage's remaining votes to come at its current rates moved FUTILITY_STANDARD_ERRORS
                  (1.5) standard errors in the certificate's favour — ĉ's rate up, and every other
                  class's rate at each earlier stage (its cap) down;
- or the stage it would sample next has reached n_max.
An uncertified stage keeps sampling while falling through is still within reach (ĉ's rate moved the
same standard errors down), in every routing: cascade needs it (undecided abstains, so the only way
on is p̄ < p0), and continue and best thereby sample exactly what cascade samples until cascade stops.
Unless falling through leads nowhere: were the image to fall through, every later certificate is
capped by this stage's classes (for whichever ĉ the later stage selects, the runner-up's upper bound
here), so when that cap, with the same allowance, stays below R (or 0 in general mode), the image
stops here instead of sampling on to fall through, and one that falls through stops instead of
moving on (except in best routing, which samples every scale).
An image whose radius is limited by an earlier stage's cap samples that stage further (the binding
term of r_t decides which stage a round goes to), with the standard-error allowance above
deciding when that cap is out of reach: a stage that fell through after a round or two has a cap
from a few dozen votes, and projecting it at its current rates would give up on certificates that
more votes there reach.

Routing (docs/statistics.md, "Routing needs no coverage") — what a finished stage does; the stopping
above is the same for every routing:
- cascade:  stops there (certified or abstains);
- continue: stops if certified, else goes on to the next scale. Until cascade would stop, it samples
            exactly what cascade samples, so on the same votes (counter-seeded noise) it issues every
            certificate cascade issues, with the same radius, and can certify images cascade
            abstains on;
- best:     always goes on: every scale is sampled, the largest certificate speaks. Not a superset
            image by image: a later stage may sample an earlier one again for its cap, which moves
            that stage's own bound (tests/stats/test_sequential.py checks that best certifies at
            least as often as cascade on the same votes).

Target-radius certificates: `radius` is the largest R proven (r_t ≥ R), and an image with none
abstains (prediction −1, radius 0), so the results keep their schema and a certified-accuracy query
at R reads as in a general run.

Radius vs. samples (why general mode cannot save as much as target-radius mode): for ĉ's rate
p < 1 the bound approaches p at rate 1/sqrt(t), so r_t closes in on r̂ quickly; with every vote for
ĉ, 1 − p̲_t ≈ c/t and the radius keeps growing like sigma·sqrt(2 log t) up to n_max, so any rule
that keeps r_t within a fixed tolerance of r̂ must sample confident images for a constant fraction
of n_max. Proving a given R needs only t ≈ c / (1 − Φ(R/sigma)) votes.

Why the certificate stays valid at `alpha` (the rule's per-image level): every bound is a confidence
*sequence*, valid simultaneously at all sample sizes, so it holds at the (data-dependent) stopping
time. The argument of docs/statistics.md ("The α split", "Routing needs no coverage") carries over
with these intervals (union split, T = 2K − 1 of them, each at alpha / T): the K lower sequences
on ĉ_k (ĉ_k comes from the independent selection votes), and for each of the K − 1 scales that can
be an earlier stage, one family of upper sequences on *every* class at level alpha / (T·C)
(Bonferroni over the C classes), from which q̄_j = max over c ≠ ĉ_k is read whatever ĉ_k turns out
to be. On the event that all of them hold, every stage's capped certificate is correct at once, so
which stages were sampled, when each stopped, and which one speaks (any routing, a target radius
rounding the radius down) cannot make a certificate wrong.
The upper sequence on ĉ_k only routes images and needs no coverage; it uses the same level.

The final decision depends only on the stored counts at the stopping time (the bets of the sequence
are fixed, so the bounds are functions of (votes, n)) and on which stages hold votes (the routing
taken): `certify_cascade_sequential` recomputes it from a counts table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from pipeline.config import CascadeRule, CertifyConfig
from pipeline.errors import UserError
from pipeline.stats.cascade import CascadeResult
from pipeline.stats.confidence_sequences import sequence_lower, sequence_upper


def sequential_level(num_scales: int, alpha: float) -> float:
    """One-sided level of each of the T = 2K − 1 intervals (module docstring)."""
    return alpha / (2 * num_scales - 1)


def _radius(sigma: float, lower: np.ndarray, p0: float) -> np.ndarray:
    return sigma * (ndtri(lower) - ndtri(p0))


def _votes_at(votes: np.ndarray, trials: np.ndarray, n_max: int, standard_errors: float) -> np.ndarray:
    """Votes after n_max samples, were the remaining n_max − trials to come at the current rate moved by
    `standard_errors` standard errors (clipped to [0, 1]): what the stopping rule projects. `votes` is
    (M,) or (M, C) with `trials` broadcasting against it."""
    rate = votes / trials
    shifted = rate + standard_errors * np.sqrt(rate * (1.0 - rate) / trials)
    return votes + np.clip(shifted, 0.0, 1.0) * (n_max - trials)


def _cap_terms(estimate: np.ndarray, selected: np.ndarray | None, sigmas: np.ndarray, level: float, p0: float,
               n_max: int | None = None, standard_errors: float = 0.0) -> np.ndarray:
    """(M, j) caps sigma_j (Φ⁻¹(p0) − Φ⁻¹(q̄_j)) of the earlier stages (estimate is (M, j, C)).

    With `n_max`, the cap those stages would give after n_max samples each (`_votes_at`: the remaining
    votes of every class at its current rate moved by `standard_errors` standard errors; a negative
    value moves the other classes down, the cap up): used to judge whether sampling them pays.
    `selected` None stands for a class not selected yet (a later stage's ĉ): the largest cap any choice
    gives, the one without the class of the highest upper bound."""
    terms = np.empty((len(estimate), estimate.shape[1]))
    for j in range(estimate.shape[1]):
        votes = estimate[:, j].astype(np.float64)
        trials = votes.sum(axis=1, keepdims=True)
        if n_max is not None:
            votes, trials = _votes_at(votes, trials, n_max, standard_errors), np.full_like(trials, n_max)
        uppers = sequence_upper(votes, trials, level / votes.shape[1])
        excluded = uppers.argmax(axis=1) if selected is None else selected
        uppers[np.arange(len(uppers)), excluded] = -np.inf
        terms[:, j] = sigmas[j] * (ndtri(p0) - ndtri(uppers.max(axis=1)))
    return terms


@dataclass(frozen=True)
class _Stage:
    """One stage's evidence for some images: ĉ, its votes, bounds, and the radius terms now."""

    selected: np.ndarray
    votes: np.ndarray
    trials: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    terms: np.ndarray  # (M, 1 + k): own radius, then the caps of stages 0..k-1

    @property
    def radius(self) -> np.ndarray:
        return self.terms.min(axis=1)


def _stage(select: np.ndarray, estimate: np.ndarray, k: int, sigmas: np.ndarray, level: float, p0: float) -> _Stage:
    """Evidence at stage k from (M, K, C) counts whose stages 0..k all hold votes."""
    trials = estimate[:, k].sum(axis=1)
    if np.any(trials == 0) or np.any(select[:, k].sum(axis=1) == 0):
        raise UserError(f"scale sigma={sigmas[k]:g} is needed for images that have no votes there")
    selected = select[:, k].argmax(axis=1)
    votes = estimate[np.arange(len(selected)), k, selected]
    lower, upper = sequence_lower(votes, trials, level), sequence_upper(votes, trials, level)
    terms = np.column_stack([_radius(sigmas[k], lower, p0), _cap_terms(estimate[:, :k], selected, sigmas, level, p0)])
    return _Stage(selected, votes, trials, lower, upper, terms)


def certificate_radius(radius: np.ndarray, target_radii: Sequence[float]) -> np.ndarray:
    """The radius a stage certifies (0 = no certificate): the capped radius itself where positive,
    or with target radii (positive, as `CertifyConfig.target_radii`) the largest R it proves (r ≥ R)."""
    radius = np.asarray(radius, dtype=np.float64)
    if len(target_radii) == 0:
        return np.where(radius > 0, radius, 0.0)
    targets = np.asarray(target_radii, dtype=np.float64)
    return np.max(np.where(radius[..., None] >= targets, targets, 0.0), axis=-1, initial=0.0)


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
    rule: CascadeRule,
    target_radii: Sequence[float] = (),
) -> CascadeResult:
    """The cascade (docs/statistics.md, "The cascade and its caps") with confidence-sequence bounds,
    at rule.alpha (split over 2K − 1 intervals as in union mode), rule.p0 and rule.routing: valid at
    any stopping time.

    The routing an adaptive run took is read from which stages hold votes: in cascade and continue
    routing the stages sampled are 0..m and stage m speaks (the earlier ones moved on when the run
    looked at them; sampling them again later for a tighter cap may change their bounds, but the
    routing taken stands, since routing needs no coverage); in best routing every stage is sampled
    and the largest certificate speaks (the earliest on ties). `stage` is the speaking stage, or −1
    where the last stage fell through (cascade, continue) or no stage certifies (best).
    """
    select = np.asarray(select_counts, dtype=np.int64)
    estimate = np.asarray(estimate_counts, dtype=np.int64)
    sigmas = np.asarray(sigmas, dtype=np.float64)
    _check_counts(select, estimate, sigmas)
    if rule.alpha_mode != "union":
        raise UserError(f"the sequential cascade splits alpha as union mode does, got alpha mode "
                        f"{rule.alpha_mode!r}")
    routing, p0 = rule.routing, rule.p0
    level = sequential_level(len(sigmas), rule.alpha)
    num_images, num_scales = select.shape[:2]
    sampled = estimate.sum(axis=2) > 0
    last = num_scales - 1 - np.argmax(sampled[:, ::-1], axis=1)
    if not sampled[:, 0].all() or np.any(sampled.sum(axis=1) != last + 1):
        raise UserError("adaptive counts must hold votes at the first scale and at every scale up to the last "
                        "one an image reached")
    if routing == "best" and not sampled.all():
        raise UserError("best routing samples every scale, but some images have no votes at some scales")
    scores = np.zeros((num_images, num_scales))
    classes = np.full((num_images, num_scales), -1, dtype=np.int64)
    fell_through = np.zeros(num_images, dtype=bool)
    for k in range(num_scales):
        rows = np.flatnonzero(sampled[:, k])
        if rows.size == 0:
            continue
        evidence = _stage(select[rows], estimate[rows], k, sigmas, level, p0)
        scores[rows, k] = certificate_radius(evidence.radius, target_radii)
        classes[rows, k] = evidence.selected
        if k == num_scales - 1:
            fell_through[rows] = evidence.upper < p0
    speaking = scores.argmax(axis=1) if routing == "best" else last
    rows = np.arange(num_images)
    radius = scores[rows, speaking]
    certified = radius > 0
    if routing == "best":
        stage = np.where(certified, speaking, -1)
    else:
        stage = np.where(fell_through & ~certified, -1, speaking)
    return CascadeResult(prediction=np.where(certified, classes[rows, speaking], -1), radius=radius, stage=stage)


CONTINUE, DONE, NEXT = 0, 1, 2

FUTILITY_STANDARD_ERRORS = 1.5
"""Futility (giving up on a certificate or a radius that n_max would not reach) assumes the remaining
votes come at the current rates moved this many standard errors in the certificate's favour: ĉ's
rate up, the other classes' rates at the earlier stages (the caps) down; the test whether a stage
can still fall through moves ĉ's rate down. It decides only when sampling stops, so it costs power,
never validity. Why not p̄_t: an image whose radius at n_max would land just below R (those near R
are the costly ones) would then sample to n_max in vain, since p̄_t at level alpha/T stays far above
the rate for thousands of samples (first 10 digits test images, target radius 0.5: 7.8× fewer forward
passes than fixed n = 10,000 with p̄_t, 25× with one standard error, same certificates). Why 1.5 and
not 1: the check runs after every round, so an image whose rate is just above what R needs is given up
whenever one look falls a standard error short (a 16 % chance per look); with one standard error two
images per target radius were lost against fixed n on the first 100 digits test images, and with 1.5
one, for 8–45 % more forward passes; on the 100 held-out images after them both certify the same images
(docs/adaptive.md)."""


STOPPING_RULES = (f"futility at {FUTILITY_STANDARD_ERRORS:g} standard errors; an image stops where falling "
                  f"through leads nowhere")
"""What an adaptive run's counts depend on beyond its configuration: the stopping rules of this module.
Recorded with the run's settings (pipeline/app/certify.py), so that `--resume` refuses to finish, under
other rules, a run whose first shards were sampled under these (its counts would then depend on the
resume). Say here what changed whenever the rules change."""


def _radii_at_n_max(now: _Stage, earlier: np.ndarray, sigmas: np.ndarray, stage: int, level: float, p0: float,
                    n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(projected, optimistic): the capped radius were every stage sampled to n_max.

    projected (how much more samples would add): ĉ at its Krichevsky-Trofimov rate
    (votes + 1/2) / (n + 1), so that unanimous votes do not project a classifier that never errs, whose
    radius would keep growing to n_max; the earlier stages' classes at their current rates.
    optimistic (whether a certificate or R is still within reach): every rate moved
    FUTILITY_STANDARD_ERRORS standard errors in the certificate's favour — ĉ's up, and each other
    class's at every earlier stage down. Why the caps get the allowance too: a stage that fell through
    after a round or two has a cap from a few dozen votes; projecting that cap at its current rates gives
    up on images whose cap would clear with more samples there."""
    own = _radius(sigmas[stage], sequence_lower((now.votes + 0.5) / (now.trials + 1) * n_max, n_max, level), p0)
    caps = _cap_terms(earlier, now.selected, sigmas, level, p0, n_max).min(axis=1, initial=np.inf)
    best_own = _radius(sigmas[stage], sequence_lower(
        _votes_at(now.votes, now.trials, n_max, FUTILITY_STANDARD_ERRORS), n_max, level), p0)
    best_caps = _cap_terms(earlier, now.selected, sigmas, level, p0, n_max,
                           -FUTILITY_STANDARD_ERRORS).min(axis=1, initial=np.inf)
    return np.minimum(own, caps), np.minimum(best_own, best_caps)


def _reach_below(estimate: np.ndarray, sigmas: np.ndarray, stage: int, level: float, p0: float,
                 n_max: int) -> np.ndarray:
    """The largest radius a later stage could still certify were the image to fall through from `stage`
    (estimate is (M, K, C)): every vote for its ĉ at σ_{stage+1}, the largest scale below, capped by
    stages 0..stage for the ĉ with the largest caps, every class's rate moved FUTILITY_STANDARD_ERRORS
    standard errors in the certificate's favour (−inf at the last stage). Why: an image whose classes
    are split (ĉ near p0 and a runner-up close behind) may fall through, but the runner-up's upper
    bound here caps every later certificate near 0; sampling on to learn whether it falls through then
    buys nothing."""
    if stage == len(sigmas) - 1:
        return np.full(len(estimate), -np.inf)
    own = _radius(sigmas[stage + 1], sequence_lower(n_max, n_max, level), p0)
    caps = _cap_terms(estimate[:, :stage + 1], None, sigmas, level, p0, n_max, -FUTILITY_STANDARD_ERRORS)
    return np.minimum(own, caps.min(axis=1))


def round_status(
    select: np.ndarray, estimate: np.ndarray, stage: int, config: CertifyConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(status, stage to sample next) for images deciding at `stage`; select/estimate are (M, K, C).
    The config gives the sigmas, n_max (config.n), the per-image level (config.rule.alpha), p0, the
    routing, radius_tolerance and target_radii.

    CONTINUE: sample the returned stage one more round; DONE: the image is finished; NEXT: go on to
    stage + 1 (the caller finishes the image at the last stage). Whether the stage is finished does
    not depend on the routing; the routing only picks DONE or NEXT for a finished stage. An image
    whose radius is limited by an earlier stage's cap samples that stage next: the caps' sequences
    are time-uniform too, so sampling a stage again later is as valid as sampling it longer at once.
    """
    sigmas = np.asarray(config.sigmas, dtype=np.float64)
    level = sequential_level(len(sigmas), config.rule.alpha)
    p0, n_max, routing = config.p0, config.n, config.routing
    now = _stage(select, estimate, stage, sigmas, level, p0)
    projected, optimistic = _radii_at_n_max(now, estimate[:, :stage], sigmas, stage, level, p0, n_max)
    binding = now.terms.argmin(axis=1)  # 0 = this stage's own bound, j + 1 = the cap of stage j
    sample = np.where(binding > 0, binding - 1, stage)
    exhausted = estimate[np.arange(len(sample)), sample].sum(axis=1) >= n_max
    below = _reach_below(estimate, sigmas, stage, level, p0, n_max)
    if config.target_radii:
        targets = np.asarray(config.target_radii)
        proven = now.radius[:, None] >= targets
        certified = proven.any(axis=1)
        finished = np.all(proven | (optimistic[:, None] < targets), axis=1)
        nothing_below = below < targets.min()
    else:
        certified = now.radius > 0
        finished = np.where(certified, now.radius >= projected - config.radius_tolerance, optimistic <= 0)
        nothing_below = below <= 0
    falls_through = now.upper < p0
    can_fall = sequence_upper(_votes_at(now.votes, now.trials, n_max, -FUTILITY_STANDARD_ERRORS), n_max,
                              level) < p0
    finished &= certified | ~can_fall | nothing_below
    finished |= exhausted
    if routing == "cascade":
        on_finish = np.full(len(sample), DONE)
    elif routing == "continue":
        on_finish = np.where(certified | nothing_below, DONE, NEXT)
    else:
        on_finish = np.full(len(sample), NEXT)
    # Falling through leads nowhere when no later scale can reach a certificate (best must still sample them).
    moves_on = np.where(nothing_below & (routing != "best"), DONE, NEXT)
    status = np.where(falls_through, moves_on, np.where(finished, on_finish, CONTINUE))
    return status, sample
