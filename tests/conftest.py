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
    """Ray costs ~10 s to start on 2 cores, so every test shares this one local instance. Its workers
    inherit the environment as it is now, so the S3 server's variables are set first."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
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
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for every worker: the first trains, under a file lock
        cache = tmp_path_factory.getbasetemp().parent / "mdds-cache"
    else:
        cache = tmp_path_factory.mktemp("mdds-cache")
    os.environ["MDDS_CACHE_DIR"] = str(cache)
    digits_denoiser_dir(progress=False)
    digits_classifier_dir(progress=False)
    return cache
