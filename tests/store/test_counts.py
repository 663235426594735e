"""The counts table contract and the reduce job on hand-made counts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import CascadeRule
from pipeline.stats.cascade import certify_cascade
from pipeline.store.counts import COUNTS_SCHEMA, counts_table, counts_to_arrays, read_counts
from pipeline.errors import UserError
from pipeline.app.presets import get_preset, parse_sigmas
from pipeline.store.results import RESULTS_SCHEMA
from tests.conftest import REPO_ROOT


def hand_made_counts() -> pa.Table:
    """Three images, two scales; rows deliberately out of order."""
    rows = [  # image_id, label, sigma, select, estimate
        (7, 1, 0.25, [0, 20, 0], [5, 95, 0]),
        (3, 0, 0.5, [20, 0, 0], [99, 1, 0]),
        (7, 1, 0.5, [10, 10, 0], [300, 350, 350]),
        (5, 2, 0.5, [0, 0, 20], [50, 0, 50]),
    ]
    ids, labels, sigmas, select, estimate = zip(*rows)
    return counts_table(np.array(ids), np.array(labels), np.array(sigmas), np.array(select), np.array(estimate))


def test_counts_table_has_the_exact_schema():
    assert hand_made_counts().schema == COUNTS_SCHEMA


def test_pivot_orders_scales_high_to_low_and_marks_missing():
    arrays = counts_to_arrays(hand_made_counts())
    np.testing.assert_array_equal(arrays.image_ids, [3, 5, 7])
    np.testing.assert_array_equal(arrays.labels, [0, 2, 1])
    np.testing.assert_array_equal(arrays.sigmas, [0.5, 0.25])
    np.testing.assert_array_equal(arrays.present, [[True, False], [True, False], [True, True]])
    np.testing.assert_array_equal(arrays.estimate_counts[2, 1], [5, 95, 0])


def test_duplicate_rows_are_rejected():
    table = hand_made_counts()
    with pytest.raises(UserError, match="duplicate"):
        counts_to_arrays(pa.concat_tables([table, table.slice(0, 1)]))


def test_wrong_schema_is_rejected(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_id": [1], "sigma": [0.5]}), path)
    with pytest.raises(UserError, match="missing column"):
        read_counts(path)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="cannot read"):
        read_counts(garbage)


def run_reduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/reduce.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_reduce_job_on_hand_made_counts(tmp_path):
    counts = tmp_path / "counts.parquet"
    pq.write_table(hand_made_counts(), counts)
    out = tmp_path / "results.parquet"
    # The rows are those of a published-cascade early exit: image 5 is undecided at 0.5 and has no 0.25
    # row, which the default routing (continue) would need.
    done = run_reduce(str(counts), "--out", str(out), "--alpha", "0.01")
    assert done.returncode == 2 and "1 of 3 image(s) lack the counts their routing needs (ids 5)" in done.stderr
    done = run_reduce(str(counts), "--out", str(out), "--alpha", "0.01", "--routing", "cascade")
    assert done.returncode == 0, done.stderr
    results = pq.read_table(out)
    assert results.schema == RESULTS_SCHEMA
    arrays = counts_to_arrays(hand_made_counts())
    expected = certify_cascade(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, CascadeRule(alpha=0.01))
    np.testing.assert_array_equal(results["image_id"].to_numpy(), [3, 5, 7])
    np.testing.assert_array_equal(results["prediction"].to_numpy(), expected.prediction)
    np.testing.assert_allclose(results["radius"].to_numpy(), expected.radius)
    # image 3 certified at 0.5; image 5 undecided at 0.5 (abstain); image 7 falls through to 0.25
    assert results["prediction"].to_pylist() == [0, -1, 1]
    assert results["sigma"].to_pylist() == [0.5, 0.5, 0.25]
    assert results["correct"].to_pylist() == [True, False, True]


def test_reduce_job_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"x": [1]}), bad)
    done = run_reduce(str(bad), "--out", str(tmp_path / "r.parquet"))
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and done.stderr.count("\n") == 1
    existing = tmp_path / "exists.parquet"
    existing.write_bytes(b"keep me")
    counts = tmp_path / "counts.parquet"
    pq.write_table(hand_made_counts(), counts)
    done = run_reduce(str(counts), "--out", str(existing))
    assert done.returncode == 2 and existing.read_bytes() == b"keep me"


def test_presets_and_sigma_parsing():
    assert get_preset("digits").num_classes == 10
    with pytest.raises(UserError, match="unknown preset"):
        get_preset("mnist")
    assert parse_sigmas("0.25, 1.0,0.5") == (1.0, 0.5, 0.25)
    for bad in ("a,b", "0.5,-1", "0.5,0.5", "", "nan"):
        with pytest.raises(UserError):
            parse_sigmas(bad)


def test_reduce_counts_every_scale_of_the_run_in_the_alpha_split(tmp_path):
    """Early exit can leave lower scales without rows; the union split must still count them."""
    table = counts_table(np.array([0, 1]), np.array([1, 1]), np.array([0.5, 0.5]),
                         np.array([[0, 20], [0, 20]]), np.array([[3, 97], [10, 90]]))
    counts = tmp_path / "counts.parquet"
    pq.write_table(table, counts)
    three, one = tmp_path / "three.parquet", tmp_path / "one.parquet"
    assert run_reduce(str(counts), "--out", str(three), "--sigmas", "0.5,0.25,0.125").returncode == 0
    assert run_reduce(str(counts), "--out", str(one)).returncode == 0
    zeros = np.zeros((2, 2, 2), np.int64)
    select = np.concatenate([np.array([[[0, 20]], [[0, 20]]]), zeros], axis=1)
    estimate = np.concatenate([np.array([[[3, 97]], [[10, 90]]]), zeros], axis=1)
    expected = certify_cascade(select, estimate, [0.5, 0.25, 0.125], CascadeRule(alpha=0.001))
    np.testing.assert_allclose(pq.read_table(three)["radius"].to_numpy(), expected.radius)
    assert (pq.read_table(three)["radius"].to_numpy() < pq.read_table(one)["radius"].to_numpy()).all()


def test_reduce_over_a_subset_of_scales(tmp_path):
    """Bare counts: dropping a scale is allowed only when every image has every scale."""
    counts = tmp_path / "counts.parquet"
    pq.write_table(hand_made_counts(), counts)
    out = tmp_path / "subset.parquet"
    done = run_reduce(str(counts), "--out", str(out), "--sigmas", "0.5")
    assert done.returncode == 2 and "not every image of these bare counts has every scale" in done.stderr
    complete = hand_made_counts().filter(pc.equal(hand_made_counts()["image_id"], 7))
    pq.write_table(complete, counts)
    done = run_reduce(str(counts), "--out", str(out), "--sigmas", "0.5", "--routing", "cascade")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out)["sigma"].to_pylist() == [None]  # image 7 falls through 0.5 alone


def test_shards_repeating_identical_rows_read_once_and_conflicting_rows_stay(tmp_path):
    """A killed run's late actor can rewrite rows a resume already recomputed: identical copies collapse
    (counts are deterministic); a row that differs stays, for counts_to_arrays to refuse."""
    from pipeline.store.shards import read_shards

    rows = pa.table({"image_id": [1, 2], "label": [0, 1], "sigma": [0.5, 0.5],
                     "select_counts": [[1, 2], [3, 4]], "estimate_counts": [[5, 6], [7, 8]]}).cast(COUNTS_SCHEMA)
    pq.write_table(rows, tmp_path / "part-a.parquet")
    pq.write_table(rows.slice(1), tmp_path / "part-b.parquet")
    assert read_shards(str(tmp_path)).sort_by("image_id").equals(rows)
    pq.write_table(rows.slice(1).set_column(4, "estimate_counts", pa.array([[7, 9]], pa.list_(pa.int64()))),
                   tmp_path / "part-c.parquet")
    assert read_shards(str(tmp_path)).num_rows == 3
