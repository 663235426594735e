"""Resume and fault tolerance of the certify job (issue 7 parts 3-4) on the real Ray pipeline.

A resume that finds half-written or garbage shards, one that finds what a killed run leaves, and a run
whose actor dies once mid-batch must all end with exactly the counts and results of an uninterrupted run:
noise is counter-seeded, shards are content-named and written atomically, and Ray retries a dead actor's
batch (here in a resumed adaptive run; a fixed-n run's actor dies with its node in
tests/distributed/test_node_loss.py). A real `jobs/certify.py` process SIGKILLed mid-run and resumed:
tests/jobs/test_object_storage_jobs.py (its --out on the S3-protocol server). Everything here runs in
this process on the session's Ray (cheaper on two cores).
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.distributed.actor import FAIL_ONCE_ENV
from pipeline.models.precision import resolve_precision
from pipeline.stats.sequential_cascade import STOPPING_RULES
from pipeline.store.shards import read_shards

REPO_ROOT = Path(__file__).resolve().parents[2]
# 12 images in batches of at most 4 (4 batches of 3 on 2 actors): a first-scale shard per batch, so a kill after
# the first is mid-pass. At sigma=1 most digits fall through to 0.25, so a resume also rebuilds the early-exit stage.
RAY_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\((pid=|raylet|gcs_server)")

SETTINGS = ("--num-images", "12", "--n", "100", "--n-select", "20", "--images-per-batch", "4",
            "--sigmas", "1.0,0.25")

pytestmark = pytest.mark.slow


def run_certify(monkeypatch, capfd, *args: str) -> tuple[int, str]:
    """jobs/certify.py run in this process (sharing the session's Ray): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["certify.py", *args])
    try:
        runpy.run_path(str(REPO_ROOT / "jobs" / "certify.py"), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    return code, capfd.readouterr().err


def sorted_counts(out: Path) -> pa.Table:
    return read_shards(str(out / "counts")).sort_by([("image_id", "ascending"), ("sigma", "descending")])


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `directory` with its modification time and bytes."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_run(out: Path, reference: Path) -> None:
    """Counts rows equal and results.parquet identical byte for byte."""
    counts, expected = sorted_counts(out), sorted_counts(reference)
    assert counts.num_rows == expected.num_rows > 0
    assert counts.equals(expected)
    assert (out / "results.parquet").read_bytes() == (reference / "results.parquet").read_bytes()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, digits_cache, ray_session) -> Path:
    """An uninterrupted run: the reference every interrupted one must reproduce exactly."""
    out = tmp_path_factory.mktemp("clean") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["certify.py", *SETTINGS, "--out", str(out)])
        runpy.run_path(str(REPO_ROOT / "jobs" / "certify.py"), run_name="__main__")
    rows_per_scale = Counter(read_shards(str(out / "counts"))["sigma"].to_pylist())
    assert rows_per_scale[1.0] == 12
    assert rows_per_scale[0.25] > 0, "no image reached the second stage: the resume tests would be weak"
    return out


def test_resume_recomputes_half_written_and_garbage_shards(tmp_path, clean_run, monkeypatch, capfd):
    out = tmp_path / "out"
    shutil.copytree(clean_run / "counts", out / "counts")
    shutil.copy(clean_run / "run_config.json", out)
    # two of the first-stage shards (one per batch): the resume must redo them, then find stage 2 already done
    first_stage = sorted((out / "counts").glob("part-s1-*.parquet"))
    assert len(first_stage) >= 3, "the run should have written a first-stage shard per batch"
    truncated, garbage = first_stage[:2]
    lost = pq.read_table(truncated).num_rows + pq.read_table(garbage).num_rows
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # a non-atomic writer killed mid-file
    garbage.write_bytes(b"not parquet at all" * 10)
    assert read_shards(str(out / "counts")).num_rows == sorted_counts(clean_run).num_rows - lost

    code, err = run_certify(monkeypatch, capfd, *SETTINGS, "--out", str(out), "--resume")

    assert code == 0, err
    assert_same_run(out, clean_run)  # so the rows of both unreadable shards were recomputed


