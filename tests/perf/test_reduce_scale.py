"""The reduce-at-scale tooling (pipeline/perf/reduce_scale.py) at a tiny size: the synthetic counts have
the run's shape and are deterministic, both reduces certify them identically, and a measured process
reports its own peak memory."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import CertifyConfig
from pipeline.perf.reduce_scale import (
    measure_python,
    measure_reduce,
    reduce_counts_location,
    write_synthetic_counts,
)
from pipeline.store.counts import counts_to_arrays, read_counts


def test_synthetic_counts_have_the_run_shape_and_are_deterministic(tmp_path):
    shards = write_synthetic_counts(str(tmp_path / "a"), 37, num_classes=50, n_select=10, n=200, images_per_shard=8)
    write_synthetic_counts(str(tmp_path / "b"), 37, num_classes=50, n_select=10, n=200, images_per_shard=8)
    write_synthetic_counts(str(tmp_path / "c"), 37, num_classes=50, n_select=10, n=200, images_per_shard=8, seed=1)
    assert shards == 5 and len(list((tmp_path / "a").iterdir())) == 5
    assert read_counts(str(tmp_path / "a")).equals(read_counts(str(tmp_path / "b")))
    assert not read_counts(str(tmp_path / "a")).equals(read_counts(str(tmp_path / "c")))
    arrays = counts_to_arrays(read_counts(str(tmp_path / "a")))
    assert arrays.select_counts.shape == (37, 3, 50) and arrays.present.all()
    np.testing.assert_array_equal(arrays.image_ids, np.arange(37))
    assert (arrays.select_counts.sum(axis=2) == 10).all() and (arrays.estimate_counts.sum(axis=2) == 200).all()
    top_share = arrays.estimate_counts.max(axis=2) / 200
    assert np.median(top_share) > 0.3  # concentrated on a favoured class, as a classifier's votes are
    assert ((arrays.estimate_counts > 0).sum(axis=2) < 50).mean() > 0.5  # most classes get no vote


def test_both_reduces_certify_alike_in_a_fresh_process(tmp_path):
    write_synthetic_counts(str(tmp_path), 40, num_classes=30, images_per_shard=16)
    config = CertifyConfig(sigmas=(1.0, 0.5, 0.25), n_select=100, n=10_000)
    in_memory = reduce_counts_location(str(tmp_path), "in-memory", config)
    for images_per_group in (1, 7, 100):
        assert reduce_counts_location(str(tmp_path), "streaming", config, images_per_group) == in_memory
    assert in_memory["images"] == 40 and 0 < in_memory["certified"] <= 40
    measured = measure_reduce(str(tmp_path), "streaming", config, images_per_group=16)
    assert measured["results_sha256"] == in_memory["results_sha256"]
    assert measured["peak_rss_bytes"] > 0 and measured["process_wall_s"] >= measured["reduce_s"] > 0


def test_a_measured_process_reports_its_own_peak_memory():
    """A 400 MB child, then small ones while this process holds 400 MB itself: each peak is the child's
    own (the rusage of a child would carry this process's peak over fork and exec)."""
    big = measure_python(["-c", "import sys, numpy as np; a = np.ones(50_000_000); print(a.sum(), sys.argv[1:])", "x"])
    assert big.stdout.strip() == "50000000.0 ['x']" and big.peak_rss_bytes > 400e6 and big.cpu_s > 0
    held = np.ones(50_000_000)
    small = measure_python(["-c", "print(1)"])
    module = measure_python(["-m", "json.tool", "--help"])
    assert small.stdout == "1\n" and "json.tool" in module.stdout
    assert small.peak_rss_bytes < 100e6 and module.peak_rss_bytes < 100e6, (small, module)
    assert held.sum() == 50_000_000
    with pytest.raises(RuntimeError, match="exited with 3"):
        measure_python(["-c", "import sys; sys.exit(3)"])


def test_a_measured_script_runs_as_the_interpreter_would_run_it(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import sys\nif __name__ == '__main__':\n    print(sys.argv)\n")
    measured = measure_python([str(script), "--out", "x"])
    assert measured.stdout.strip() == str([str(script), "--out", "x"]) and measured.peak_rss_bytes > 0
    with pytest.raises(ValueError, match="script.py"):
        measure_python(["job.txt"])
