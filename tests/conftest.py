"""Shared fixtures: one Ray instance and one trained digits model cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"

pytest_plugins = ["tests.s3_server"]  # s3_server / s3_url: one S3-protocol server for every test module


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Ray costs ~10 s to start on 2 cores, so every test shares this one local instance (on 127.0.0.1:
    pytest_configure). Its workers inherit the environment as it is now, so the S3 server's variables are
    set first."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:"), "Ray took a non-loopback address"
    import ray.data  # noqa: F401  its log handlers bind sys.stderr on import: the session's, not one test's capture
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """The embedded digits models, trained once per session with the real default settings into a
    fresh cache (so CI checks first-use training too); subprocess jobs see it via MDDS_CACHE_DIR.
    MDDS_TEST_CACHE_DIR names a cache to reuse instead, for quick local reruns. Under pytest-xdist the
    workers share one (the training takes a file lock, pipeline/models/digits.py)."""
    from pipeline.models.digits import digits_classifier_dir, digits_denoiser_dir

    reuse = os.environ.get("MDDS_TEST_CACHE_DIR")
    if reuse:
        cache = Path(reuse)
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # the cache the controller trained (pytest_sessionstart)
        cache = tmp_path_factory.getbasetemp().parent / "mdds-cache"
    else:
        cache = tmp_path_factory.mktemp("mdds-cache")
    os.environ["MDDS_CACHE_DIR"] = str(cache)
    digits_denoiser_dir(progress=False)
    digits_classifier_dir(progress=False)
    return cache


def is_xdist_controller(config) -> bool:
    """The pytest-xdist process that only hands out modules; the workers (or a plain run) run tests."""
    return not hasattr(config, "workerinput") and getattr(config.option, "numprocesses", None) not in (None, 0)


def pytest_configure(config):
    """Every Ray a test starts listens on 127.0.0.1 only, and one thread wherever tests run.

    Ray: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read when ray is imported; the processes the tests start
    inherit it) Ray takes the loopback address as the node's, as it does on macOS and Windows, instead of the
    machine's routable one: the session's local Ray, a job's own local Ray, `ray start --head`.

    Threads: the two xdist workers share the two cores, and a torch or OpenMP pool sized to the machine
    spins against the other worker's (in-process models, and the jobs a test starts, which inherit
    OMP_NUM_THREADS; small batches ran ~5× slower). Ray's actors already run one thread each (num_cpus=1)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if is_xdist_controller(config):
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def pytest_sessionstart(session):
    """Under pytest-xdist, train the digits models once in the controller, on both cores, before the
    workers start: trained inside a worker, the training shares the cores with the other worker's tests
    (187 s instead of about 80) while every test that needs the models waits for its lock."""
    config = session.config
    if not is_xdist_controller(config) or os.environ.get("MDDS_TEST_CACHE_DIR"):
        return
    from pipeline.models.digits import digits_classifier_dir, digits_denoiser_dir

    cache = config._tmp_path_factory.getbasetemp() / "mdds-cache"
    digits_denoiser_dir(root=cache, progress=False)
    digits_classifier_dir(root=cache, progress=False)


# The modules that take longest (Ray Train, killed and resumed jobs, local clusters), longest first, as timed
# under `-n 2` on 2 cores.
HEAVY_MODULES = (
    "tests/jobs/test_certify_job.py", "tests/distributed/test_node_loss.py", "tests/jobs/test_object_storage_jobs.py",
    "tests/distributed/test_resume.py", "tests/finetune/test_finetune_real_layouts.py", "tests/jobs/test_imagenet_job.py",
    "tests/stats/test_sequential.py", "tests/distributed/test_ray_submit.py", "tests/test_api.py",
    "tests/distributed/test_one_pass.py", "tests/jobs/test_bad_inputs.py", "tests/perf/test_benchmark.py",
    "tests/test_docs_examples.py", "tests/jobs/test_reduce_job.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Longest modules first: pytest-xdist gives each worker whole modules (--dist loadfile) in this
    order (--no-loadscope-reorder: by default it orders modules by their number of tests), so the last
    ones to run are short and neither core idles through a long tail."""
    rank = {module: index for index, module in enumerate(HEAVY_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
