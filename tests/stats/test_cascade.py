"""Every branch of the cascade on hand-made counts, and the vectorized cascade against a
per-image transcription of the published loop (statsmodels bounds) on random counts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import multinomial_proportions_confint, proportion_confint

from pipeline.config import CascadeRule
from pipeline.stats.cascade import (
    certify_cascade,
    certify_single_scale,
    needed_stages,
    needs_next_stage,
    stage_levels,
    undecided_mask,
)
from pipeline.errors import UserError

SIGMAS = (1.0, 0.5, 0.25)
ALPHA = 0.001


def cp(votes: int, n: int, level: float) -> tuple[float, float]:
    return proportion_confint(votes, n, alpha=2 * level, method="beta")


def reduce_counts(counts: np.ndarray, c: int) -> list[int]:
    """The published ``_reduce_counts``, transcribed for one image."""
    counts = counts.copy()
    r_counts, reg = [counts[c]], 0
    counts[c] = 0
    for ci in np.argsort(counts)[::-1]:
        if counts[ci] >= 5:
            r_counts.append(counts[ci])
        else:
            reg += counts[ci]
            if reg >= 5:
                r_counts.append(reg)
                reg = 0
    if reg > 0:
        r_counts[-1] += reg
    return r_counts


def off_class_upper(estimate: np.ndarray, own_class: int, level: float, c: int) -> float:
    """The published ``off_class_upper_radius`` before the sigma·Φ⁻¹ step: q̄ of one stage."""
    groups = reduce_counts(estimate, c)
    if len(groups) <= 2:
        return 1.0 - cp(estimate[own_class], estimate.sum(), level)[0]
    return multinomial_proportions_confint(groups, alpha=2 * level)[1:, 1].max()


def exact_cap_upper(estimate: np.ndarray, level: float, c: int) -> float:
    """Union mode's q̄ of one stage: Clopper-Pearson upper bounds on every class at level / C, max over
    the classes other than c."""
    uppers = [cp(votes, estimate.sum(), level / len(estimate))[1] for votes in estimate]
    return max(u for i, u in enumerate(uppers) if i != c)


def stage_certificate(sigmas, k: int, low: float, chat: int, earlier, level: float, mode: str, p0: float) -> float:
    """The capped radius r_k of a stage whose p̲ clears p0 (docs/statistics.md, "The cascade and its caps")."""
    radius = sigmas[k] * (norm.ppf(low) - norm.ppf(p0))
    for sigma_j, estimate_j, chat_j in earlier:
        if mode == "reference":
            q = off_class_upper(estimate_j, chat_j, level, chat)
        else:
            q = exact_cap_upper(estimate_j, level, chat)
        radius = min(radius, sigma_j * (norm.ppf(p0) - norm.ppf(q)))
    return radius


def cascade_one_image(
    select: np.ndarray, estimate: np.ndarray, sigmas, alpha: float, mode: str, p0: float = 0.5,
    routing: str = "cascade",
):
    """The published certify loop for one image (reference mode: alpha/k, Goodman caps), and union
    mode's (alpha/(2K-1), exact per-class caps) under each routing. r <= 0 issues nothing."""
    num_scales = len(sigmas)
    earlier, best = [], (-1, 0.0, -1)
    for k in range(num_scales):
        level = alpha / (k + 1) if mode == "reference" else alpha / (2 * num_scales - 1)
        chat = int(np.argmax(select[k]))
        low, high = cp(estimate[k][chat], estimate[k].sum(), level)
        radius = stage_certificate(sigmas, k, low, chat, earlier, level, mode, p0) if low >= p0 else 0.0
        if radius > best[1]:
            best = (chat, radius, k)
        if routing == "cascade" and (low >= p0 or high >= p0):
            return best if radius > 0 else (-1, 0.0, k)
        if routing == "continue" and radius > 0:
            return best
        earlier.append((sigmas[k], estimate[k], chat))
    return best


