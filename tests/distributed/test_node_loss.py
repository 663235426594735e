"""A worker node lost mid-batch (issue 23 part 3): the certify job on a multi-node Ray cluster survives it.

The cluster (tests/distributed/local_cluster.py) is a head and two worker nodes of one CPU each on this
machine, every node bound to 127.0.0.1. `jobs/certify.py` joins it through RAY_ADDRESS as a real
subprocess; as soon as the actor on a worker node is inside a batch, every process of that node (raylet,
agents, workers) is SIGKILLed at once, as if its machine vanished. Ray Data restarts the actor on a node
that is left and retries the batch, so the run must end with the counts and the results.parquet of an
uninterrupted run: fp32 counts do not depend on batching or on where a batch ran. The uninterrupted
reference runs in this process on the test session's local Ray (cheaper than a second job subprocess).
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO_ROOT
from tests.distributed.local_cluster import LocalCluster, NodeProcesses
from tests.distributed.test_resume import assert_same_run

pytestmark = pytest.mark.slow

# 16 images in 4 batches on 2 actors; fp32, so the counts are the same whatever ran each batch
SETTINGS = ("--num-images", "16", "--n", "200", "--n-select", "20", "--images-per-batch", "4", "--num-actors", "2",
            "--precision", "fp32")
# Ray's title for the process of a Ray Data actor while it runs a batch (`ray::<actor class>.<method>`)
IN_BATCH_TITLE = "ray::MapWorker(MapBatches(CascadeActor)).submit"


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


def node_in_a_batch(cluster: LocalCluster, job: subprocess.Popen, log: Path, timeout_s: float) -> NodeProcesses:
    """The first worker node seen with an actor inside a batch."""
    deadline = time.monotonic() + timeout_s
    while True:
        for node in cluster.worker_nodes:
            if any(title.startswith(IN_BATCH_TITLE) for title in process_titles(node)):
                return node
        assert job.poll() is None, f"the job ended (exit {job.returncode}) before an actor on a worker node " \
                                   f"started a batch:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no actor on a worker node started a batch in time; titles seen: " \
                                            f"{[process_titles(node) for node in cluster.worker_nodes]}"
        time.sleep(0.05)


def test_worker_node_lost_mid_batch_gives_the_clean_results(cluster, clean_run, digits_cache, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    with log.open("wb") as output:
        job = subprocess.Popen([sys.executable, "jobs/certify.py", *SETTINGS, "--out", str(out)], cwd=REPO_ROOT,
                               env=dict(cluster.env, MDDS_CACHE_DIR=str(digits_cache)), stdout=output,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        node = node_in_a_batch(cluster, job, log, timeout_s=240)
        cluster.kill_node(node)
        assert not (out / "results.parquet").exists(), "the run had already ended: nothing was interrupted"
        job.wait(timeout=240)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    assert job.returncode == 0, log.read_text()[-5000:]
    assert_same_run(out, clean_run)
