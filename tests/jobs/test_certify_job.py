"""End-to-end certification on the embedded digits default (real Ray Data pipeline, small n)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import CascadeRule
from pipeline.stats.cascade import certify_cascade, needs_next_stage
from pipeline.app.certify import CertifyRequest, certify
from pipeline.app.args import build_parser, request_from_args
from pipeline.models.precision import resolve_precision
from pipeline.store.counts import COUNTS_SCHEMA, counts_to_arrays, read_counts
from pipeline.store.results import RESULTS_SCHEMA
from tests.conftest import REPO_ROOT
from tests.jobs.test_bad_inputs import assert_user_error, run_job as run_in_process

pytestmark = pytest.mark.slow
SIGMAS = (1.0, 0.5, 0.25)
SMALL = ["--num-images", "12", "--n", "120", "--n-select", "20", "--sigmas", "1.0,0.5,0.25"]


def request(out: Path, *flags: str) -> CertifyRequest:
    return request_from_args(build_parser("digits", "test").parse_args([*SMALL, "--out", str(out), *flags]))


def sorted_counts(out: Path):
    table = read_counts(out / "counts")
    return table.sort_by([("image_id", "ascending"), ("sigma", "descending")])


@pytest.fixture(scope="module")
def all_scales_run(digits_cache, ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("all-scales")
    certify(request(out, "--all-scales", "--overwrite"))
    return out


def test_outputs_have_the_exact_schemas(all_scales_run):
    for shard in (all_scales_run / "counts").glob("part-*.parquet"):
        assert pq.read_schema(shard) == COUNTS_SCHEMA
    results = pq.read_table(all_scales_run / "results.parquet")
    assert results.schema == RESULTS_SCHEMA
    assert results.num_rows == 12
    counts = sorted_counts(all_scales_run)
    assert counts.num_rows == 12 * 3
    assert set(pc.list_value_length(counts["select_counts"]).to_pylist()) == {10}
    assert (np.array(counts["estimate_counts"].to_pylist()).sum(1) == 120).all()
    report = (all_scales_run / "report.md").read_text()
    assert "sigma=0.25 alone" in report and "cascade 1/0.5/0.25" in report
    assert (all_scales_run / "certified_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_results_are_queryable_with_duckdb(all_scales_run):
    path = all_scales_run / "results.parquet"
    count, accuracy = duckdb.connect().execute(f"SELECT count(*), avg(correct::INT) FROM '{path}'").fetchone()
    assert count == 12 and 0.0 <= accuracy <= 1.0


def test_counts_do_not_depend_on_actors_or_batching(all_scales_run, tmp_path):
    other = request(tmp_path, "--all-scales", "--num-actors", "2", "--batch-size", "100", "--images-per-batch", "3")
    certify(other)
    assert sorted_counts(tmp_path).equals(sorted_counts(all_scales_run))


@pytest.mark.parametrize("routing", ["cascade", "continue"])
def test_early_exit_samples_only_the_images_the_routing_sends_on(all_scales_run, tmp_path, routing):
    certify(request(tmp_path, "--routing", routing))
    early = counts_to_arrays(sorted_counts(tmp_path), SIGMAS)
    full = counts_to_arrays(sorted_counts(all_scales_run), SIGMAS)
    np.testing.assert_array_equal(early.present[:, 0], True)
    reached = np.ones(len(full.image_ids), dtype=bool)
    for stage in (1, 2):
        reached &= needs_next_stage(full.select_counts[:, :stage], full.estimate_counts[:, :stage], 3,
                                    CascadeRule(0.001, routing=routing))
        np.testing.assert_array_equal(early.present[:, stage], reached)
        np.testing.assert_array_equal(early.estimate_counts[reached, stage], full.estimate_counts[reached, stage])
    # every (image, sigma) both strategies sampled has the same counts (same seed, same noise)
    np.testing.assert_array_equal(early.select_counts[early.present], full.select_counts[early.present])
    np.testing.assert_array_equal(early.estimate_counts[early.present], full.estimate_counts[early.present])
    # the certificates are those of the same routing on the all-scales counts
    expected = certify_cascade(full.select_counts, full.estimate_counts, SIGMAS, CascadeRule(0.001, routing=routing))
    results = pq.read_table(tmp_path / "results.parquet")
    np.testing.assert_array_equal(results["prediction"].to_numpy(), expected.prediction)
    np.testing.assert_array_equal(results["radius"].to_numpy(), expected.radius)
    assert f"routing: {routing}" in (tmp_path / "report.md").read_text()


def test_family_wise_runs_every_image_at_alpha_over_m_and_says_so(all_scales_run, tmp_path):
    certify(request(tmp_path, "--all-scales", "--family-wise", "--alpha", "0.012"))
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config["family_wise"] and config["user_alpha"] == 0.012 and config["alpha"] == pytest.approx(0.001)
    report = (tmp_path / "report.md").read_text()
    assert "family-wise over 12 images: per image alpha/M=0.001" in report
    # alpha / M = 0.001 is the default per-image level: the same certificates as the plain run
    family, plain = pq.read_table(tmp_path / "results.parquet"), pq.read_table(all_scales_run / "results.parquet")
    np.testing.assert_array_equal(family["prediction"].to_numpy(), plain["prediction"].to_numpy())
    np.testing.assert_allclose(family["radius"].to_numpy(), plain["radius"].to_numpy(), rtol=1e-9)
    plain_report = (all_scales_run / "report.md").read_text()
    assert "per image at alpha=0.001" in plain_report
    precision = json.loads((all_scales_run / "run_config.json").read_text())["inputs"]["precision"]
    assert precision == resolve_precision("auto", gpu=False)  # the default, recorded for --resume
    line = {"bf16": "- precision: bf16 autocast (denoiser and classifier)", "fp32": "- precision: fp32"}[precision]
    assert line in report.splitlines() and line in plain_report.splitlines()


@pytest.mark.parametrize("flags, message", [
    (["--preset", "mnist"], "unknown preset"),
    (["--sigmas", "0.5,x"], "--sigmas"),
    (["--sigmas", "0.5,-0.25"], "positive"),
    (["--alpha", "2"], "--alpha"),
    (["--p0", "0.4"], "p0 must lie in [0.5, 1)"),
    (["--alpha-mode", "reference", "--routing", "continue"], "--routing continue needs union mode"),
])
def test_bad_arguments_give_one_line_and_exit_2(flags, message, tmp_path, monkeypatch, capfd):
    """The job's __main__ in this process (tests/jobs/test_bad_inputs.py runs one as a real process)."""
    code, err = run_in_process("certify.py", [*flags, "--out", str(tmp_path / "o")], monkeypatch, capfd)
    assert_user_error(code, err, message)


