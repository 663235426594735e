"""The Ray Data callable class around the fused step: one model copy per actor, one shard per batch.

The actor writes its batch's counts as one shard (see shards.py) instead of returning them: the
counts then never pass through the object store (ImageNet has 1,000 classes per row), a retried
batch rewrites the same file, and a resume can trust whatever shard it finds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.counts import counts_table
from pipeline.fused import FusedDenoiseClassify
from pipeline.models.spec import ModelSpec
from pipeline.noise import Phase
from pipeline.shards import shard_name, write_shard

FAIL_ONCE_ENV = "MDDS_INJECT_ACTOR_FAILURE"
"""Fault injection for tests: a marker-file path. The first batch that finds it missing creates it
and kills its own process mid-run, exercising actor restart and batch retry."""


class CountActor:
    """For a batch of images, writes one counts row per (image, sigma) and returns the row count."""

    def __init__(
        self,
        model_spec: ModelSpec,
        sigmas: Sequence[float],
        n_select: int,
        n: int,
        seed: int,
        batch_size: int,
        counts_dir: str,
    ):
        denoiser, classifier = model_spec.load()
        self.fused = FusedDenoiseClassify(denoiser, classifier, model_spec.num_classes, batch_size=batch_size)
        self.sigmas = [float(s) for s in sigmas]
        self.samples = {Phase.SELECT: n_select, Phase.ESTIMATE: n}
        self.seed = seed
        self.counts_dir = counts_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack(list(batch["image"])) if batch["image"].dtype == object else batch["image"]
        image_ids = batch["image_id"].astype(np.int64)
        counts = self.fused.count(images, image_ids, self.sigmas, self.samples, self.seed)
        num_scales, num_classes = len(self.sigmas), self.fused.num_classes
        table = counts_table(
            np.repeat(image_ids, num_scales),
            np.repeat(batch["label"].astype(np.int64), num_scales),
            np.tile(np.asarray(self.sigmas), len(image_ids)),
            counts[Phase.SELECT].reshape(-1, num_classes),
            counts[Phase.ESTIMATE].reshape(-1, num_classes),
        )
        _maybe_fail_once()
        write_shard(table, self.counts_dir, shard_name(self.sigmas, image_ids))
        return {"rows": np.array([table.num_rows], dtype=np.int64)}


def _maybe_fail_once() -> None:
    marker = os.environ.get(FAIL_ONCE_ENV)
    if marker and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)
