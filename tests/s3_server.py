"""One S3-protocol server per test session, reached the way users reach MinIO or an on-prem store.

moto's server mode is a real HTTP server (bound to 127.0.0.1 only), so s3fs, Arrow's own S3 client and
every process a test starts talk the actual S3 protocol to it. It is found through the standard
variables, AWS_ENDPOINT_URL and the AWS credential ones, which botocore (under s3fs) and Arrow both
read; they are set in os.environ, so jobs/*.py subprocesses inherit them, and so do the workers of a
Ray instance started after this fixture (tests/conftest.py's ray_session asks for it for that reason).

Fixtures: `s3_server` (session: the endpoint, the bucket and the variables) and `s3_url` (a fresh
s3:// prefix per test, like tmp_path, so tests in any module share the server without sharing files).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "mdds-test"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    env: dict[str, str]  # the variables set for the session: pass them on where inheritance does not reach

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"


def _forget_s3_filesystems() -> None:
    """fsspec caches s3fs instances with the endpoint they were created with; drop them so none made
    before (or after) the server's lifetime is reused against the wrong endpoint."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session", autouse=True)
def s3_server() -> Iterator[S3Server]:
    """Autouse: its variables must be set before anything starts Ray (a job run in-process, Ray Train),
    whose workers keep the environment they started with."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one request line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)  # a developer's profile must not redirect the tests
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        _forget_s3_filesystems()
        import fsspec

        fsspec.filesystem("s3").mkdir(BUCKET)
        try:
            yield S3Server(env["AWS_ENDPOINT_URL"], BUCKET, env)
        finally:
            _forget_s3_filesystems()
            server.stop()


@pytest.fixture
def s3_url(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """s3://BUCKET/<test name>-<random>: empty, and no other test's."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]
    return s3_server.url(f"{name}-{uuid.uuid4().hex[:8]}")
