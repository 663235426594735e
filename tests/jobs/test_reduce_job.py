"""jobs/reduce.py cannot mislead: each refusal, and the run settings deciding how counts are reduced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import CascadeRule
from pipeline.stats.cascade import certify_cascade
from pipeline.stats.sequential_cascade import certify_cascade_sequential
from pipeline.store.counts import counts_table, counts_to_arrays
from pipeline.store.run_config import METADATA_KEY, write_image_ids
from pipeline.store.shards import write_shard
from tests.conftest import REPO_ROOT

SIGMAS = (0.5, 0.25)


def settings(strategy: str, routing: str = "continue") -> dict:
    """A run's settings as certify stores them (pipeline/app/certify.py run_settings)."""
    return {"sigmas": list(SIGMAS), "n_select": 20, "n": 100, "seed": 0, "alpha": 0.01, "alpha_mode": "union",
            "p0": 0.5, "strategy": strategy, "routing": routing, "radius_tolerance": 0.05, "family_wise": False,
            "user_alpha": 0.01}


def rows(ids: list[int], both_scales: bool) -> tuple:
    """Image 0 is sure at 0.5; the others spread at 0.5 (fall through) and sure at 0.25."""
    image_ids, sigmas, select, estimate = [], [], [], []
    for i in ids:
        sure = i == 0
        image_ids.append(i), sigmas.append(0.5)
        select.append([20, 0, 0] if sure else [7, 7, 6]), estimate.append([100, 0, 0] if sure else [34, 33, 33])
        if both_scales or not sure:
            image_ids.append(i), sigmas.append(0.25)
            select.append([0, 20, 0]), estimate.append([0, 100, 0])
    ids_array = np.array(image_ids)
    return ids_array, ids_array % 3, np.array(sigmas), np.array(select), np.array(estimate)


def make_run(out: Path, strategy: str, ids=(0, 1, 2), both_scales: bool = True, asked=None,
             with_config: bool = True, routing: str = "continue") -> Path:
    """A run directory as certify leaves it: counts/ shards with the settings in their metadata,
    run_config.json (optional: a copied counts/ lacks it) and images.parquet."""
    run = settings(strategy, routing)
    (out / "counts").mkdir(parents=True)
    table = counts_table(*rows(list(ids), both_scales))
    write_shard(table, str(out / "counts"), "part-a.parquet", {METADATA_KEY: json.dumps(run).encode()})
    if with_config:
        (out / "run_config.json").write_text(json.dumps(run))
    write_image_ids(str(out), np.array(asked if asked is not None else ids))
    return out / "counts"


def run_reduce(counts: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/reduce.py", str(counts), "--out", str(counts.parent / "r.parquet"),
                           *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def refused(done: subprocess.CompletedProcess, *fragments: str) -> bool:
    return (done.returncode == 2 and done.stderr.startswith("error:") and done.stderr.count("\n") == 1
            and all(f in done.stderr for f in fragments))


@pytest.mark.parametrize("with_config", [True, False], ids=["run_config", "shard_metadata_only"])
def test_adaptive_counts_go_to_the_sequential_reduce(tmp_path: Path, with_config: bool) -> None:
    counts = make_run(tmp_path, "adaptive", with_config=with_config)
    done = run_reduce(counts)
    assert done.returncode == 0, done.stderr
    arrays = counts_to_arrays(pq.read_table(counts / "part-a.parquet"), SIGMAS)
    sequential = certify_cascade_sequential(arrays.select_counts, arrays.estimate_counts, SIGMAS,
                                            CascadeRule(0.01, routing="continue"))  # the run's routing (make_run)
    clopper_pearson = certify_cascade(arrays.select_counts, arrays.estimate_counts, SIGMAS, CascadeRule(0.01))
    radius = pq.read_table(counts.parent / "r.parquet")["radius"].to_numpy()
    np.testing.assert_allclose(radius, sequential.radius)
    assert np.all(radius < clopper_pearson.radius)  # not the fixed-n bounds


@pytest.mark.parametrize("flags", [["--alpha-mode", "reference"], ["--routing", "best"]])
def test_adaptive_counts_refuse_clopper_pearson_rules(tmp_path: Path, flags: list[str]) -> None:
    counts = make_run(tmp_path, "adaptive", with_config=False)
    assert refused(run_reduce(counts, *flags), "adaptive run", "sequential")


def test_sigmas_dropping_a_scale_of_an_early_exit_run_is_refused(tmp_path: Path) -> None:
    counts = make_run(tmp_path, "early_exit", both_scales=False)
    assert refused(run_reduce(counts, "--sigmas", "0.5"), "drops scale(s) [0.25]", "early-exit run")


def test_sigmas_subset_of_an_all_scales_run_is_allowed(tmp_path: Path) -> None:
    counts = make_run(tmp_path, "all_scales")
    done = run_reduce(counts, "--sigmas", "0.25")
    assert done.returncode == 0, done.stderr
    assert pq.read_table(counts.parent / "r.parquet")["prediction"].to_pylist() == [1, 1, 1]


def test_images_without_counts_are_named_not_dropped(tmp_path: Path) -> None:
    counts = make_run(tmp_path, "all_scales", ids=(0, 1), asked=(0, 1, 2, 3))
    assert refused(run_reduce(counts), "2 of 4 image(s) lack the counts", "ids 2, 3")
    assert not (tmp_path / "r.parquet").exists()


def test_routing_needing_unsampled_scales_names_the_images(tmp_path: Path) -> None:
    """Early exit under cascade left image 0 without sigma 0.25; routing best needs it."""
    counts = make_run(tmp_path, "early_exit", both_scales=False, routing="cascade")
    assert run_reduce(counts).returncode == 0  # the run's own routing
    done = run_reduce(counts, "--routing", "best", "--overwrite")
    assert refused(done, "1 of 3 image(s)", "ids 0", "routing cascade")


def test_an_unreadable_shard_is_named(tmp_path: Path) -> None:
    counts = make_run(tmp_path, "all_scales", ids=(0, 1), asked=(0, 1, 2))
    (counts / "part-b.parquet").write_bytes(b"PAR1 cut short")
    assert refused(run_reduce(counts), "1 of 3 image(s)", "ids 2", "unreadable shard(s): part-b.parquet")


def test_p0_below_one_half_is_refused(tmp_path: Path) -> None:
    counts = make_run(tmp_path, "all_scales")
    assert refused(run_reduce(counts, "--p0", "0.4"), "p0 must lie in [0.5, 1)")


def test_routing_defaults_to_the_runs_and_reduces_all_scales_counts_under_every_routing(tmp_path: Path) -> None:
    counts = make_run(tmp_path, "all_scales")
    arrays = counts_to_arrays(pq.read_table(counts / "part-a.parquet"), SIGMAS)
    for routing in ("cascade", "continue", "best"):
        done = run_reduce(counts, "--routing", routing, "--overwrite")
        assert done.returncode == 0 and f"routing {routing}" in done.stdout, done.stderr
        expected = certify_cascade(arrays.select_counts, arrays.estimate_counts, SIGMAS,
                                   CascadeRule(0.01, routing=routing))
        np.testing.assert_allclose(pq.read_table(counts.parent / "r.parquet")["radius"].to_numpy(), expected.radius)
        # images 1 and 2 fall through 0.5; image 0 is certified there, so only best samples its 0.25
        assert f"| {5 / 3 if routing != 'best' else 2.0:.2f} |" in done.stdout
    assert "routing continue" in run_reduce(counts, "--overwrite").stdout
