"""Compare finished runs: one markdown table and one certified-accuracy plot over their results.

Every run is read from what it left under OUT (README "What you get"): results.parquet for the metrics
and counts/ for the forwards per image (each vote is one denoise + classify forward). The metrics come
from pipeline.store.metrics and the table and curve from app/report.py, so a comparison shows the
numbers each run's own report shows. Runs over different images are refused: certified accuracy over
different test sets says nothing about the methods.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.app.report import markdown_table, plot_curves
from pipeline.errors import UserError
from pipeline.store.atomic import read_parquet, write_bytes
from pipeline.store.metrics import REPORT_RADII, summary_rows
from pipeline.store.results import RESULTS_SCHEMA
from pipeline.store.shards import read_shards

RESULTS = "results.parquet"
COUNTS = "counts"
#: What compare writes under `to`; not report.md / certified_accuracy.png, so that `to` may be a run's OUT.
TABLE_FILE, PLOT_FILE = "comparison.md", "comparison.png"


def compare(outs: Sequence[str | os.PathLike], *, radii: Sequence[float] = REPORT_RADII,
            names: Sequence[str] | None = None, to: str | os.PathLike | None = None) -> str:
    """The markdown table comparing `outs` (run directories or results Parquet files, local paths or
    fsspec URLs): per run its images, certified accuracy at `radii`, ACR, certified wrong and forwards
    per image ('-' without counts, e.g. for a results file). With `to`, also writes comparison.md and
    comparison.png (one certified-accuracy curve per run) into that directory."""
    if isinstance(outs, (str, os.PathLike)):
        raise TypeError("outs must be a list of run directories or results files, not a single path")
    outs = [os.fspath(out) for out in outs]
    if not outs:
        raise UserError("nothing to compare: give at least one run directory or results file")
    radii = check_radii(radii)
    labels = run_names(outs, names)
    tables, forwards = {}, {}
    for name, out in zip(labels, outs):
        tables[name], forwards[name] = read_run(out)
    check_same_images(tables)
    rows = []
    for row in summary_rows(tables, radii):
        name = row.pop("method")
        rows.append({"run": name, "images": str(tables[name].num_rows), **row,
                     "forwards/image": "-" if forwards[name] is None else forwards[name]})
    table = markdown_table(rows)
    if to is not None:
        directory = os.fspath(to).rstrip("/")
        write_bytes(f"{directory}/{PLOT_FILE}", plot_curves(tables))
        write_bytes(f"{directory}/{TABLE_FILE}", f"{table}\n\n![certified accuracy]({PLOT_FILE})\n".encode())
    return table


def parse_radii(text: str) -> tuple[float, ...]:
    """'0,0.25,0.5' → (0.0, 0.25, 0.5), for the --radii flag."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as error:
        raise UserError(f"--radii takes comma-separated numbers, e.g. 0,0.25,0.5; got {text!r}") from error


def check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    radii = tuple(float(r) for r in radii)
    if not radii or not all(np.isfinite(r) and r >= 0 for r in radii):
        raise UserError(f"radii must be one or more finite numbers >= 0, got {list(radii)}")
    return radii


def run_names(outs: list[str], names: Sequence[str] | None) -> list[str]:
    """`names`, else each run's directory name (a results file: its stem, or its directory's name for
    results.parquet); two runs with one name would merge in the table and the plot, so that is refused."""
    if names is not None:
        labels = [str(name) for name in names]
        if len(labels) != len(outs):
            raise UserError(f"{len(labels)} name(s) for {len(outs)} run(s)")
    else:
        labels = []
        for out in outs:
            parts = out.rstrip("/").rsplit("/", 2)
            if parts[-1] == RESULTS and len(parts) > 1:
                labels.append(parts[-2])
            else:
                labels.append(parts[-1].removesuffix(".parquet"))
    repeated = sorted({name for name in labels if labels.count(name) > 1})
    if repeated:
        raise UserError(f"two runs are named {repeated[0]!r}; give each its own name (names=, --names)")
    return labels


def read_run(out: str) -> tuple[pa.Table, float | None]:
    """(results, forwards per image) of a run directory; (results, None) for a results file, whose
    counts are not known to belong to it (a re-reduce of another run's counts, a copy)."""
    fs, path = fsspec.core.url_to_fs(out)
    if fs.isdir(path):
        results_url = f"{out.rstrip('/')}/{RESULTS}"
        if not fs.exists(f"{path.rstrip('/')}/{RESULTS}"):
            raise UserError(f"{out} has no {RESULTS}: not a finished run (reduce its counts with jobs/reduce.py)")
    elif fs.isfile(path):
        results_url = out
    else:
        raise UserError(f"{out} does not exist: give a run directory holding {RESULTS}, or a results Parquet file")
    results = read_results(results_url)
    if not fs.isdir(path):
        return results, None
    counts = read_shards(f"{out.rstrip('/')}/{COUNTS}")
    if counts.num_rows == 0:
        return results, None
    votes = sum(pc.sum(pc.list_flatten(counts[column])).as_py() or 0
                for column in ("select_counts", "estimate_counts"))
    return results, votes / results.num_rows


def read_results(url: str) -> pa.Table:
    try:
        results = read_parquet(url)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"cannot read {url}: {str(error).splitlines()[0]}") from error
    missing = [name for name in RESULTS_SCHEMA.names if name not in results.schema.names]
    if missing:
        raise UserError(f"{url} is not a results table: missing column(s) {', '.join(missing)}")
    if results.num_rows == 0:
        raise UserError(f"{url} has no images")
    return results


def check_same_images(tables: dict[str, pa.Table]) -> None:
    """Refuse runs whose (image_id, label) sets differ from the first run's, saying by how many."""
    (first, reference), *others = tables.items()
    ids, labels = image_labels(reference)
    for name, table in others:
        other_ids, other_labels = image_labels(table)
        only_first = np.setdiff1d(ids, other_ids)
        only_other = np.setdiff1d(other_ids, ids)
        common, at_first, at_other = np.intersect1d(ids, other_ids, return_indices=True)
        relabeled = int(np.sum(labels[at_first] != other_labels[at_other]))
        if len(only_first) or len(only_other) or relabeled:
            differences = [f"{len(only_other)} image(s) only in {name}", f"{len(only_first)} only in {first}"]
            if relabeled:
                differences.append(f"{relabeled} with different labels")
            raise UserError(f"{name} and {first} are over different images ({', '.join(differences)}; "
                            f"{len(common)} shared): comparing certified accuracy over different images is "
                            "meaningless")


def image_labels(results: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique image ids and their labels."""
    ids, first = np.unique(results["image_id"].to_numpy(), return_index=True)
    return ids, results["label"].to_numpy()[first]


def compare_job(outs: Sequence[str], names: str | None, out: str | None, radii: str | None) -> str:
    """jobs/compare.py: the flags as given (comma-separated names and radii) → `compare`."""
    return compare(outs, radii=parse_radii(radii) if radii else REPORT_RADII,
                   names=names.split(",") if names else None, to=out)
