"""The one Ray Data callable class: a model copy per actor runs each batch's whole sampling strategy.

For a batch of images the actor runs the run's strategy (early exit, all scales, adaptive, predict:
pipeline/sampling/strategies.py) from start to end, routing each image between scales itself, so a
run is one Ray Data execution and the driver never routes images. After each stage it writes that
stage's cells as one shard (store/shards.py) instead of returning them: counts never pass through
the object store (ImageNet has 1,000 classes per row), a retried batch rewrites the same files, a
preempted run loses at most one stage of one batch per actor, and a resume can trust any shard it
finds.

A resumed run's cells already on disk reach the actor per image, as Ray object references
(`PriorCells`): only the batches holding started images fetch them, and no actor receives the cells
of every started image in its constructor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.config import CertifyConfig
from pipeline.models.spec import ModelSource
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.sampling.strategies import BatchCounts, make_strategy, sample_totals
from pipeline.sampling.votes import FusedVoteSource
from pipeline.store.counts import counts_table
from pipeline.store.shards import shard_name, write_shard

FAIL_ONCE_ENV = "MDDS_INJECT_ACTOR_FAILURE"
"""Fault injection for tests: a marker-file path. The first batch that finds it missing creates it
and kills its own process mid-run, exercising actor restart and batch retry."""

PriorCells = dict[int, object]
"""image_id → Ray object reference to (present (K,), select (K, C), estimate (K, C)): a resumed
image's cells on disk."""


class CascadeActor:
    """For a batch of {image_id, label, image}: the strategy's stages, one shard each; returns the rows."""

    def __init__(self, models: ModelSource, config: CertifyConfig, batch_size: int, counts_dir: str,
                 shard_metadata: dict[bytes, bytes], prior: PriorCells):
        denoiser, classifier = models.load()
        self.fused = FusedDenoiseClassify(denoiser, classifier, models.num_classes, batch_size=batch_size,
                                          precision=models.precision)
        self.config = config
        self.strategy = make_strategy(config)
        self.counts_dir = counts_dir
        self.shard_metadata = shard_metadata
        self.prior = prior

    def _counts(self, image_ids: np.ndarray) -> BatchCounts:
        """The batch's counts so far: zeros, except the cells of resumed images (fetched for this batch only)."""
        counts = BatchCounts.empty(len(image_ids), len(self.config.sigmas), self.fused.num_classes)
        started = [(row, self.prior[image_id]) for row, image_id in enumerate(image_ids.tolist())
                   if image_id in self.prior]
        if started:
            import ray

            for (row, _), cells in zip(started, ray.get([ref for _, ref in started])):
                counts.present[row], counts.select[row], counts.estimate[row] = cells
        return counts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
        image_ids = batch["image_id"].astype(np.int64)
        labels = batch["label"].astype(np.int64)
        sigmas = np.asarray(self.config.sigmas, dtype=np.float64)
        counts = self._counts(image_ids)
        source = FusedVoteSource(self.fused, images, image_ids, sigmas, sample_totals(self.config), self.config.seed)
        written = 0
        for filled in self.strategy.sample(source, counts):
            rows, stages = np.nonzero(filled)
            table = counts_table(image_ids[rows], labels[rows], sigmas[stages], counts.select[rows, stages],
                                 counts.estimate[rows, stages])
            _maybe_fail_once()
            write_shard(table, self.counts_dir, shard_name(sorted(set(sigmas[stages].tolist()), reverse=True),
                                                           image_ids[np.unique(rows)]), self.shard_metadata)
            written += table.num_rows
        return {"rows": np.array([written], dtype=np.int64)}


def _maybe_fail_once() -> None:
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)
