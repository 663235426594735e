"""Reference mode reproduces the published implementation's output on shared/cascade_reference_cases.parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import CascadeRule
from pipeline.stats.cascade import certify_cascade

REFERENCE_CASES = Path(__file__).resolve().parents[3] / "shared" / "cascade_reference_cases.parquet"
ALPHA = 0.001

pytestmark = pytest.mark.skipif(
    not REFERENCE_CASES.exists(),
    reason=f"reference cases not found at {REFERENCE_CASES} (shared/ is not checked out beside the repo)",
)


@pytest.fixture(scope="module")
def cases() -> dict[str, np.ndarray]:
    """Counts as (images, scales, classes), scales from the highest sigma, plus the expected outcome."""
    table = pq.read_table(REFERENCE_CASES).to_pandas()
    table = table.sort_values(["image_id", "sigma"], ascending=[True, False])
    sigmas = np.sort(table["sigma"].unique())[::-1]
    per_image = table.groupby("image_id", sort=True)
    assert (per_image["sigma"].apply(list).map(tuple) == tuple(sigmas)).all(), "every image needs every scale"
    images, scales = per_image.ngroups, len(sigmas)
    first = per_image.first()
    return {
        "sigmas": sigmas,
        "select": np.stack(table["select_counts"].to_numpy()).reshape(images, scales, -1),
        "estimate": np.stack(table["estimate_counts"].to_numpy()).reshape(images, scales, -1),
        "prediction": first["expected_prediction"].to_numpy(),
        "radius": first["expected_radius"].to_numpy(),
        "sigma": first["expected_sigma"].to_numpy(dtype=np.float64),
    }


def test_reference_mode_reproduces_every_image(cases: dict[str, np.ndarray]) -> None:
    result = certify_cascade(cases["select"], cases["estimate"], cases["sigmas"], CascadeRule(ALPHA, "reference"))
    np.testing.assert_array_equal(result.prediction, cases["prediction"])
    np.testing.assert_allclose(result.radius, cases["radius"], rtol=0, atol=1e-9)
    deciding_sigma = np.where(result.stage >= 0, cases["sigmas"][np.maximum(result.stage, 0)], np.nan)
    np.testing.assert_array_equal(deciding_sigma, cases["sigma"])


def test_the_cases_exercise_every_branch(cases: dict[str, np.ndarray]) -> None:
    result = certify_cascade(cases["select"], cases["estimate"], cases["sigmas"], CascadeRule(ALPHA, "reference"))
    certified = result.prediction >= 0
    for stage in range(len(cases["sigmas"])):
        assert np.any(certified & (result.stage == stage)), f"no certificate at stage {stage}"
        assert np.any(~certified & (result.stage == stage)), f"no abstention at stage {stage}"
    assert np.any(result.stage == -1)


def test_union_mode_on_the_cases_is_never_more_permissive(cases: dict[str, np.ndarray]) -> None:
    union = certify_cascade(cases["select"], cases["estimate"], cases["sigmas"], CascadeRule(ALPHA, "union"))
    certified = union.prediction >= 0
    np.testing.assert_array_equal(union.prediction[certified], cases["prediction"][certified])
    assert np.all(union.radius <= cases["radius"] + 1e-12)
