"""A multi-node Ray cluster on this machine, every node bound to 127.0.0.1, whose nodes a test can kill.

`ray start` cannot build it: on Linux it replaces `--node-ip-address 127.0.0.1` by the machine's routable
address, and with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's switch that keeps the loopback address) it
refuses to start a worker node. `ray.cluster_utils.Cluster` starts each node from its parameters, so every
node, the GCS included, listens on 127.0.0.1. The cluster lives in a process of its own
(`python -m tests.distributed.local_cluster`) in a session of its own: Ray's global state stays out of the
test process (which may hold the test session's local Ray), and teardown ends that session's processes
only, never another Ray instance on the machine (`ray stop` would end them all).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
OBJECT_STORE_BYTES = 80 * 2**20  # per node; Ray's minimum is 75 MiB, the digits runs need a few MB
# The GCS declares a silent node dead after `failure_threshold` missed health checks: with Ray's defaults
# (every 3 s, 10 s timeout, 5 misses) that takes 15 s or more; here about 5 s, which a busy machine still
# answers in time.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 3000, "health_check_failure_threshold": 5}


@dataclass(frozen=True)
class NodeProcesses:
    """The processes of one node: its raylet (whose children are the node's workers and agents) and the
    daemons the node started beside it (the head's GCS, dashboard, monitors)."""

    raylet: int
    daemons: tuple[int, ...]


class LocalCluster:
    """A head and `worker_nodes` worker nodes of one CPU each (python -m tests.distributed.local_cluster).

    `env` is what a driver needs to join it: RAY_ADDRESS, the cluster's own auth token (so a
    ~/.ray/auth_token of another cluster plays no part) and the switch that keeps Ray from replacing
    127.0.0.1 by the machine's routable address when it resolves RAY_ADDRESS."""

    def __init__(self, worker_nodes: int):
        self.temp_dir = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 108 characters
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                   RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   # the nodes' files go under $RAY_TMPDIR/ray, and so does the record of the newest cluster's
                   # address, which in the default /tmp/ray a bare ray.init() of any other process would join
                   RAY_TMPDIR=self.temp_dir, OMP_NUM_THREADS="1")
        env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.local_cluster", str(worker_nodes)],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            started = json.loads(self.process.stdout.readline() or "null")
            if started is None:
                raise RuntimeError(f"the local cluster did not start (exit {self.process.wait()})")
        except BaseException:
            self.stop()
            raise
        self.address: str = started["address"]
        self.nodes = [NodeProcesses(node["raylet"], tuple(node["daemons"])) for node in started["nodes"]]
        self.env = dict(env, RAY_ADDRESS=self.address)

    @property
    def head(self) -> NodeProcesses:
        return self.nodes[0]

    @property
    def worker_nodes(self) -> list[NodeProcesses]:
        return self.nodes[1:]

    def kill_node(self, node: NodeProcesses) -> list[int]:
        """SIGKILL every process of `node` at once, as if its machine vanished: its workers, its agents,
        its raylet. Returns the pids killed."""
        raylet = psutil.Process(node.raylet)
        processes = [*raylet.children(recursive=True), raylet, *map(psutil.Process, node.daemons)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        return [process.pid for process in processes]

    def stop(self) -> None:
        """SIGKILL every process of the cluster's session at once (nothing in it is worth a graceful stop:
        on SIGTERM a node drains for up to 30 s) and remove its files; safe to call more than once."""
        from tests.distributed.test_ray_submit import session_processes  # the cluster process needs none of it

        processes = session_processes(self.process.pid)
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(processes, timeout=10)
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert alive == [], f"processes of the local cluster survived SIGKILL: {alive}"


def main(worker_nodes: int) -> None:
    """Start the nodes, print their address and processes as one JSON line, and wait to be stopped."""
    from ray.cluster_utils import Cluster

    node_args = dict(node_ip_address=LOOPBACK, num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster = Cluster(initialize_head=True,
                      # no dashboard, autoscaler or log streaming: nothing here uses them, and each is a process
                      head_node_args=dict(node_args, include_dashboard=False, no_monitor=True,
                                          include_log_monitor=False, _system_config=HEALTH_CHECKS))
    nodes = [cluster.head_node, *(cluster.add_node(**node_args) for _ in range(worker_nodes))]

    def processes(node) -> dict:
        pids = {name: [info.process.pid for info in infos] for name, infos in node.all_processes.items()}
        (raylet,) = pids.pop("raylet")
        return {"raylet": raylet, "daemons": [pid for group in pids.values() for pid in group]}

    print(json.dumps({"address": cluster.address, "nodes": [processes(node) for node in nodes]}), flush=True)
    signal.pause()  # until LocalCluster.stop ends the session


if __name__ == "__main__":
    main(int(sys.argv[1]))
