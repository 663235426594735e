"""The predict task: cascaded prediction without a certificate (docs/statistics.md) → predictions.parquet."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.app.certify import CertifyRequest, Stopwatch, collect_counts
from pipeline.stats.prediction import predict_cascade
from pipeline.store.atomic import write_parquet
from pipeline.config import CertifyConfig
from pipeline.store.counts import CountsArrays, index_counts
from pipeline.store.run_config import join

PREDICTIONS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("label", pa.int64()),
    ("prediction", pa.int64()),
    ("sigma", pa.float64()),
    ("correct", pa.bool_()),
])


def predictions_table(arrays: CountsArrays, config: CertifyConfig) -> pa.Table:
    """The cascaded prediction of every image of `arrays` (estimation votes, early exit by the test)."""
    prediction, stage = predict_cascade(arrays.estimate_counts, config.image_alpha)
    decided = stage >= 0
    return pa.table(
        [
            pa.array(arrays.image_ids, pa.int64()),
            pa.array(arrays.labels, pa.int64()),
            pa.array(prediction, pa.int64()),
            pa.array(np.where(decided, arrays.sigmas[np.maximum(stage, 0)], np.nan), mask=~decided),
            pa.array((prediction == arrays.labels) & decided, pa.bool_()),
        ],
        schema=PREDICTIONS_SCHEMA,
    )


def predict(request: CertifyRequest) -> str:
    """Sample n votes per image and scale (early exit by the prediction test), predict, write, summarize.
    The request's config has the predict task (request_from_args(args, task="predict"))."""
    workload, config, asked = collect_counts(request, Stopwatch())
    index = index_counts(join(request.out, "counts")).only(image_ids=asked)
    table = pa.concat_tables([predictions_table(arrays, config) for arrays in index.groups(sigmas=config.sigmas)])
    write_parquet(table, join(request.out, "predictions.parquet"))
    prediction, labels = table["prediction"].to_numpy(), table["label"].to_numpy()
    deciding = table["sigma"].to_numpy(zero_copy_only=False)  # NaN where the image abstained
    decided = prediction >= 0
    lines = [
        f"# mdds cascaded prediction ({request.preset.name})",
        *[f"- {line}" for line in workload.notes],
        f"- images: {len(prediction)}; sigmas {list(config.sigmas)}; n={config.n}; "
        f"alpha={config.image_alpha:g} per stage" + (f" (family-wise: alpha/M over {len(prediction)} images)"
                                                     if config.family_wise else ""),
        "",
        "| deciding sigma | images | accuracy |",
        "|---|---|---|",
    ]
    for sigma in config.sigmas:
        here = deciding == sigma
        if here.any():
            lines.append(f"| {sigma:g} | {int(here.sum())} | {100 * np.mean(prediction[here] == labels[here]):.1f}% |")
    lines.append(f"| abstain | {int((~decided).sum())} | - |")
    lines.append(f"\noverall accuracy {100 * np.mean(prediction == labels):.1f}%, "
                 f"abstain rate {100 * np.mean(~decided):.1f}%")
    return "\n".join(lines)
