"""Adaptive sampling inside the Ray Data pipeline, and its reduce step.

Unlike the fixed-n pipeline (one Ray Data pass per scale, early exit decided between passes), an
adaptive run takes every image through all of its stages inside one actor call: which scale an
image needs next is decided round by round. One pass therefore covers every image; each actor
batch writes the counts rows of every (image, sigma) it consulted as one shard, so a resume skips
any image that has rows on disk. Which stages have rows is also the routing the run took
(`certify_cascade_sequential`'s `fell_through`), so the reduce needs nothing but the counts table.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.adaptive import AdaptiveSettings, certify_cascade_sequential, run_adaptive
from pipeline.counts import CountsArrays, counts_table
from pipeline.fused import FusedDenoiseClassify
from pipeline.models.spec import ModelSpec
from pipeline.noise import Phase
from pipeline.reduce import results_table
from pipeline.run import ExecutionConfig, rows_of, run_actors
from pipeline.shards import read_shards, shard_name, write_shard
from pipeline.votes import FusedVoteSource


class AdaptiveCountActor:
    """For a batch of images: the adaptive cascade, then one counts row per consulted (image, sigma)."""

    def __init__(self, model_spec: ModelSpec, settings: AdaptiveSettings, seed: int, batch_size: int,
                 counts_dir: str):
        denoiser, classifier = model_spec.load()
        self.fused = FusedDenoiseClassify(denoiser, classifier, model_spec.num_classes, batch_size=batch_size)
        self.settings = settings
        self.seed = seed
        self.counts_dir = counts_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
        image_ids = batch["image_id"].astype(np.int64)
        settings = self.settings
        source = FusedVoteSource(self.fused, images, image_ids, settings.sigmas,
                                 {Phase.SELECT: settings.n_select, Phase.ESTIMATE: settings.n_max}, self.seed)
        outcome = run_adaptive(source, len(image_ids), settings)
        rows, stages = np.nonzero(outcome.consulted)
        table = counts_table(image_ids[rows], batch["label"].astype(np.int64)[rows],
                             np.asarray(settings.sigmas)[stages], outcome.select_counts[rows, stages],
                             outcome.estimate_counts[rows, stages])
        write_shard(table, self.counts_dir, shard_name(settings.sigmas, image_ids))
        return {"rows": np.array([table.num_rows], dtype=np.int64)}


def run_adaptive_pass(dataset, image_ids: np.ndarray, model_spec: ModelSpec, settings: AdaptiveSettings,
                      seed: int, execution: ExecutionConfig, counts_dir: str) -> pa.Table:
    """Sample every image without rows in `counts_dir` yet; returns the counts rows of `image_ids`."""
    image_ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    done = set(read_shards(counts_dir)["image_id"].to_pylist())
    todo = np.array([i for i in image_ids.tolist() if i not in done], dtype=np.int64)
    print(f"[mdds] adaptive: sampling {len(todo)} image(s) ({len(image_ids) - len(todo)} already done)", flush=True)
    if len(todo):
        run_actors(dataset, todo, AdaptiveCountActor, dict(
            model_spec=model_spec, settings=settings, seed=seed, batch_size=execution.samples_per_forward,
            counts_dir=counts_dir,
        ), execution)
    return rows_of(counts_dir, image_ids)


def reduce_adaptive(arrays: CountsArrays, alpha: float, p0: float) -> pa.Table:
    """Counts of an adaptive run → results table (confidence-sequence bounds, the routing it took).

    `arrays` must come from `counts_to_arrays(table, sigmas=<the run's sigmas>)`: the alpha split
    depends on every scale the cascade could consult, including ones no image reached."""
    result = certify_cascade_sequential(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, alpha, p0,
                                        fell_through=arrays.present[:, 1:])
    return results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas)
