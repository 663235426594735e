"""Properties of the bounds and the cascade that must hold for any counts (hypothesis)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.config import CascadeRule
from pipeline.stats.bounds import clopper_pearson_lower, clopper_pearson_upper
from pipeline.stats.cascade import certify_cascade
from pipeline.stats.prediction import predict_cascade

SIGMAS = (1.0, 0.5, 0.25)
SETTINGS = settings(max_examples=60, deadline=None)
levels = st.floats(min_value=1e-6, max_value=0.3)


@st.composite
def cascade_counts(draw, max_images: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(M, 3, 4) selection and estimation votes; every scale has at least one vote of each kind.
    A drawn class per image and scale often gets extra votes, so that certificates occur."""
    images = draw(st.integers(1, max_images))
    votes = st.integers(0, 80)
    shape = (images, len(SIGMAS), 4)
    select = draw(arrays(np.int64, shape, elements=votes))
    estimate = draw(arrays(np.int64, shape, elements=votes))
    favourite = draw(arrays(np.int64, shape[:2], elements=st.integers(0, 3)))[..., None] == np.arange(4)
    boost = draw(arrays(np.int64, shape[:2], elements=st.sampled_from([0, 50, 300, 2000])))[..., None]
    select += favourite * (boost > 0) * 60
    estimate += favourite * boost
    select[..., 0] += select.sum(axis=-1) == 0
    estimate[..., 0] += estimate.sum(axis=-1) == 0
    return select, estimate


@SETTINGS
@given(n=st.integers(1, 5000), fraction=st.floats(0, 1, exclude_max=True), level=levels)
def test_clopper_pearson_bounds_grow_with_the_count(n: int, fraction: float, level: float) -> None:
    k = int(fraction * n)
    lower = clopper_pearson_lower([k, k + 1], n, level)
    upper = clopper_pearson_upper([k, k + 1], n, level)
    assert lower[0] < lower[1] and upper[0] < upper[1]
    assert lower[0] <= k / n <= upper[0]


@SETTINGS
@given(counts=cascade_counts(), mode=st.sampled_from(["union", "reference"]), alpha=levels)
def test_radius_grows_with_the_votes_of_the_certified_class(counts, mode: str, alpha: float) -> None:
    select, estimate = counts
    before = certify_cascade(select, estimate, SIGMAS, CascadeRule(alpha, mode))
    for m in np.flatnonzero(before.prediction >= 0):
        stage, cls = before.stage[m], before.prediction[m]
        donors = np.flatnonzero((estimate[m, stage] > 0) & (np.arange(4) != cls))
        if donors.size == 0:
            continue
        moved = estimate.copy()
        moved[m, stage, donors[0]] -= 1
        moved[m, stage, cls] += 1
        after = certify_cascade(select, moved, SIGMAS, CascadeRule(alpha, mode))
        assert after.prediction[m] == cls and after.stage[m] == stage
        assert after.radius[m] >= before.radius[m]


@SETTINGS
@given(counts=cascade_counts(), mode=st.sampled_from(["union", "reference"]), seed=st.integers(0, 2**32 - 1))
def test_results_do_not_depend_on_the_order_of_images(counts, mode: str, seed: int) -> None:
    select, estimate = counts
    order = np.random.default_rng(seed).permutation(len(select))
    whole = certify_cascade(select, estimate, SIGMAS, CascadeRule(0.01, mode))
    shuffled = certify_cascade(select[order], estimate[order], SIGMAS, CascadeRule(0.01, mode))
    for field in ("prediction", "radius", "stage"):
        np.testing.assert_array_equal(getattr(whole, field)[order], getattr(shuffled, field))
    predicted, stage = predict_cascade(estimate, 0.01)
    predicted_shuffled, stage_shuffled = predict_cascade(estimate[order], 0.01)
    np.testing.assert_array_equal(predicted[order], predicted_shuffled)
    np.testing.assert_array_equal(stage[order], stage_shuffled)


@SETTINGS
@given(counts=cascade_counts(), alpha=levels, p0=st.floats(0.5, 0.8))
def test_union_decides_where_reference_does(counts, alpha: float, p0: float) -> None:
    """Union's bounds are at a smaller level than reference's (alpha/(2K-1) <= alpha/k), so a union
    certificate (cascade routing) sits at a stage where reference decides too, with the same class
    when reference certifies; only the caps (exact vs Goodman) may differ."""
    select, estimate = counts
    union = certify_cascade(select, estimate, SIGMAS, CascadeRule(alpha, "union", p0))
    reference = certify_cascade(select, estimate, SIGMAS, CascadeRule(alpha, "reference", p0))
    certified = union.prediction >= 0
    np.testing.assert_array_equal(reference.stage[certified], union.stage[certified])
    both = certified & (reference.prediction >= 0)
    np.testing.assert_array_equal(reference.prediction[both], union.prediction[both])
    first = certified & (union.stage == 0)
    assert np.all(union.radius[first] <= reference.radius[first])


@SETTINGS
@given(counts=cascade_counts(), alpha=levels, p0=st.floats(0.5, 0.8))
def test_continue_extends_cascade_and_best_extends_continue(counts, alpha: float, p0: float) -> None:
    select, estimate = counts
    cascade, cont, best = (certify_cascade(select, estimate, SIGMAS, CascadeRule(alpha, "union", p0, routing))
                           for routing in ("cascade", "continue", "best"))
    issued = cascade.prediction >= 0
    np.testing.assert_array_equal(cont.prediction[issued], cascade.prediction[issued])
    np.testing.assert_array_equal(cont.radius[issued], cascade.radius[issued])
    np.testing.assert_array_equal(best.prediction >= 0, cont.prediction >= 0)
    assert np.all(best.radius >= cont.radius)