def single_image(select: list[list[int]], estimate: list[list[int]], mode: str = "reference", p0: float = 0.5):
    result = certify_cascade(np.array([select]), np.array([estimate]), SIGMAS, CascadeRule(ALPHA, mode, p0))
    return int(result.prediction[0]), float(result.radius[0]), int(result.stage[0])


ZERO = [0, 0, 0, 0]


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_certifies_at_the_first_stage_with_cohens_radius(mode: str) -> None:
    prediction, radius, stage = single_image([[2, 95, 3, 0], ZERO, ZERO], [[10, 960, 30, 0], ZERO, ZERO], mode)
    level = stage_levels(3, CascadeRule(ALPHA, mode))[0]
    assert (prediction, stage) == (1, 0)
    assert radius == pytest.approx(1.0 * norm.ppf(cp(960, 1000, level)[0]), rel=1e-12)


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_undecided_first_stage_abstains_without_consulting_later_ones(mode: str) -> None:
    # Later stages are unsampled: they must not be needed.
    assert single_image([[50, 50, 0, 0], ZERO, ZERO], [[500, 500, 0, 0], ZERO, ZERO], mode) == (-1, 0.0, 0)


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_certifies_at_a_later_stage_when_the_cap_does_not_bind(mode: str) -> None:
    # Stage 1 is spread over four classes (every p̄ < 1/2): falls through, caps are loose.
    select = [[30, 30, 20, 20], [0, 0, 100, 0], ZERO]
    estimate = [[250, 250, 250, 250], [60, 60, 800, 80], ZERO]
    prediction, radius, stage = single_image(select, estimate, mode)
    level = stage_levels(3, CascadeRule(ALPHA, mode))[1]
    own = 0.5 * norm.ppf(cp(800, 1000, level)[0])
    cap = 1.0 * -norm.ppf(multinomial_proportions_confint([250, 250, 250, 250], alpha=2 * level)[1:, 1].max())
    assert (prediction, stage) == (2, 1)
    assert own < cap and radius == pytest.approx(own, rel=1e-12)


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_cap_from_an_earlier_stage_binds(mode: str) -> None:
    # Stage 2 is very sure of class 1, but stage 1 gives class 0 a share near 1/2.
    select = [[40, 30, 30, 0], [0, 100, 0, 0], ZERO]
    estimate = [[4500, 3000, 2500, 0], [0, 10000, 0, 0], ZERO]
    prediction, radius, stage = single_image(select, estimate, mode)
    level = stage_levels(3, CascadeRule(ALPHA, mode))[1]
    own = 0.5 * norm.ppf(cp(10000, 10000, level)[0])
    if mode == "reference":  # Goodman over the groups other than class 1
        q = multinomial_proportions_confint([3000, 4500, 2500], alpha=2 * level)[1:, 1].max()
    else:  # the exact family: class 0's Clopper-Pearson upper bound at level / 4 is the largest
        q = cp(4500, 10000, level / 4)[1]
    cap = 1.0 * -norm.ppf(q)
    assert (prediction, stage) == (1, 1)
    assert cap < own and radius == pytest.approx(cap, rel=1e-12)


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_negative_cap_abstains_at_the_certifying_stage(mode: str) -> None:
    # Stage 1 selected class 2, whose p̄ < 1/2 lets it fall through, but class 0 has 49% of the
    # stage-1 votes: its Goodman bound exceeds 1/2, so the cap on stage 2's class 1 is negative.
    select = [[0, 0, 100, 0], [0, 100, 0, 0], ZERO]
    estimate = [[4900, 300, 4800, 0], [0, 10000, 0, 0], ZERO]
    level = stage_levels(3, CascadeRule(ALPHA, mode))
    assert cp(4800, 10000, level[0])[1] < 0.5
    assert multinomial_proportions_confint([300, 4900, 4800], alpha=2 * level[1])[1:, 1].max() > 0.5
    assert single_image(select, estimate, mode) == (-1, 0.0, 1)


