"""Launch the fine-tuning on Ray Train: one worker per GPU (or CPU worker), checkpoints to any fsspec storage."""

from __future__ import annotations

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.errors import UserError
from pipeline.finetune.train_loop import FinetuneSettings, ProbeSet, train_loop_per_worker

CHECKPOINTS_KEPT = 2
RESTARTS = 3
"""A worker group that loses a worker (a preempted spot node) restarts from the latest checkpoint this many
times within the run; past that the run fails and `--resume` continues it."""


def cluster_has_gpus() -> bool:
    """Whether workers get a GPU each: this node has one, or the cluster advertises some (GPU worker
    groups scaled to zero advertise none until they start, so a cluster run passes --device cuda)."""
    import torch

    return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0


def worker_resources(num_workers: int, use_gpu: bool) -> dict[str, float]:
    """One GPU (and a CPU) per GPU worker. CPU workers share what is left after one CPU for Ray Data's
    read and decode tasks: with every CPU held by a worker those tasks never start and training waits
    on its first batch forever (2 workers on a 2-core machine)."""
    if use_gpu:
        return {"CPU": 1.0, "GPU": 1.0}
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return {"CPU": min(1.0, max(cpus - 1.0, 0.5) / num_workers)}


def run_config(storage_path: str, name: str) -> ray.train.RunConfig:
    """Checkpoints under storage_path/name. A URL goes through its fsspec filesystem (any scheme fsspec
    knows: s3://, gs://, abfs://, file://), so Ray Train needs no storage support of its own for it."""
    storage_filesystem = None
    if "://" in storage_path:
        import fsspec

        from pipeline.data.filesystems import pyarrow_filesystem

        try:
            fs, storage_path = fsspec.core.url_to_fs(storage_path)
        except (ImportError, ValueError) as error:  # unknown scheme, or its backend (s3fs, gcsfs) missing
            raise UserError(f"--storage-path: cannot open {storage_path}: {error}") from error
        storage_filesystem = pyarrow_filesystem(fs)
    return ray.train.RunConfig(storage_path=storage_path, storage_filesystem=storage_filesystem, name=name,
                               checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                               failure_config=ray.train.FailureConfig(max_failures=RESTARTS))


def fit(settings: FinetuneSettings, probe: ProbeSet, dataset: ray.data.Dataset, num_workers: int, use_gpu: bool,
        storage_path: str, name: str) -> ray.train.Result:
    """Train; a run whose storage already holds checkpoints of `name` continues from the latest one."""
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings, "probe": probe},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker=worker_resources(num_workers, use_gpu)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=run_config(storage_path, name),
        datasets={"train": dataset},  # Ray Train gives every worker its own equal shard
    )
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as error:
        # A worker's UserError (e.g. a checkpoint that does not fit) is still one line for the user:
        # re-raised as itself, run_main prints it.
        for failure in error.worker_failures.values():
            cause = failure if isinstance(failure, UserError) else getattr(failure, "cause", None)
            if isinstance(cause, UserError):
                raise cause from error
        raise
