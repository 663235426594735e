"""The reduce stage: counts → cascade decisions and radii → the results table (numpy/scipy only).

Fixed-n counts go to the Clopper-Pearson cascade (pipeline/stats/cascade.py); counts of an adaptive
run were stopped on the data and go to the confidence-sequence cascade
(pipeline/stats/sequential_cascade.py), never to Clopper-Pearson.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.stats.cascade import (
    AlphaMode,
    Routing,
    certify_cascade,
    certify_single_scale,
    needed_stages,
)
from pipeline.stats.sequential_cascade import certify_cascade_sequential
from pipeline.store.counts import CountsArrays
from pipeline.store.results import results_table

#: How many missing image ids an error message lists before "…".
LISTED_IDS = 10


def reduce_cascade(arrays: CountsArrays, alpha: float, alpha_mode: AlphaMode, p0: float,
                   routing: Routing = "cascade") -> pa.Table:
    result = certify_cascade(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, alpha, alpha_mode, p0,
                             routing)
    return results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas)


def missing_images(arrays: CountsArrays, asked: np.ndarray | None, lacking: np.ndarray | None = None) -> np.ndarray:
    """Sorted ids that were asked for (None: those in the counts) but have no counts rows, or whose
    rows lack a stage the routing needs (`lacking`, aligned with arrays.image_ids)."""
    absent = np.setdiff1d(asked, arrays.image_ids) if asked is not None else np.array([], np.int64)
    partial = arrays.image_ids[lacking] if lacking is not None else np.array([], np.int64)
    return np.union1d(absent, partial).astype(np.int64)


def cascade_lacking(arrays: CountsArrays, alpha: float, alpha_mode: AlphaMode, p0: float,
                    routing: Routing) -> np.ndarray:
    """(M,) images of `arrays` whose rows lack a stage `routing` needs (fixed-n counts)."""
    needed = needed_stages(arrays.select_counts, arrays.estimate_counts, arrays.present, alpha, alpha_mode, p0,
                           routing)
    return (needed & ~arrays.present).any(axis=1)


def scales_sampled(arrays: CountsArrays, alpha: float, alpha_mode: AlphaMode, p0: float,
                   routing: Routing) -> np.ndarray:
    """(M,) how many scales early exit under `routing` samples per image: on an --all-scales run's
    counts, what a run with that routing would have cost."""
    return needed_stages(arrays.select_counts, arrays.estimate_counts, arrays.present, alpha, alpha_mode, p0,
                         routing).sum(axis=1)


def refuse_incomplete(missing: np.ndarray, num_asked: int, unreadable: Sequence[str], hint: str) -> None:
    """Certified accuracy over the images that happen to have counts would overstate it: name what
    is missing (count, ids, unreadable shards) in one line instead."""
    if not len(missing) and not unreadable:
        return
    ids = ", ".join(str(i) for i in missing[:LISTED_IDS]) + (", …" if len(missing) > LISTED_IDS else "")
    parts = [f"{len(missing)} of {num_asked} image(s) lack the counts their routing needs"
             + (f" (ids {ids})" if len(missing) else "")]
    if unreadable:
        parts.append(f"unreadable shard(s): {', '.join(unreadable)}")
    raise UserError("; ".join(parts) + f"; {hint}")


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
