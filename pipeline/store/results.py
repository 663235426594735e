"""The results table: one row per image with its certificate (what DuckDB queries)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.stats.cascade import CascadeResult

RESULTS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),
    ("radius", pa.float64()),
    ("sigma", pa.float64()),
    ("correct", pa.bool_()),
])


def results_table(image_ids: np.ndarray, labels: np.ndarray, result: CascadeResult, sigmas: np.ndarray) -> pa.Table:
    """One row per image; `sigma` is the deciding scale, null where every stage fell through; an
    abstention is never correct, also for images of unknown label (-1, the Python API's default)."""
    decided = result.stage >= 0
    sigma = pa.array(np.where(decided, sigmas[np.maximum(result.stage, 0)], np.nan), mask=~decided)
    return pa.table(
        [
            pa.array(image_ids, pa.int64()),
            pa.array(labels, pa.int64()),
            pa.array(result.prediction, pa.int64()),
            pa.array(result.radius, pa.float64()),
            sigma,
            pa.array((result.prediction == labels) & (result.prediction >= 0), pa.bool_()),  # label -1: unknown
        ],
        schema=RESULTS_SCHEMA,
    )
