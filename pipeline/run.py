"""Orchestration: scales highest-first with early exit, resumable counts shards, reduce, outputs.

Stage k samples only the images every earlier stage let fall through (method.md §4 "early exit"),
unless `all_scales` asks for every scale on every image (needed for single-scale baselines); then
one fused pass covers all scales. Every stage first reads the shards already on disk, so `--resume`
skips every (image, sigma) that an interrupted run finished and the final counts are bit-identical
to an uninterrupted run (noise is counter-seeded).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Literal
import fsspec
import numpy as np
import pyarrow as pa

from pipeline.cascade import AlphaMode, undecided_mask
from pipeline.counts import counts_to_arrays
from pipeline.errors import UserError
from pipeline.models.spec import ModelSpec
from pipeline.prediction import predict_cascade
from pipeline.shards import read_shards

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SamplingConfig:
    """Everything that determines the counts; a resume must use the same values."""

    sigmas: tuple[float, ...]
    n_select: int
    n: int
    seed: int
    alpha: float
    alpha_mode: AlphaMode
    p0: float
    all_scales: bool
    task: Literal["certify", "predict"] = "certify"
    adaptive: bool = False  # n is then n_max (pipeline/adaptive.py)
    radius_tolerance: float = 0.05


@dataclass(frozen=True)
class ExecutionConfig:
    """How the work is spread; changing these never changes a count."""

    num_actors: int
    images_per_batch: int
    samples_per_forward: int
    use_gpu: bool


def check_resume(out: str, sampling: SamplingConfig, resume: bool) -> None:
    """Write the run's sampling config to OUT/run_config.json, or on resume check it is unchanged."""
    path = f"{out.rstrip('/')}/run_config.json"
    fs, file = fsspec.core.url_to_fs(path)
    wanted = asdict(sampling)
    wanted["sigmas"] = list(wanted["sigmas"])
    if resume and fs.exists(file):
        found = json.loads(fs.cat_file(file))
        if found != wanted:
            changed = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise UserError(f"--resume with different settings than the interrupted run: {', '.join(changed)}")
    fs.pipe_file(file, json.dumps(wanted, indent=2).encode())


def _done_ids(table: pa.Table, sigma: float) -> np.ndarray:
    if table.num_rows == 0:
        return np.zeros(0, np.int64)
    sigmas = table["sigma"].to_numpy()
    return table["image_id"].to_numpy()[sigmas == sigma]


def _undecided_ids(table: pa.Table, candidates: np.ndarray, stage: int, sampling: SamplingConfig) -> np.ndarray:
    """Of `candidates` (which fell through stages < stage-1), those that also fell through stage-1,
    by the certification rule (method.md §4) or the prediction rule (§5)."""
    if stage == 0 or len(candidates) == 0:
        return candidates
    arrays = counts_to_arrays(table, sampling.sigmas)
    columns = [np.flatnonzero(arrays.sigmas == s) for s in sampling.sigmas[:stage]]
    rows = np.clip(np.searchsorted(arrays.image_ids, candidates), 0, len(arrays.image_ids) - 1)
    if any(len(c) == 0 for c in columns) or not (arrays.image_ids[rows] == candidates).all() or \
            not arrays.present[rows][:, [int(c[0]) for c in columns]].all():
        raise UserError("counts on disk are missing for images that earlier stages let fall through; "
                        "rerun with --overwrite")
    earlier = [int(c[0]) for c in columns]
    estimate = arrays.estimate_counts[rows][:, earlier]
    if sampling.task == "predict":
        _, decided_stage = predict_cascade(estimate, sampling.alpha)
        return candidates[decided_stage < 0]
    mask = undecided_mask(arrays.select_counts[rows][:, earlier], estimate, len(sampling.sigmas),
                          sampling.alpha, sampling.alpha_mode, sampling.p0)
    return candidates[mask]


