"""The reduce stage: counts → cascade decisions and radii → the results table (numpy/scipy only)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.cascade import AlphaMode, CascadeResult, certify_cascade, certify_single_scale
from pipeline.counts import CountsArrays

RESULTS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),
    ("radius", pa.float64()),
    ("sigma", pa.float64()),
    ("correct", pa.bool_()),
])


def results_table(image_ids: np.ndarray, labels: np.ndarray, result: CascadeResult, sigmas: np.ndarray) -> pa.Table:
    """One row per image; `sigma` is the deciding scale, null where every stage fell through."""
    decided = result.stage >= 0
    sigma = pa.array(np.where(decided, sigmas[np.maximum(result.stage, 0)], np.nan), mask=~decided)
    return pa.table(
        [
            pa.array(image_ids, pa.int64()),
            pa.array(labels, pa.int64()),
            pa.array(result.prediction, pa.int64()),
            pa.array(result.radius, pa.float64()),
            sigma,
            pa.array(result.prediction == labels, pa.bool_()),
        ],
        schema=RESULTS_SCHEMA,
    )


def reduce_cascade(arrays: CountsArrays, alpha: float, alpha_mode: AlphaMode, p0: float) -> pa.Table:
    result = certify_cascade(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, alpha, alpha_mode, p0)
    return results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas)


def reduce_single_scales(arrays: CountsArrays, alpha: float, p0: float) -> dict[float, pa.Table]:
    """Cohen et al. at each scale alone, only where every image has counts at that scale."""
    tables = {}
    for k, sigma in enumerate(arrays.sigmas):
        if arrays.present[:, k].all():
            result = certify_single_scale(arrays.select_counts[:, k], arrays.estimate_counts[:, k], sigma, alpha, p0)
            tables[float(sigma)] = results_table(
                arrays.image_ids, arrays.labels, result, np.array([sigma])
            )
    return tables
