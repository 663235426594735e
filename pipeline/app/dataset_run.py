"""`pipeline.certify_dataset`: a user's `ray.data.Dataset` and models through the jobs' one execution.

The dataset is checked once (columns, one image's shape and range), the models once in the driver
(ModelSource.check), and then the run is the certify job's: run_config.json and images.parquet under
OUT, counts shards written by the actors, resume, the reduce and the report (pipeline/app/certify.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.app.certify import Stopwatch, sample_run, write_results
from pipeline.app.cli import prepare_out_dir
from pipeline.config import CertifyConfig
from pipeline.distributed.run import ExecutionConfig
from pipeline.errors import UserError
from pipeline.models.precision import resolve_precision
from pipeline.models.spec import ModelSource

COLUMNS = ("image_id", "label", "image")


def run_dataset(dataset: Any, models: ModelSource, config: CertifyConfig, out: str, *, image_ids: Any,
                num_actors: int | None, images_per_batch: int, batch_size: int, device: str, precision: str,
                resume: bool, overwrite: bool) -> pa.Table:
    """Certify `dataset` into `out`; returns the results (pipeline.api.certify_dataset documents the arguments)."""
    from dataclasses import replace

    from pipeline.app.args import num_actors_for, use_gpu

    image_shape = _check_dataset(dataset)
    ids = _image_ids(dataset, image_ids)
    if images_per_batch < 1 or batch_size < 1:
        raise UserError(f"images_per_batch and batch_size must be >= 1, got {images_per_batch} and {batch_size}")
    gpu = use_gpu(device)
    models = replace(models, precision=resolve_precision(precision, gpu)) if models.precision is None else models
    execution = ExecutionConfig(num_actors_for(num_actors, gpu, reads_files=True), images_per_batch, batch_size, gpu)
    prepare_out_dir(out, overwrite, resume)
    stopwatch = Stopwatch()
    notes = models.check(image_shape)
    inputs = {"data": "ray.data.Dataset", "models": _describe(models), "precision": models.precision}

    def dataset_for(todo: np.ndarray, num_blocks: int) -> Any:
        if len(todo) == len(ids):
            return dataset.repartition(num_blocks)
        wanted = set(todo.tolist())
        return dataset.filter(lambda row: int(row["image_id"]) in wanted).repartition(num_blocks)

    config, _ = sample_run(out, config, inputs, ids, dataset_for, models, execution, resume, stopwatch)
    return write_results(out, config, ids, "ray.data.Dataset", (f"models: {_describe(models)}", *notes),
                         stopwatch)[0]


def _check_dataset(dataset: Any) -> tuple[int, int, int]:
    """The (C, H, W) of the dataset's images, after checking its columns and one row."""
    import ray.data

    if not isinstance(dataset, ray.data.Dataset):
        raise TypeError(f"dataset must be a ray.data.Dataset, got a {type(dataset).__name__}")
    names = dataset.schema().names
    missing = [name for name in COLUMNS if name not in names]
    if missing:
        raise UserError(f"the dataset lacks column(s) {', '.join(missing)}: it needs image_id (int), label (int) "
                        f"and image ((C, H, W) floats in [0, 1]); it has {', '.join(names)}")
    rows = dataset.take(1)
    if not rows:
        raise UserError("the dataset has no rows")
    image = np.asarray(rows[0]["image"])
    if image.ndim != 3 or not np.issubdtype(image.dtype, np.floating) or image.min() < 0 or image.max() > 1:
        raise UserError(f"dataset images must be (C, H, W) floats in [0, 1]; the first row's is {image.dtype} "
                        f"{image.shape} with values in [{image.min():g}, {image.max():g}]")
    return tuple(int(size) for size in image.shape)


def _image_ids(dataset: Any, image_ids: Any) -> np.ndarray:
    """The ids to certify: given, or read from the dataset's image_id column (one pass over it)."""
    if image_ids is None:
        image_ids = np.concatenate([batch["image_id"] for batch in
                                    dataset.select_columns(["image_id"]).iter_batches(batch_format="numpy")])
    ids = np.asarray(image_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"image ids must be integers, got {ids.dtype}")
    unique = np.unique(ids.astype(np.int64))
    if len(unique) != len(ids):
        raise UserError(f"image_id must be distinct: {len(ids) - len(unique)} repeated id(s) in the dataset")
    return unique


def _describe(models: ModelSource) -> str:
    """How run_config.json names the models: a ModelSpec's fields, or the factory's qualified name."""
    factory = getattr(models, "factory", None)
    if factory is None:
        return repr(models)
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', type(factory).__name__)}"