@pytest.mark.parametrize("changed, name", [
    ([arg if arg != "100" else "200" for arg in SETTINGS], "n"),  # --n 100 → --n 200
    ([*SETTINGS, "--denoiser-fit", "native"], "inputs.denoiser_fit"),  # the counts depend on the models too
    # and on their arithmetic: the precision the clean run's --precision auto did not pick
    ([*SETTINGS, "--precision", "fp32" if resolve_precision("auto", gpu=False) == "bf16" else "bf16"],
     "inputs.precision"),
])
def test_resume_with_changed_settings_is_refused_and_keeps_files(tmp_path, clean_run, monkeypatch, capfd, changed,
                                                                  name):
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    before = snapshot(out)

    code, err = run_certify(monkeypatch, capfd, *changed, "--out", str(out), "--resume")

    assert code == 2
    # the session's shared Ray may stream its own log lines ("(pid=gcs_server) …") into the capture
    lines = [line for line in err.strip().splitlines() if not RAY_LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert lines[0].rsplit(":", 1)[-1].split() == [name]  # names the one setting that changed
    assert snapshot(out) == before


# Adaptive target-radius run: each batch of 4 images is one shard, written when its adaptive rounds end.
# Radius 0.25 at sigma 0.5 needs p >= Phi(0.5) = 0.69, far below what the digits models reach on most
# images whatever CPU trained them (first-use training is deterministic per machine, not across CPUs).
TARGET_RADIUS = ("--num-images", "12", "--n", "1000", "--n-select", "20", "--images-per-batch", "4",
                 "--sigmas", "0.5,0.25", "--adaptive", "--target-radius", "0.25", "--target-radius", "0.125")


@pytest.fixture(scope="module")
def target_radius_run(tmp_path_factory, digits_cache, ray_session) -> Path:
    """An uninterrupted adaptive target-radius run, the reference of the adaptive cases below."""
    out = tmp_path_factory.mktemp("target-radius") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["certify.py", *TARGET_RADIUS, "--out", str(out)])
        runpy.run_path(str(REPO_ROOT / "jobs" / "certify.py"), run_name="__main__")
    radii = pq.read_table(out / "results.parquet")["radius"].to_pylist()
    assert set(radii) <= {0.0, 0.125, 0.25} and 0.25 in radii
    assert "target-radius run" in (out / "report.md").read_text()
    return out


def test_target_radius_run_resumes_and_reduces(tmp_path, target_radius_run, monkeypatch, capfd):
    """`--adaptive --target-radius`: a run stopped after its first batch and resumed, with one of the resumed
    run's actors killed mid-batch (its batch is retried: the adaptive strategy runs in the same actor and
    must rewrite identical shards), equals an uninterrupted one, and jobs/reduce.py recomputes its results
    from the counts alone. The stop is what a SIGKILL leaves (the run's config and the whole shards of
    finished batches; a real SIGKILL: tests/jobs/test_object_storage_jobs.py). The run records its
    stopping rules with its settings, so a resume under another version's rules is refused like any
    other changed input (the test above)."""
    out, marker = tmp_path / "out", tmp_path / "actor-died"
    (out / "counts").mkdir(parents=True)
    shutil.copy(target_radius_run / "run_config.json", out)
    assert json.loads((out / "run_config.json").read_text())["inputs"]["stopping_rules"] == STOPPING_RULES
    first = sorted((target_radius_run / "counts").glob("part-*.parquet"))[0]
    shutil.copy(first, out / "counts")
    assert read_shards(str(out / "counts")).num_rows < sorted_counts(target_radius_run).num_rows

    monkeypatch.setenv(FAIL_ONCE_ENV, str(marker))
    code, err = run_certify(monkeypatch, capfd, *TARGET_RADIUS, "--out", str(out), "--resume")

    assert code == 0, err
    assert marker.exists(), "the injected failure never fired"
    assert_same_run(out, target_radius_run)
    reduced = tmp_path / "reduced.parquet"
    done = subprocess.run([sys.executable, "jobs/reduce.py", str(out / "counts"), "--out", str(reduced)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(reduced).equals(pq.read_table(out / "results.parquet"))
