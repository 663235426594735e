"""The reduce stage: counts → cascade decisions and radii → the results table (numpy/scipy only).

Fixed-n counts go to the Clopper-Pearson cascade (pipeline/stats/cascade.py); counts of an adaptive
run were stopped on the data and go to the confidence-sequence cascade
(pipeline/stats/sequential_cascade.py), never to Clopper-Pearson.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from pipeline.stats.cascade import AlphaMode, Routing, certify_cascade, certify_single_scale
from pipeline.stats.sequential_cascade import certify_cascade_sequential
from pipeline.store.counts import CountsArrays
from pipeline.store.results import results_table


def reduce_cascade(arrays: CountsArrays, alpha: float, alpha_mode: AlphaMode, p0: float) -> pa.Table:
    result = certify_cascade(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, alpha, alpha_mode, p0)
    return results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas)


def reduce_adaptive(arrays: CountsArrays, alpha: float, p0: float, routing: Routing = "cascade",
                    target_radii: Sequence[float] = ()) -> pa.Table:
    """Counts of an adaptive run → results (confidence-sequence bounds, the routing it took: which
    stages have rows; with the run's target radii, the largest one proven). `arrays` must carry the
    run's sigmas: the alpha split depends on every scale the cascade could consult, including ones no
    image reached."""
    result = certify_cascade_sequential(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, alpha, p0,
                                        routing, target_radii)
    return results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas)


def reduce_single_scales(arrays: CountsArrays, alpha: float, p0: float) -> dict[float, pa.Table]:
    """Cohen et al. at each scale alone, only where every image has counts at that scale."""
    tables = {}
    for k, sigma in enumerate(arrays.sigmas):
        if arrays.present[:, k].all():
            result = certify_single_scale(arrays.select_counts[:, k], arrays.estimate_counts[:, k], sigma, alpha, p0)
            tables[float(sigma)] = results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas[k:k + 1])
    return tables
