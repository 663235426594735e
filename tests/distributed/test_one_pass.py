"""A run is one Ray Data execution with a bounded number of Ray worker processes (issue 12).

The early-exit cascade is routed inside the actors, so the driver starts exactly one dataset
execution whatever the number of scales; the dataset is built from the images still to do with
blocks sized to the actor pool, so no per-block task storm starts idle workers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.app.args import build_parser, request_from_args
from pipeline.app.certify import certify
from pipeline.perf.processes import PeakRayWorkers
from pipeline.stats.cascade import needs_next_stage
from pipeline.store.counts import counts_to_arrays, read_counts

pytestmark = pytest.mark.slow
SIGMAS = (1.0, 0.5, 0.25)


@pytest.fixture()
def executions(monkeypatch) -> list[str]:
    """Names of the Ray Data executions the driver starts while the test runs."""
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    started: list[str] = []
    original = StreamingExecutor.execute

    def counted(self, *args, **kwargs):
        started.append(getattr(self, "_dataset_id", "dataset"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StreamingExecutor, "execute", counted)
    return started


def test_a_100_image_early_exit_run_is_one_execution_with_few_workers(digits_cache, ray_session, tmp_path,
                                                                        executions):
    out: Path = tmp_path / "out"
    args = build_parser("digits", "test").parse_args(
        ["--num-images", "100", "--n", "40", "--n-select", "10", "--sigmas", "1.0,0.5,0.25", "--num-actors", "2",
         "--out", str(out)])
    request = request_from_args(args)
    with PeakRayWorkers() as workers:
        certify(request)
    assert len(executions) == 1, executions
    assert 2 <= workers.peak <= 2 + 4, f"{workers.peak} Ray worker processes for 2 actors"

    # the lower scales were sampled exactly for the images the routing rule sent there
    arrays = counts_to_arrays(read_counts(out / "counts"), SIGMAS)
    assert len(arrays.image_ids) == 100 and arrays.present[:, 0].all()
    for stage in (1, 2):
        reached = arrays.present[:, stage - 1]
        sent = np.zeros(100, dtype=bool)
        sent[reached] = needs_next_stage(arrays.select_counts[reached, :stage], arrays.estimate_counts[reached, :stage],
                                         len(SIGMAS), request.config.rule)
        np.testing.assert_array_equal(arrays.present[:, stage], sent)
    assert arrays.present[:, 1].any(), "no image reached the second scale: the routing check would be vacuous"
