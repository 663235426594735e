"""Comparing runs (pipeline/app/compare.py, jobs/compare.py): the table's numbers are the runs' own, and
runs that cannot be compared are refused in one line. Hand-made outputs; no Ray, no models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.app.compare import compare
from pipeline.errors import UserError
from pipeline.stats.cascade import CascadeResult
from pipeline.store.atomic import write_parquet
from pipeline.store.counts import counts_table
from pipeline.store.results import results_table
from pipeline.store.shards import write_shard
from tests.conftest import REPO_ROOT

SIGMAS = np.array([0.5, 0.25])
RADII = (0.0, 0.25, 0.5)
NUM_CLASSES = 3


def make_run(out: Path, seed: int, ids=np.arange(8), labels=None, with_counts: bool = True) -> dict:
    """A run directory as certify leaves it (results.parquet, counts/ in two shards), from random arrays;
    returns the arrays for the exact expected numbers."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(ids) % NUM_CLASSES if labels is None else np.asarray(labels)
    prediction = np.where(rng.random(len(ids)) < 0.75, labels, (labels + 1) % NUM_CLASSES)
    prediction[rng.random(len(ids)) < 0.2] = -1
    radius = np.where(prediction >= 0, rng.uniform(0.0, 0.8, len(ids)), 0.0)
    stage = np.where(prediction >= 0, rng.integers(0, len(SIGMAS), len(ids)), -1)
    write_parquet(results_table(ids, labels, CascadeResult(prediction, radius, stage), SIGMAS),
                  str(out / "results.parquet"))
    select = estimate = np.zeros((0, NUM_CLASSES), np.int64)
    if with_counts:  # early exit: image i has rows at sigmas[: 1 + i % 2], with uneven vote totals
        rows = [(i, label, s) for i, label in zip(ids, labels) for s in SIGMAS[: 1 + i % 2]]
        row_ids, row_labels, row_sigmas = (np.array(column) for column in zip(*rows))
        select = rng.integers(0, 10, (len(rows), NUM_CLASSES))
        estimate = rng.integers(0, 100, (len(rows), NUM_CLASSES))
        half = len(rows) // 2
        for name, part in (("part-a.parquet", slice(0, half)), ("part-b.parquet", slice(half, None))):
            write_shard(counts_table(row_ids[part], row_labels[part], row_sigmas[part], select[part], estimate[part]),
                        str(out / "counts"), name)
    return {"correct": prediction == labels, "prediction": prediction, "radius": radius, "images": len(ids),
            "votes": int(select.sum() + estimate.sum())}


def expected_cells(arrays: dict, with_counts: bool = True) -> list[str]:
    """The row's cells after the name, computed from the arrays alone."""
    correct, radius = arrays["correct"], arrays["radius"]
    cells = [str(arrays["images"])]
    cells += [f"{100 * np.mean(correct & (radius >= r)):.1f}%" for r in RADII]
    cells.append(f"{np.sum(radius[correct]) / arrays['images']:.3f}")
    cells.append(f"{100 * np.mean((arrays['prediction'] >= 0) & ~correct):.1f}%")
    cells.append(f"{arrays['votes'] / arrays['images']:.1f}" if with_counts else "-")
    return cells


def parse(table: str) -> dict[str, list[str]]:
    """Markdown table → {header or run name: cells}."""
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()]
    return {"header": lines[0], **{line[0]: line[1:] for line in lines[2:]}}


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path, dict, dict]:
    first, second = tmp_path / "runs" / "first", tmp_path / "runs" / "second"
    first.mkdir(parents=True), second.mkdir(parents=True)
    return first, second, make_run(first, seed=1), make_run(second, seed=2)


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/compare.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def refused(done: subprocess.CompletedProcess, *fragments: str) -> bool:
    return (done.returncode == 2 and done.stderr.startswith("error:") and done.stderr.count("\n") == 1
            and all(f in done.stderr for f in fragments))


def test_table_holds_each_runs_exact_numbers_and_the_plot_is_written(two_runs, tmp_path: Path) -> None:
    first, second, first_arrays, second_arrays = two_runs
    table = compare([first, second], radii=RADII, to=tmp_path / "comparison")
    rows = parse(table)
    assert rows["header"] == ["run", "images", "r=0", "r=0.25", "r=0.5", "ACR", "certified wrong", "forwards/image"]
    assert rows["first"] == expected_cells(first_arrays)
    assert rows["second"] == expected_cells(second_arrays)
    assert rows["first"] != rows["second"]  # the two runs really differ: each row is read from its own run
    plot = (tmp_path / "comparison" / "comparison.png").read_bytes()
    assert plot[:4] == b"\x89PNG" and len(plot) > 1000
    assert (tmp_path / "comparison" / "comparison.md").read_text().startswith(table)


def test_a_results_file_has_no_forwards_and_names_can_be_given(two_runs) -> None:
    first, second, first_arrays, second_arrays = two_runs
    rows = parse(compare([first, second / "results.parquet"], radii=RADII, names=["a", "b"]))
    assert rows["a"] == expected_cells(first_arrays)
    assert rows["b"] == expected_cells(second_arrays, with_counts=False)


def test_a_run_without_counts_shows_a_dash(tmp_path: Path) -> None:
    arrays = make_run(tmp_path, seed=3, with_counts=False)
    assert parse(compare([tmp_path], radii=RADII))[tmp_path.name] == expected_cells(arrays, with_counts=False)


def test_file_urls_work_for_runs_and_output(two_runs, tmp_path: Path) -> None:
    first, second, _, _ = two_runs
    local = compare([first, second], radii=RADII)
    assert compare([f"file://{first}", f"file://{second}/"], radii=RADII, to=f"file://{tmp_path}/out") == local
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0


def test_the_job_prints_the_table(two_runs) -> None:
    first, second, _, _ = two_runs
    done = run_job(str(first), str(second), "--names", "a,b", "--radii", "0,0.25,0.5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == compare([first, second], radii=RADII, names=["a", "b"])


def test_a_directory_without_results_is_refused(two_runs) -> None:
    first, second, _, _ = two_runs
    (second / "results.parquet").unlink()
    assert refused(run_job(str(first), str(second)), str(second), "has no results.parquet")


def test_runs_over_different_images_are_refused(two_runs, tmp_path: Path) -> None:
    first, _, _, _ = two_runs
    other = tmp_path / "other"
    other.mkdir()
    make_run(other, seed=4, ids=np.arange(2, 11))  # 0, 1 missing; 8, 9, 10 added
    assert refused(run_job(str(first), str(other)), "different images", "3 image(s) only in other",
                   "2 only in first", "meaningless")


def test_same_ids_with_other_labels_are_different_images(two_runs, tmp_path: Path) -> None:
    first, _, _, _ = two_runs
    other = tmp_path / "other"
    other.mkdir()
    make_run(other, seed=5, labels=(np.arange(8) + 1) % NUM_CLASSES)
    with pytest.raises(UserError, match="8 with different labels"):
        compare([first, other])


def test_two_runs_with_one_name_are_refused(two_runs) -> None:
    first, _, _, _ = two_runs
    with pytest.raises(UserError, match="two runs are named 'first'"):
        compare([first, first / "results.parquet"])
