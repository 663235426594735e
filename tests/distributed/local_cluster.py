"""A multi-node Ray cluster on this machine, every node bound to 127.0.0.1, whose nodes a test can kill and add.

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
        from tests.distributed.test_ray_submit import free_ports  # the cluster process needs none of it

        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.distributed.local_cluster", str(worker_nodes), *map(str, free_ports(2))],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            started = self._reply()
        except BaseException:
            self.stop()
            raise
        self.address: str = started["address"]
        self.nodes = [NodeProcesses(node["raylet"], tuple(node["daemons"])) for node in started["nodes"]]
        self.env = dict(env, RAY_ADDRESS=self.address)

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the local cluster process ended (exit {self.process.wait()})")
        return json.loads(line)

    @property
    def worker_nodes(self) -> list[NodeProcesses]:
        """The live nodes but the head (nodes[0])."""
        return self.nodes[1:]

    def add_node(self) -> NodeProcesses:
        """Start one more worker node (as an autoscaler replaces a lost one) and wait until it is up."""
        self.process.stdin.write("add\n")
        self.process.stdin.flush()
        reply = self._reply()
        node = NodeProcesses(reply["raylet"], tuple(reply["daemons"]))
        self.nodes.append(node)
        return node

    def kill_node(self, node: NodeProcesses) -> None:
        """SIGKILL every process of `node` at once, as if its machine vanished: its workers, its agents,
        its raylet; the node leaves `nodes`."""
        self.nodes.remove(node)
        raylet = psutil.Process(node.raylet)
        processes = [*raylet.children(recursive=True), raylet, *map(psutil.Process, node.daemons)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue

    def stop(self) -> None:
        """End every process of the cluster at once and remove its files; safe to call more than once.
        Closing stdin makes the cluster process SIGKILL its process group (nothing in it is worth a
        graceful stop: on SIGTERM a node drains for up to 30 s); what left that group but not the
        session is killed here."""
        from tests.distributed.test_ray_submit import session_processes  # the cluster process needs none of it

        if not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
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


def main(worker_nodes: int, dashboard_port: int, head_agent_port: int) -> None:
    """Start the nodes and print their address and processes as one JSON line; then start a worker node
    for each `add` line read and print its processes. When stdin ends (the test is done, or died), SIGKILL
    the process group: this process and every node's.

    Ray's fixed default ports are replaced by free ones (Cluster itself does so for the worker nodes'
    agents): the dashboard's 8265 and the head agent's 52365 may belong to another Ray instance on the
    machine, which Ray Train's state queries would then reach with this cluster's token."""
    from ray.cluster_utils import Cluster

    node_args = dict(node_ip_address=LOOPBACK, num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
    head_args = dict(node_args, dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                     dashboard_agent_listen_port=head_agent_port, no_monitor=True,  # no autoscaler
                     _system_config=HEALTH_CHECKS)
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    nodes = [cluster.head_node, *(cluster.add_node(**node_args) for _ in range(worker_nodes))]

    def processes(node) -> dict:
        pids = {name: [info.process.pid for info in infos] for name, infos in node.all_processes.items()}
        (raylet,) = pids.pop("raylet")
        return {"raylet": raylet, "daemons": [pid for group in pids.values() for pid in group]}

    print(json.dumps({"address": cluster.address, "nodes": [processes(node) for node in nodes]}), flush=True)
    for line in sys.stdin:
        if line.strip() != "add":
            raise ValueError(f"unknown command {line.strip()!r}; the one command is 'add'")
        print(json.dumps(processes(cluster.add_node(**node_args))), flush=True)
    os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
