"""One Ray Data execution per run: the images still to do, through a pool of `CascadeActor`s.

The driver reads the shards already on disk, asks the strategy which images still need any cell
(an interrupted run's images continue from the first stage they still need; finished ones are
skipped), builds the dataset from those images only (no per-block filter task; blocks sized to the
actor pool) and runs it once. The counts are then bit-identical to an uninterrupted run's, whatever
the batching, the number of actors or where the run was cut (noise is counter-seeded).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.config import CertifyConfig
from pipeline.distributed.actor import FAIL_ONCE_ENV, CascadeActor, PriorCells
from pipeline.models.spec import ModelSource
from pipeline.sampling.strategies import BatchCounts, make_strategy
from pipeline.store.counts import index_counts

logger = logging.getLogger(__name__)

DatasetFor = Callable[[np.ndarray, int], object]
"""(image ids to read, number of blocks) → ray.data.Dataset of {image_id, label, image}."""


@dataclass(frozen=True)
class ExecutionConfig:
    """How the work is spread; changing these never changes a count."""

    num_actors: int
    images_per_batch: int
    batch_size: int  # samples per fused forward (--batch-size); in bf16 the counts depend on it
    use_gpu: bool


def _still_to_do(counts_dir: str, image_ids: np.ndarray, config: CertifyConfig) -> tuple[np.ndarray, PriorCells]:
    """The images that still need a cell (an interrupted run's continue from the first stage they still
    need) and the cells on disk of those already started, one Ray object each. The shards are read
    group of images by group (store/counts.py), so the driver's memory does not grow with the run."""
    import ray

    index = index_counts(counts_dir, missing_ok=True).only(image_ids=image_ids)
    for unreadable in index.unreadable:
        logger.warning("ignoring unreadable counts shard %s; its images will be sampled again", unreadable)
    strategy = make_strategy(config)
    todo, prior = [np.setdiff1d(image_ids, index.image_ids)], {}
    if len(index.file):
        for arrays in index.groups(sigmas=config.sigmas):
            counts = BatchCounts(arrays.select_counts, arrays.estimate_counts, arrays.present)
            pending = strategy.pending(counts)
            todo.append(arrays.image_ids[pending])
            for row in np.flatnonzero(pending & counts.present.any(axis=1)).tolist():
                prior[int(arrays.image_ids[row])] = ray.put((counts.present[row], counts.select[row],
                                                             counts.estimate[row]))
    return np.sort(np.concatenate(todo)), prior


def sample_counts(
    dataset_for: DatasetFor,
    image_ids: np.ndarray,
    models: ModelSource,
    config: CertifyConfig,
    execution: ExecutionConfig,
    counts_dir: str,
    shard_metadata: dict[bytes, bytes],
) -> np.ndarray:
    """Sample every cell the strategy needs that is not on disk yet; returns the ids of `image_ids` with
    counts on disk (all of them, unless unreadable images were skipped)."""
    import ray.data

    image_ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    if "://" not in counts_dir:  # the actors' working directory need not be this process's
        counts_dir = os.path.abspath(counts_dir)
    todo, prior = _still_to_do(counts_dir, image_ids, config)
    print(f"[mdds] {config.strategy}: sampling {len(todo)} image(s) "
          f"({len(image_ids) - len(todo)} already done)", flush=True)
    if len(todo):
        # At most --images-per-batch per batch, and as many batches as a multiple of the actors, so no
        # actor idles while another works through a last batch (on 2 cores: 8 batches of 13, not 7 of 16).
        batches = -(-len(todo) // execution.images_per_batch)
        batches = -(-batches // execution.num_actors) * execution.num_actors
        per_batch = -(-len(todo) // batches)
        batches = -(-len(todo) // per_batch)
        dataset = dataset_for(todo, min(batches, 4 * execution.num_actors))
        counted = dataset.map_batches(
            CascadeActor,
            fn_constructor_kwargs=dict(models=models, config=config, batch_size=execution.batch_size,
                                       counts_dir=counts_dir, shard_metadata=shard_metadata, prior=prior),
            batch_size=per_batch,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=execution.num_actors),
            num_gpus=1 if execution.use_gpu else 0,
            num_cpus=0 if execution.use_gpu else 1,
            **_forward_env(FAIL_ONCE_ENV, "AWS_ENDPOINT_URL"),
        )
        written = sum(int(row["rows"]) for row in counted.iter_rows())
        logger.info("wrote %d counts rows", written)
    return index_counts(counts_dir, missing_ok=True).only(image_ids=image_ids).image_ids


def _forward_env(*names: str) -> dict:
    """Ray options handing the driver's values of `names` to the actors: workers inherit the environment
    only of the process that started Ray, not of a driver joining a running instance or a cluster (an
    S3-protocol store's AWS_ENDPOINT_URL, docs/storage.md)."""
    values = {name: os.environ[name] for name in names if os.environ.get(name)}
    return {"runtime_env": {"env_vars": values}} if values else {}


def rows_of(counts_dir: str, image_ids: np.ndarray) -> pa.Table:
    """The counts rows on disk that belong to `image_ids` (a resumed OUT may hold others), in memory:
    for small runs and tests; the driver and the reduce stream them (`index_counts(...).groups`)."""
    index = index_counts(counts_dir, missing_ok=True).only(image_ids=image_ids)
    return index.table()
