"""The predict job: cascaded prediction without a certificate (method.md §5) → predictions.parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.app.certify import CertifyRequest, Stopwatch, collect_counts
from pipeline.store.atomic import write_parquet
from pipeline.store.run_config import join
from pipeline.stats.prediction import predict_cascade

PREDICTIONS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),
    ("sigma", pa.float64()),
    ("correct", pa.bool_()),
])


def predict(request: CertifyRequest) -> str:
    """Sample n votes per image and scale (early exit by the §5 test), predict, write, summarize."""
    workload, sampling, arrays = collect_counts(request, Stopwatch(), min_select=0)
    prediction, stage = predict_cascade(arrays.estimate_counts, sampling.alpha)
    decided = stage >= 0
    table = pa.table(
        [
            pa.array(arrays.image_ids, pa.int64()),
            pa.array(arrays.labels, pa.int64()),
            pa.array(prediction, pa.int64()),
            pa.array(np.where(decided, arrays.sigmas[np.maximum(stage, 0)], np.nan), mask=~decided),
            pa.array(prediction == arrays.labels, pa.bool_()),
        ],
        schema=PREDICTIONS_SCHEMA,
    )
    write_parquet(table, join(request.out, "predictions.parquet"))
    lines = [
        f"# mdds cascaded prediction ({request.preset.name})",
        *[f"- {line}" for line in workload.notes],
        f"- images: {len(prediction)}; sigmas {list(sampling.sigmas)}; n={sampling.n}; "
        f"alpha={sampling.alpha:g} per stage" + (f" (family-wise: alpha/M over {len(prediction)} images)"
                                                 if sampling.family_wise else ""),
        "",
        "| deciding sigma | images | accuracy |",
        "|---|---|---|",
    ]
    for k, sigma in enumerate(arrays.sigmas):
        here = stage == k
        if here.any():
            lines.append(f"| {sigma:g} | {int(here.sum())} | {100 * np.mean(prediction[here] == arrays.labels[here]):.1f}% |")
    lines.append(f"| abstain | {int((~decided).sum())} | - |")
    lines.append(f"\noverall accuracy {100 * np.mean(prediction == arrays.labels):.1f}%, "
                 f"abstain rate {100 * np.mean(~decided):.1f}%")
    return "\n".join(lines)
