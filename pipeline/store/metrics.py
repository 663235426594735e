"""Metrics of a results table (docs/statistics.md, "Reports"): certified accuracy at a radius, ACR, the
certified-but-wrong rate. pyarrow and numpy only, so that the report, the comparison of runs and the
benchmarks all compute them one way."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

REPORT_RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def certified_accuracy(results: pa.Table, radius: float) -> float:
    """Fraction of images whose prediction is correct with a certified radius >= `radius`."""
    correct = results["correct"].to_numpy(zero_copy_only=False)
    radii = results["radius"].to_numpy()
    return float(np.mean(correct & (radii >= radius))) if results.num_rows else 0.0


def average_certified_radius(results: pa.Table) -> float:
    """Sum of radii of correct predictions divided by the number of images."""
    correct = results["correct"].to_numpy(zero_copy_only=False)
    radii = results["radius"].to_numpy()
    return float(np.sum(np.where(correct, radii, 0.0)) / max(results.num_rows, 1))


def certified_wrong(results: pa.Table) -> float:
    """Fraction of images certified with the wrong class: what fine-tuning (docs/finetuning.md) aims to reduce."""
    prediction = results["prediction"].to_numpy()
    correct = results["correct"].to_numpy(zero_copy_only=False)
    return float(np.mean((prediction >= 0) & ~correct)) if results.num_rows else 0.0


def summary_rows(tables: dict[str, pa.Table], radii=REPORT_RADII) -> list[dict[str, float | str]]:
    rows = []
    for name, table in tables.items():
        row: dict[str, float | str] = {"method": name}
        for r in radii:
            row[f"r={r:g}"] = certified_accuracy(table, r)
        row["ACR"] = average_certified_radius(table)
        row["certified wrong"] = certified_wrong(table)
        rows.append(row)
    return rows
