"""A worker node lost mid-run (issue 23 part 3): certification and fine-tuning on a multi-node Ray cluster
survive it.

The cluster (tests/distributed/local_cluster.py) is a head and two worker nodes of one CPU each on this
machine, every node bound to 127.0.0.1. The jobs join it through RAY_ADDRESS as real subprocesses; once
a worker node runs part of the job, every process of that node (raylet, agents, workers) is SIGKILLed at
once, as if its machine vanished.

- certify: the node's actor is inside a batch. Ray Data restarts the actor on a node that is left and
  retries the batch, so the run ends with the counts and results.parquet of an uninterrupted run (fp32
  counts do not depend on batching or on where a batch ran). The uninterrupted reference runs in this
  process on the test session's local Ray, cheaper than a second job subprocess.
- fine-tuning: a training worker's node, once Ray Train has taken a
  mid-epoch checkpoint. A replacement node joins (as an autoscaler would start one) and Ray Train restarts
  the worker group from that checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.finetune.weights import OPTIMIZER_FILE
from tests.conftest import REPO_ROOT
from tests.distributed.local_cluster import LocalCluster, NodeProcesses
from tests.distributed.test_resume import assert_same_run
from tests.finetune.test_finetune import latest_checkpoint, tiny_models  # noqa: F401  (tiny_models: a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")]

# 16 images in 4 batches on 2 actors; fp32, so the counts are the same whatever ran each batch
SETTINGS = ("--num-images", "16", "--n", "200", "--n-select", "20", "--images-per-batch", "4", "--num-actors", "2",
            "--precision", "fp32")
# Ray names a worker process after what it runs: `ray::<actor class>.<method>` while in a method
IN_BATCH_TITLE = "ray::MapWorker(MapBatches(CascadeActor)).submit"
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
# one epoch of 10 steps per worker, a checkpoint every 2: the kill lands mid-epoch
FINETUNE = ("--num-workers", "2", "--batch-size", "64", "--probe-images", "8", "--probe-samples", "4", "--epochs", "1",
            "--checkpoint-every", "2")
BASE_PROBE_LINE = re.compile(r"pid=(\d+)\S*\s+base denoiser:")  # "(RayTrainWorker pid=…) base denoiser: …"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster(worker_nodes=2)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, digits_cache, ray_session) -> Path:
    """The uninterrupted run every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("clean") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["certify.py", *SETTINGS, "--out", str(out)])
        runpy.run_path(str(REPO_ROOT / "jobs" / "certify.py"), run_name="__main__")
    return out


def process_titles(node: NodeProcesses) -> list[str]:
    """The command lines (Ray rewrites them into titles) of the node's workers and agents."""
    titles = []
    for child in psutil.Process(node.raylet).children(recursive=True):
        try:
            titles.append(" ".join(child.cmdline()).strip())
        except psutil.Error:  # ended meanwhile
            continue
    return titles


@contextmanager
def job_on(cluster: LocalCluster, log: Path, *args: str, **env: str) -> Iterator[subprocess.Popen]:
    """`python <args>` from the repository root, joined to the cluster, in a process group of its own
    that is SIGKILLed if still running when the block ends."""
    with log.open("wb") as output:
        job = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=dict(cluster.env, **env), stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def wait_for_worker_node(cluster: LocalCluster, job: subprocess.Popen, log: Path, title: str,
                         ready: Callable[[], bool] = lambda: True, timeout_s: float = JOB_TIMEOUT_S) -> NodeProcesses:
    """The first worker node seen running a process titled `title...` once `ready()` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            for node in cluster.worker_nodes:
                if any(seen.startswith(title) for seen in process_titles(node)):
                    return node
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before a worker node ran {title}:\n" \
                                   f"{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no worker node ran {title} in time; titles seen: " \
                                            f"{[process_titles(node) for node in cluster.worker_nodes]}"
        time.sleep(0.05)


def finish(job: subprocess.Popen, log: Path) -> str:
    """Wait for the job to succeed; returns its output."""
    job.wait(timeout=JOB_TIMEOUT_S)
    output = log.read_text()
    assert job.returncode == 0, output[-5000:]
    return output


def checkpoint_registered(out: Path) -> bool:
    """Whether Ray Train has taken a checkpoint of the run in OUT as the one a restarted group starts from.
    A checkpoint's files exist before that: a group that fails in between starts from the previous one."""
    for snapshot in out.glob("ray_results/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            continue
    return False


def test_worker_node_lost_mid_batch_gives_the_clean_results(cluster, clean_run, digits_cache, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    with job_on(cluster, log, "jobs/certify.py", *SETTINGS, "--out", str(out), MDDS_CACHE_DIR=str(digits_cache)) as job:
        cluster.kill_node(wait_for_worker_node(cluster, job, log, IN_BATCH_TITLE))
        finish(job, log)

    assert_same_run(out, clean_run)


def test_worker_node_lost_mid_epoch_restarts_training_from_the_checkpoint(cluster, tiny_models, tmp_path):
    """Two training workers of one CPU each and one CPU for Ray Data's tasks (pipeline/finetune/trainer.py):
    the cluster gets a node more, and a replacement for the one killed."""
    denoiser_dir, classifier_path = tiny_models
    out, log = tmp_path / "out", tmp_path / "job.log"
    cluster.add_node()
    with job_on(cluster, log, "jobs/finetune_diffusion.py", "--out", str(out), *FINETUNE, "--denoiser",
                str(denoiser_dir), "--classifier", str(classifier_path)) as job:
        cluster.kill_node(wait_for_worker_node(cluster, job, log, TRAIN_WORKER_TITLE,
                                               ready=lambda: checkpoint_registered(out)))
        assert not (out / "denoiser").exists(), "the run had already ended: nothing was interrupted"
        cluster.add_node()
        output = finish(job, log)

    # exactly one epoch's steps, optimizer state included (a group restarted afresh would pass these too;
    # the probe line below tells)
    last = latest_checkpoint(Path(json.loads((out / "run.json").read_text())["storage_path"]))
    progress = json.loads((last / "training.json").read_text())
    steps_per_epoch = (progress["settings"]["train_rows"] // 2) // 64
    assert steps_per_epoch > 2
    assert (progress["epoch"], progress["step"], progress["epoch_step"]) == (1, steps_per_epoch, 0)
    adam_steps = {float(s["step"]) for s in torch.load(last / OPTIMIZER_FILE, weights_only=True)["state"].values()}
    assert adam_steps == {float(steps_per_epoch)}
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0, 1]
    # rank 0 probes the base denoiser only when it starts without a checkpoint: one worker process did, so
    # the restarted group continued from a checkpoint (and skipped the batches it covered)
    assert len(set(BASE_PROBE_LINE.findall(output))) == 1, output[-5000:]
    assert (out / "denoiser").is_dir()
