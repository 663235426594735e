"""The Python API: certify any torch classifier behind any one-shot diffusion denoiser.

`MultiScaleSmooth` is Cohen et al.'s `Smooth` for the multi-scale cascade, in this process and
without Ray: the same fused kernel, sampling strategies (early exit, all scales, adaptive), routing,
counter-based noise and reduce as the command-line jobs, so on the same images, ids, settings and
precision it gives the same counts and certificates. `certify_dataset` is the jobs' Ray path for a
user's own `ray.data.Dataset` and models. docs/python-api.md walks through both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import CertifyConfig, check_sigmas
from pipeline.errors import UserError
from pipeline.models.precision import PRECISION_CHOICES, resolve_precision
from pipeline.models.spec import ModelFactory, ModelSource, as_denoiser
from pipeline.sampling.kernel import FusedDenoiseClassify, default_device
from pipeline.sampling.strategies import BatchCounts, make_strategy, sample_totals
from pipeline.sampling.votes import FusedVoteSource
from pipeline.store.counts import COUNTS_SCHEMA, counts_table

#: Images whose cascade one call of the kernel runs together (the actors' default batch of images).
IMAGES_PER_BATCH = 16


class MultiScaleSmooth:
    """The multi-scale smoothed classifier of (denoiser, classifier) over `sigmas`, in this process.

    denoiser: a `pipeline.models.OneShotDenoiser`, a diffusers UNet2DModel + scheduler directory (path
    or fsspec URL), or a (UNet2DModel, scheduler) pair; denoiser_fit says how images of another size
    reach it (pad | native | resize, docs/imagenet-cifar.md). classifier: any torch.nn.Module mapping
    [0, 1] images (N, C, H, W) to logits (N, num_classes), resizing and normalizing inside itself.
    precision: auto | bf16 | fp32 (auto: bf16 on GPUs and CPUs with native bf16). batch_size: samples
    per fused forward; in bf16 the votes depend on it, so keep it fixed to reproduce a run.

    Every method takes the images (N, C, H, W) in [0, 1] (tensor or array), optional labels and image
    ids (default 0..N-1: the noise of every sample is addressed by (seed, image id, sigma, phase,
    chunk), so the same ids give the same votes) and the run's settings: a `CertifyConfig`, or its
    fields as keywords (n_select, n, alpha, strategy, routing, target_radii, seed, ...); `sigmas`
    defaults to this object's. Each certificate is wrong with probability at most alpha over that
    image's noise (union mode; docs/statistics.md); use family_wise=True for a joint guarantee.
    """

    def __init__(self, denoiser: Any, classifier: torch.nn.Module, num_classes: int, sigmas: Sequence[float], *,
                 device: str | torch.device | None = None, precision: str = "auto", batch_size: int = 1024,
                 denoiser_fit: str = "pad"):
        if not isinstance(classifier, torch.nn.Module):
            raise TypeError(f"classifier must be a torch.nn.Module, got a {type(classifier).__name__}")
        if precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.sigmas = check_sigmas(sigmas)
        device = torch.device(device) if device is not None else default_device()
        self.fused = FusedDenoiseClassify(as_denoiser(denoiser, denoiser_fit), classifier, num_classes, device=device,
                                          batch_size=batch_size,
                                          precision=resolve_precision(precision, device.type == "cuda"))

    @property
    def precision(self) -> str:
        return self.fused.precision

    def config(self, config: CertifyConfig | None = None, **settings: Any) -> CertifyConfig:
        """The run's configuration: `config` with `settings` replaced, else this object's sigmas with them."""
        if config is not None:
            return config.replace(**settings) if settings else config
        return CertifyConfig(**{"sigmas": self.sigmas, **settings})

    def counts(self, images: Any, labels: Any = None, *, config: CertifyConfig | None = None,
               image_ids: Any = None, progress: bool = True, **settings: Any) -> pa.Table:
        """The raw votes: one row per sampled (image, sigma) in the counts schema (README "What you get")."""
        config = self.config(config, **settings)
        images, labels, image_ids = self._inputs(images, labels, image_ids)
        return self._sample(images, labels, image_ids, config.for_images(len(image_ids)), progress)

    def certify(self, images: Any, labels: Any = None, *, config: CertifyConfig | None = None,
                image_ids: Any = None, progress: bool = True, **settings: Any) -> pa.Table:
        """Certificates in the results schema: image_id, label, prediction (-1 = abstain), radius (L2, in
        [0, 1] pixel units), sigma (the scale that spoke), correct. Labels default to -1 (unknown)."""
        from pipeline.app.reduce import reduce_counts

        config = self.config(config, **settings).for_images(len(_as_images(images)))
        table = self.counts(images, labels, config=config, image_ids=image_ids, progress=progress)
        return reduce_counts(table, config, asked=np.unique(table["image_id"].to_numpy()))[0].results

    def predict(self, images: Any, labels: Any = None, *, config: CertifyConfig | None = None,
                image_ids: Any = None, progress: bool = True, **settings: Any) -> pa.Table:
        """Cascaded prediction without a certificate (docs/statistics.md): image_id, label, prediction
        (-1 = abstain), sigma (the deciding scale), correct. n_select is 0 (the test uses n votes)."""
        from pipeline.app.predict import predictions_table
        from pipeline.store.counts import counts_to_arrays

        config = self.config(config, **{"n_select": 0, "task": "predict", **settings})
        table = self.counts(images, labels, config=config, image_ids=image_ids, progress=progress)
        return predictions_table(counts_to_arrays(table, config.sigmas), config)

    def _inputs(self, images: Any, labels: Any, image_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images = _as_images(images)
        count = len(images)
        ids = np.arange(count, dtype=np.int64) if image_ids is None else _as_int_vector(image_ids, "image_ids")
        labels = np.full(count, -1, np.int64) if labels is None else _as_int_vector(labels, "labels")
        if len(ids) != count or len(labels) != count:
            raise ValueError(f"got {count} images, {len(labels)} labels and {len(ids)} image ids; one each per image")
        if len(np.unique(ids)) != count:
            raise ValueError("image_ids must be distinct: an image's noise is addressed by its id")
        return images, labels, ids

    def _sample(self, images: np.ndarray, labels: np.ndarray, image_ids: np.ndarray, config: CertifyConfig,
                progress: bool) -> pa.Table:
        """Each batch of images through the strategy, as an actor runs it (pipeline/distributed/actor.py)."""
        from tqdm.auto import tqdm

        strategy, sigmas = make_strategy(config), np.asarray(config.sigmas)
        parts = []
        starts = range(0, len(images), IMAGES_PER_BATCH)
        for start in tqdm(starts, desc="certifying", unit="batch", disable=not progress or len(starts) < 2):
            rows = slice(start, start + IMAGES_PER_BATCH)
            ids = image_ids[rows]
            counts = BatchCounts.empty(len(ids), len(sigmas), self.fused.num_classes)
            source = FusedVoteSource(self.fused, images[rows], ids, sigmas, sample_totals(config), config.seed)
            for _ in strategy.sample(source, counts):
                pass
            cell_rows, stages = np.nonzero(counts.present)
            parts.append(counts_table(ids[cell_rows], labels[rows][cell_rows], sigmas[stages],
                                      counts.select[cell_rows, stages], counts.estimate[cell_rows, stages]))
        return pa.concat_tables(parts) if parts else COUNTS_SCHEMA.empty_table()


def _as_images(images: Any) -> np.ndarray:
    array = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"images must be floats of shape (N, C, H, W) in [0, 1], got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"images must lie in [0, 1], got values in [{array.min():g}, {array.max():g}]")
    return array.astype(np.float32, copy=False)


def _as_int_vector(values: Any, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if torch.is_tensor(values) else np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be a vector of integers, got {array.dtype} {array.shape}")
    return array.astype(np.int64)


@dataclass(frozen=True)
class DatasetRun:
    """What `certify_dataset` returns: the results table and where the run wrote it (OUT/results.parquet
    beside counts/, run_config.json, images.parquet, report.md)."""

    results: pa.Table
    out: str


def certify_dataset(dataset: Any, models: ModelSource | Callable[[], tuple[Any, torch.nn.Module]],
                    config: CertifyConfig, out: str | os.PathLike, *, num_classes: int | None = None,
                    image_ids: Any = None, num_actors: int | None = None, images_per_batch: int = IMAGES_PER_BATCH,
                    batch_size: int = 1024, device: str = "auto", precision: str = "auto",
                    resume: bool = False, overwrite: bool = False) -> DatasetRun:
    """Certify a `ray.data.Dataset` on the Ray cluster this process is connected to (or a local one),
    in the one Ray Data execution the jobs use: actors run each batch's whole cascade and write counts
    shards under `out` (a path or fsspec URL); a killed run continues with resume=True.

    dataset: columns image_id (int, distinct), label (int) and image ((C, H, W) floats in [0, 1]).
    models: a `pipeline.models.ModelSpec` (models mdds loads by name), a `pipeline.models.ModelFactory`,
    or a picklable callable returning (denoiser, classifier) (then give num_classes), built once per
    actor, so any nn.Module runs on every node. image_ids: the ids to certify (default: read once from
    the dataset). Returns the results and where they were written.
    """
    from pipeline.app.dataset_run import run_dataset

    if not isinstance(config, CertifyConfig):
        raise TypeError(f"config must be a CertifyConfig, got a {type(config).__name__}")
    if callable(models) and not hasattr(models, "load"):
        if num_classes is None:
            raise ValueError("a model factory needs num_classes (the classifier's number of logits)")
        models = ModelFactory(models, num_classes)
    if not hasattr(models, "load") or not hasattr(models, "check"):
        raise TypeError(f"models must be a ModelSpec, a ModelFactory or a callable, got a {type(models).__name__}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    results = run_dataset(dataset, models, config, os.fspath(out), image_ids=image_ids, num_actors=num_actors,
                          images_per_batch=images_per_batch, batch_size=batch_size, device=device,
                          precision=precision, resume=resume, overwrite=overwrite)
    if results is None:
        raise UserError("nothing to certify")
    return DatasetRun(results, os.fspath(out))