def test_cli_refuses_a_non_empty_out_and_keeps_it(tmp_path, monkeypatch, capfd):
    keep = tmp_path / "results.parquet"
    keep.write_bytes(b"earlier results")
    code, err = run_in_process("certify.py", ["--out", str(tmp_path)], monkeypatch, capfd)
    assert_user_error(code, err, "not empty")
    assert keep.read_bytes() == b"earlier results"


def test_cli_end_to_end(digits_cache, tmp_path):
    """`python jobs/certify.py` as a user runs it: a process of its own that starts its own local Ray."""
    done = subprocess.run([sys.executable, "jobs/certify.py", *SMALL, "--out", str(tmp_path / "run")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| cascade 1/0.5/0.25 |" in done.stdout
    assert "base classifier clean test accuracy" in done.stdout
    assert pq.read_table(tmp_path / "run" / "results.parquet").num_rows == 12


def test_predict_job_writes_predictions(digits_cache, ray_session, tmp_path):
    from dataclasses import replace

    from pipeline.app.predict import PREDICTIONS_SCHEMA, predict
    from pipeline.stats.prediction import predict_cascade

    base = request(tmp_path)
    summary = predict(replace(base, config=base.config.replace(n_select=0, task="predict")))
    table = pq.read_table(tmp_path / "predictions.parquet")
    assert table.schema == PREDICTIONS_SCHEMA and table.num_rows == 12
    arrays = counts_to_arrays(sorted_counts(tmp_path), SIGMAS)
    expected, stage = predict_cascade(arrays.estimate_counts, 0.001)
    np.testing.assert_array_equal(table["prediction"].to_numpy(), expected)
    # early exit by the prediction test: later scales only for images the earlier tests could not decide
    for k in (1, 2):
        np.testing.assert_array_equal(arrays.present[:, k], (stage == -1) | (stage >= k))
    assert "overall accuracy" in summary


def test_adaptive_certification_runs_end_to_end(digits_cache, ray_session, all_scales_run, tmp_path):
    """--adaptive (confidence sequences, early stopping) writes the same outputs; its certificates are
    no more permissive in class than fixed-n's on these easy images, and it never uses more samples."""
    certify(request(tmp_path, "--adaptive"))
    results = pq.read_table(tmp_path / "results.parquet")
    assert results.schema == RESULTS_SCHEMA and results.num_rows == 12
    counts = read_counts(tmp_path / "counts")
    assert (np.array(counts["estimate_counts"].to_pylist()).sum(1) <= 120).all()
    fixed = pq.read_table(all_scales_run / "results.parquet")
    certified = results["prediction"].to_numpy() >= 0
    np.testing.assert_array_equal(results["prediction"].to_numpy()[certified],
                                  fixed["prediction"].to_numpy()[certified])


def test_adaptive_is_refused_with_all_scales_and_in_predict(tmp_path, monkeypatch, capfd):
    code, err = run_in_process("certify.py", ["--adaptive", "--all-scales", "--out", str(tmp_path / "o")],
                               monkeypatch, capfd)
    assert_user_error(code, err, "--adaptive")
    code, err = run_in_process("predict.py", ["--adaptive", "--out", str(tmp_path / "p")], monkeypatch, capfd)
    assert_user_error(code, err, "--adaptive")


def test_predict_refuses_p0_below_one_half(tmp_path, monkeypatch, capfd):
    code, err = run_in_process("predict.py", ["--p0", "0.3", "--out", str(tmp_path / "p")], monkeypatch, capfd)
    assert_user_error(code, err, "p0 must lie in")