def test_two_group_cap_uses_the_published_fallback_class_in_reference_mode_only() -> None:
    # Stage 1 selected class 0 although class 1 holds 97.8% of its votes; pooling leaves two groups
    # [978, 22] once class 1 (certified at stage 2) is set aside. The published code bounds the
    # others by 1 - p̲(ĉ_1 = class 0) ≈ 0.99: negative cap, abstain. Union mode's exact family
    # bounds class 0 (20 votes) by about 4.3%: a positive cap, so it certifies class 1.
    select = [[60, 40, 0, 0], [0, 100, 0, 0], ZERO]
    estimate = [[20, 978, 2, 0], [0, 1000, 0, 0], ZERO]
    assert reduce_counts(np.array(estimate[0]), 1) == [978, 22]
    assert single_image(select, estimate, "reference") == (-1, 0.0, 1)
    prediction, radius, stage = single_image(select, estimate, "union")
    level = stage_levels(3, CascadeRule(ALPHA, "union"))[1]
    own = 0.5 * norm.ppf(cp(1000, 1000, level)[0])
    cap = -norm.ppf(exact_cap_upper(np.array(estimate[0]), level, 1))
    assert (prediction, stage) == (1, 1) and radius == pytest.approx(min(own, cap), rel=1e-12)


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_zero_radius_abstains(mode: str) -> None:
    # Choose p0 equal to p̲ itself, so r = sigma (Φ⁻¹(p̲) - Φ⁻¹(p0)) is exactly 0: the certificate abstains.
    level = stage_levels(3, CascadeRule(ALPHA, mode))[0]
    p0 = cp(800, 1000, level)[0]
    select = [[0, 100, 0, 0], ZERO, ZERO]
    assert single_image(select, [[0, 800, 200, 0], ZERO, ZERO], mode, p0=p0) == (-1, 0.0, 0)
    prediction, radius, _ = single_image(select, [[0, 801, 199, 0], ZERO, ZERO], mode, p0=p0)
    assert prediction == 1 and radius > 0


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_falls_through_every_stage(mode: str) -> None:
    spread = [[300, 280, 220, 200]] * 3
    assert single_image([[30, 30, 20, 20]] * 3, spread, mode) == (-1, 0.0, -1)


def test_stage_levels_split_alpha_as_documented() -> None:
    np.testing.assert_allclose(stage_levels(3, CascadeRule(0.005, "union")), [0.001, 0.001, 0.001])
    np.testing.assert_allclose(stage_levels(3, CascadeRule(0.006, "reference")), [0.006, 0.003, 0.002])
    np.testing.assert_allclose(stage_levels(1, CascadeRule(0.01, "union")), [0.01])
    # Union: K lower bounds + K-1 exact cap families, each at the same level, sum to alpha.
    for k in range(1, 6):
        assert stage_levels(k, CascadeRule(0.01, "union"))[0] * (2 * k - 1) == pytest.approx(0.01)


