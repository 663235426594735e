"""The benchmark's memory modes at tiny sizes: --reduce-scale and --driver-memory run their measured
processes and write the JSON and the table. Correctness only: every reduce must give the same
certificates, every run must certify all its images, and the reported ratio must be the measured one;
no timing or memory figure is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.app.benchmark import benchmark, build_parser
from pipeline.errors import UserError


def run_benchmark(*flags: str) -> tuple[dict, str]:
    out = flags[flags.index("--out") + 1]
    table = benchmark(build_parser().parse_args(["--device", "cpu", *flags]))
    return json.loads((Path(out) / "benchmark.json").read_text()), table


def test_reduce_scale_mode_reduces_every_way_alike(tmp_path: Path) -> None:
    counts = tmp_path / "counts"
    report, table = run_benchmark("--reduce-scale", "--reduce-images", "200", "--reduce-counts", str(counts),
                                  "--out", str(tmp_path / "out"))
    section = report["reduce_scale"]
    assert section["same_results"] is True
    assert set(section["by_mode"]) == {"in-memory", "streaming", "job"} and "driver_memory" not in report
    for run in section["by_mode"].values():
        assert run["images"] == 200 and 0 < run["certified"] <= 200
        assert run["peak_rss_bytes"] > 0 and run["process_wall_s"] > 0 and run["process_cpu_s"] > 0
    assert section["by_mode"]["job"]["script"].endswith("jobs/reduce.py")
    assert len(list(counts.glob("*.parquet"))) == 13  # 200 images, 16 per shard: kept for a later run
    rows = [line for line in table.splitlines() if line.startswith("| reduce")]
    assert len(rows) == 4 and rows[-1] == "| reduce: every way gives the same certificates | True | True |"
    assert all(("met" in row or "missed" in row) for row in rows[1:3]) and "GB" in rows[0]


@pytest.mark.parametrize("sizes", ["4000,2000", "2000", "2000,x", "0,10"])
def test_driver_images_must_be_ascending_sizes(sizes: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--driver-images"):
        run_benchmark("--driver-memory", "--driver-images", sizes, "--out", str(tmp_path))
