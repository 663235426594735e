"""`ray job submit --working-dir . -- python jobs/certify_imagenet.py …` against a real Ray head (issue 6).

The test starts its own head with `ray start --head` (free ports, its own temp dir, a token of its
own), submits the ImageNet job on a tiny setup exactly as a user would against a cluster, waits for
it, checks results.parquet, and stops only the processes it started: `ray stop` would kill every
Ray instance on the machine, so the head runs in a session of its own and teardown ends that
session's processes. The job server needs Ray's dashboard, i.e. the `ray[default]` extras.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.store.results import RESULTS_SCHEMA
from tests.conftest import REPO_ROOT
from tests.jobs.test_imagenet_job import FAVOURED_CLASS, make_diffusers_denoiser, make_imagenet_tree, save_torchscript

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")]

RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter's Ray


def job_server_missing() -> str | None:
    """Why Ray's job server cannot start here (its dashboard dependencies are missing), or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what Ray imports before starting the dashboard)
    except ImportError as error:
        return f"`ray job submit` needs the ray[default] extras (pip install 'ray[default]'): {error}"
    return None


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def session_processes(session_id: int) -> list[psutil.Process]:
    """Every process of one session (the head's daemons, its workers and the job's driver)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session_id:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def stop_session(session_id: int) -> list[int]:
    """SIGTERM the session's processes, SIGKILL what is left after 10 s; returns pids still alive."""
    processes = session_processes(session_id)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)
    return [process.pid for process in session_processes(session_id)]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, dict[str, str]]]:
    """A head with the dashboard (job server) on free ports of 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    tests/conftest.py, keeps Ray from replacing the loopback address); yields (job API address, client env)."""
    reason = job_server_missing()
    if reason:
        pytest.skip(reason)
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths must stay under 108 characters
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",  # explicit, so ~/.ray/auth_token of another cluster plays no part
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
        OMP_NUM_THREADS="1",
    )
    env.pop("RAY_ADDRESS", None)
    # A session of its own: the daemons `ray start` leaves running keep it, so its id names them all.
    head = subprocess.Popen(
        [*RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = head.communicate(timeout=300)
        if head.returncode != 0:
            pytest.fail(f"ray start failed:\n{output[-3000:]}")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        assert stop_session(head.pid) == []
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_imagenet_job(ray_head, tmp_path):
    address, env = ray_head
    setup = tmp_path / "setup"
    data = make_imagenet_tree(setup / "val")
    denoiser = make_diffusers_denoiser(setup / "ddpm")
    classifier = save_torchscript(setup / "classifier.pt", num_classes=1000)
    out = tmp_path / "out"
    submitted = subprocess.run(
        [*RAY, "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT), "--",
         "python", "jobs/certify_imagenet.py", "--data", str(data), "--denoiser", str(denoiser),
         "--classifier", str(classifier), "--num-images", "4", "--skip", "1", "--n", "16", "--n-select", "8",
         "--denoiser-fit", "resize",  # the 32x32 UNet stays at 32: cheap on a CPU
         "--out", out.as_uri()],  # a file:// URL: --out goes through fsspec as s3:// would
        env=env, capture_output=True, text=True, timeout=600,
    )
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-5000:]
    assert "succeeded" in log
    results = pq.read_table(out / "results.parquet")
    assert results.schema == RESULTS_SCHEMA
    table = results.sort_by("image_id").to_pydict()
    assert table["image_id"] == [0, 1, 2, 3] and table["label"] == [0, 0, 1, 1]
    assert table["prediction"] == [FAVOURED_CLASS] * 4  # what the classifier outputs on every input
    assert "# mdds certification report (imagenet)" in (out / "report.md").read_text()