def random_counts(rng: np.random.Generator, images: int, num_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Counts that hit every branch: concentrated, spread, and with many small classes."""
    shape = (images, len(SIGMAS))
    concentration = rng.choice([0.05, 0.3, 1.0, 5.0], size=shape)[..., None]
    probabilities = rng.dirichlet(np.ones(num_classes), size=shape) ** (1 / concentration)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    n = rng.choice([30, 100, 1000], size=shape)
    select = rng.multinomial(100, probabilities)
    estimate = rng.multinomial(n, probabilities)
    return select, estimate


@pytest.mark.parametrize("mode, routing", [("union", "cascade"), ("union", "continue"), ("union", "best"),
                                           ("reference", "cascade")])
def test_matches_the_per_image_transcription_on_random_counts(mode: str, routing: str) -> None:
    rng = np.random.default_rng(5)
    select, estimate = random_counts(rng, 600)
    alpha = 0.05
    result = certify_cascade(select, estimate, SIGMAS, CascadeRule(alpha, mode, routing=routing))
    stages_seen = set()
    for m in range(len(select)):
        prediction, radius, stage = cascade_one_image(select[m], estimate[m], SIGMAS, alpha, mode, routing=routing)
        assert result.prediction[m] == prediction and result.stage[m] == stage
        assert result.radius[m] == pytest.approx(radius, rel=1e-9, abs=1e-12)
        stages_seen.add((stage, prediction >= 0))
    expected = {(0, True), (1, True), (2, True), (-1, False)}
    if routing == "cascade":
        expected |= {(0, False), (1, False), (2, False)}
    assert stages_seen >= expected


def test_union_and_reference_take_the_same_path_and_reference_radii_are_larger_before_caps() -> None:
    """With cascade routing, a union certificate is issued where reference mode's (wider-level) bounds
    decide at the same stage with the same class; at the first stage (no caps) the reference radius
    is at least as large. Exact caps may bind more or less than Goodman, so later stages may differ."""
    rng = np.random.default_rng(6)
    select, estimate = random_counts(rng, 3000)
    union = certify_cascade(select, estimate, SIGMAS, CascadeRule(0.01, "union"))
    reference = certify_cascade(select, estimate, SIGMAS, CascadeRule(0.01, "reference"))
    certified = union.prediction >= 0
    assert certified.sum() > 500
    assert np.array_equal(reference.stage[certified], union.stage[certified])
    both = certified & (reference.prediction >= 0)
    assert np.array_equal(reference.prediction[both], union.prediction[both])
    first = certified & (union.stage == 0)
    assert first.sum() > 100 and np.all(union.radius[first] <= reference.radius[first])


def test_continue_issues_every_cascade_certificate_with_the_same_radius_and_best_the_largest() -> None:
    rng = np.random.default_rng(8)
    select, estimate = random_counts(rng, 3000)
    results = {r: certify_cascade(select, estimate, SIGMAS, CascadeRule(0.01, routing=r))
               for r in ("cascade", "continue", "best")}
    cascade, cont, best = results["cascade"], results["continue"], results["best"]
    issued = cascade.prediction >= 0
    np.testing.assert_array_equal(cont.prediction[issued], cascade.prediction[issued])
    np.testing.assert_array_equal(cont.radius[issued], cascade.radius[issued])
    assert (cont.prediction >= 0).sum() > issued.sum()
    assert np.all((best.prediction >= 0) == (cont.prediction >= 0))  # some stage issues ⇔ best issues
    assert np.all(best.radius >= cont.radius) and np.any(best.radius > cont.radius)


@pytest.mark.parametrize("routing", ["cascade", "continue", "best"])
def test_early_exit_counts_give_the_all_scales_certificates(routing: str) -> None:
    """Sampling stage k+1 only where needs_next_stage says so, and zeroing the rest, changes nothing."""
    rng = np.random.default_rng(9)
    select, estimate = random_counts(rng, 2000)
    rule = CascadeRule(0.01, routing=routing)
    sampled = np.ones(select.shape[:2], dtype=bool)
    for k in range(1, len(SIGMAS)):
        rows = np.flatnonzero(sampled[:, k - 1])
        sampled[:, k] = False
        sampled[rows, k] = needs_next_stage(select[rows, :k], estimate[rows, :k], 3, rule)
    early_select, early_estimate = select * sampled[..., None], estimate * sampled[..., None]
    assert sampled.all() if routing == "best" else (~sampled).sum() > 500
    full = certify_cascade(select, estimate, SIGMAS, rule)
    early = certify_cascade(early_select, early_estimate, SIGMAS, rule)
    for field in ("prediction", "radius", "stage"):
        np.testing.assert_array_equal(getattr(early, field), getattr(full, field))
    np.testing.assert_array_equal(needed_stages(select, estimate, np.ones_like(sampled), rule),
                                  sampled)  # what early exit samples, read off all-scales counts
    needed = needed_stages(early_select, early_estimate, sampled, rule)
    assert not (needed & ~sampled).any()
    if routing != "best":
        needed_by_best = needed_stages(early_select, early_estimate, sampled, CascadeRule(0.01, routing="best"))
        np.testing.assert_array_equal((needed_by_best & ~sampled).any(axis=1), ~sampled.all(axis=1))


@pytest.mark.parametrize("mode", ["union", "reference"])
def test_undecided_mask_agrees_with_the_cascade(mode: str) -> None:
    rng = np.random.default_rng(7)
    select, estimate = random_counts(rng, 2000)
    result = certify_cascade(select, estimate, SIGMAS, CascadeRule(0.01, mode))
    for k in range(len(SIGMAS) + 1):
        pending = undecided_mask(select[:, :k], estimate[:, :k], len(SIGMAS), CascadeRule(0.01, mode))
        assert np.array_equal(pending, (result.stage == -1) | (result.stage >= k))
        if mode == "union":  # the published routing whatever the rule's own (best would send every image on)
            best = CascadeRule(0.01, mode, routing="best")
            assert np.array_equal(undecided_mask(select[:, :k], estimate[:, :k], len(SIGMAS), best), pending)
            assert needs_next_stage(select[:, :k], estimate[:, :k], len(SIGMAS), best).all()


def test_early_exit_zeros_are_fine_but_a_needed_unsampled_stage_is_an_error() -> None:
    select = np.array([[[0, 100, 0], [0, 0, 0], [0, 0, 0]], [[30, 40, 30], [0, 0, 0], [0, 0, 0]]])
    estimate = np.array([[[0, 1000, 0], [0, 0, 0], [0, 0, 0]], [[300, 400, 300], [0, 0, 0], [0, 0, 0]]])
    with pytest.raises(UserError, match=r"sigma=0\.5 is needed for 1 image"):
        certify_cascade(select, estimate, SIGMAS, CascadeRule(ALPHA))
    result = certify_cascade(select[:1], estimate[:1], SIGMAS, CascadeRule(ALPHA))
    assert result.prediction.tolist() == [1] and result.stage.tolist() == [0]
    with pytest.raises(UserError, match="stage 2 of 3"):
        undecided_mask(select[:, :2], estimate[:, :2], 3, CascadeRule(ALPHA))


@pytest.mark.parametrize(
    "sigmas, select_shape, message",
    [
        ((0.25, 0.5, 1.0), (1, 3, 3), "strictly decreasing"),
        ((1.0, 0.5), (1, 3, 3), "2 sigma"),
        (SIGMAS, (1, 3, 4), "same shape"),
    ],
)
def test_bad_counts_are_a_user_error(sigmas, select_shape, message) -> None:
    """The data is checked here; the settings (alpha, alpha mode, p0, routing) by CascadeRule
    (tests/test_config.py)."""
    estimate = np.ones((1, 3, 3), dtype=np.int64)
    with pytest.raises(UserError, match=message):
        certify_cascade(np.ones(select_shape, dtype=np.int64), estimate, sigmas, CascadeRule(ALPHA))


def test_single_scale_is_cohens_certificate() -> None:
    select = np.array([[5, 95], [60, 40], [50, 50]])
    estimate = np.array([[70, 930], [700, 300], [500, 500]])
    result = certify_single_scale(select, estimate, 0.5, CascadeRule(ALPHA))
    assert result.prediction.tolist() == [1, 0, -1]
    expected = [0.5 * norm.ppf(cp(930, 1000, ALPHA)[0]), 0.5 * norm.ppf(cp(700, 1000, ALPHA)[0]), 0.0]
    np.testing.assert_allclose(result.radius, expected, rtol=1e-12)