def sample_counts(
    dataset,
    image_ids: np.ndarray,
    model_spec: ModelSpec,
    sampling: SamplingConfig,
    execution: ExecutionConfig,
    counts_dir: str,
) -> pa.Table:
    """Run the Ray Data stages, writing shards to `counts_dir`; returns every counts row."""
    image_ids = np.unique(np.asarray(image_ids, dtype=np.int64))
    if sampling.adaptive:
        from pipeline.adaptive import AdaptiveSettings
        from pipeline.adaptive_actor import run_adaptive_pass

        settings = AdaptiveSettings(tuple(sampling.sigmas), sampling.n_select, sampling.n, sampling.alpha,
                                    sampling.p0, sampling.radius_tolerance)
        return run_adaptive_pass(dataset, image_ids, model_spec, settings, sampling.seed, execution, counts_dir)
    passes = [sampling.sigmas] if sampling.all_scales else [(s,) for s in sampling.sigmas]
    wanted = image_ids
    for stage, sigmas in enumerate(passes):
        on_disk = read_shards(counts_dir)
        if not sampling.all_scales:
            wanted = _undecided_ids(on_disk, wanted, stage, sampling)
        done = set(_done_ids(on_disk, sigmas[-1]).tolist())
        todo = np.array([i for i in wanted.tolist() if i not in done], dtype=np.int64)
        label = "all scales" if sampling.all_scales else f"sigma={sigmas[0]:g}"
        logger.info("%s: %d image(s) to sample, %d already on disk", label, len(todo), len(wanted) - len(todo))
        print(f"[mdds] {label}: sampling {len(todo)} image(s) ({len(wanted) - len(todo)} already done)", flush=True)
        if len(todo):
            _run_pass(dataset, todo, model_spec, sigmas, sampling, execution, counts_dir)
    return rows_of(counts_dir, image_ids)


def _forward_env(name: str) -> dict:
    """Ray options handing the driver's value of `name` to the actors: workers inherit the environment
    only of the process that started Ray, not of a driver joining a running instance or a cluster."""
    value = os.environ.get(name)
    return {"runtime_env": {"env_vars": {name: value}}} if value else {}


def _run_pass(dataset, todo: np.ndarray, model_spec: ModelSpec, sigmas: tuple[float, ...],
              sampling: SamplingConfig, execution: ExecutionConfig, counts_dir: str) -> None:
    from pipeline.actor import FAIL_ONCE_ENV, CountActor

    written = run_actors(dataset, todo, CountActor, dict(
        model_spec=model_spec, sigmas=sigmas, n_select=sampling.n_select, n=sampling.n,
        seed=sampling.seed, batch_size=execution.samples_per_forward, counts_dir=counts_dir,
    ), execution, **_forward_env(FAIL_ONCE_ENV))
    logger.info("wrote %d counts rows", written)


def run_actors(dataset, todo: np.ndarray, actor_class: type, constructor_kwargs: dict, execution: ExecutionConfig,
               **ray_options) -> int:
    """Feed the images of `todo` to a pool of `actor_class` (each call writes its shard and returns
    {"rows": [n]}); returns the rows written. Ray Data restarts dead actors and retries their batches
    by default (max_restarts=-1)."""
    import ray.data

    todo_set = pa.array(todo, pa.int64())

    def keep_todo(batch: pa.Table) -> pa.Table:
        return batch.filter(pa.compute.is_in(batch["image_id"], value_set=todo_set))

    # num_cpus=0: this cheap filter must never wait for a core held by an actor. Ray Data usually fuses
    # it into the actor stage, but not when that stage has its own runtime_env (fault injection), and
    # then one CPU actor per core would starve it forever.
    subset = dataset.map_batches(keep_todo, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0)
    counted = subset.map_batches(
        actor_class,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=execution.images_per_batch,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=execution.num_actors),
        num_gpus=1 if execution.use_gpu else 0,
        num_cpus=0 if execution.use_gpu else 1,
        **ray_options,
    )
    return sum(int(row["rows"]) for row in counted.iter_rows())


def rows_of(counts_dir: str, image_ids: np.ndarray) -> pa.Table:
    """The counts rows on disk that belong to `image_ids` (a resumed OUT may hold others)."""
    table = read_shards(counts_dir)
    return table.filter(pa.compute.is_in(table["image_id"], value_set=pa.array(image_ids)))

