"""The counts table: one row per (image, sigma) with the select/estimate class counts.

This is the contract between the sampling stage (Ray actors writing Parquet) and the reduce stage
(pure numpy): everything the reduce needs, including n and the sigmas, is read from the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.store.atomic import read_parquet

COUNTS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("label", pa.int64()),
    ("sigma", pa.float64()),
    ("select_counts", pa.list_(pa.int64())),
    ("estimate_counts", pa.list_(pa.int64())),
])


@dataclass(frozen=True)
class CountsArrays:
    """Dense arrays for the reduce: stages ordered by decreasing sigma; absent stages are zeros."""

    image_ids: np.ndarray  # int64 (M,)
    labels: np.ndarray  # int64 (M,)
    sigmas: np.ndarray  # float64 (K,), strictly decreasing
    select_counts: np.ndarray  # int64 (M, K, C)
    estimate_counts: np.ndarray  # int64 (M, K, C)
    present: np.ndarray  # bool (M, K): a row exists for (image, sigma)


def counts_table(
    image_ids: np.ndarray, labels: np.ndarray, sigmas: np.ndarray, select: np.ndarray, estimate: np.ndarray
) -> pa.Table:
    """Build a table in COUNTS_SCHEMA from per-row arrays; select/estimate are (rows, C)."""
    num_classes = select.shape[1]
    return pa.table(
        [
            pa.array(np.asarray(image_ids, dtype=np.int64)),
            pa.array(np.asarray(labels, dtype=np.int64)),
            pa.array(np.asarray(sigmas, dtype=np.float64)),
            pa.FixedSizeListArray.from_arrays(pa.array(select.astype(np.int64).ravel()), num_classes).cast(
                pa.list_(pa.int64())),
            pa.FixedSizeListArray.from_arrays(pa.array(estimate.astype(np.int64).ravel()), num_classes).cast(
                pa.list_(pa.int64())),
        ],
        schema=COUNTS_SCHEMA,
    )


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not p.name.startswith((".", "_")))
        if files:
            return files
        raise UserError(f"no .parquet files under {path}")
    raise UserError(f"counts not found: {path}")


def read_counts(path: str | Path) -> pa.Table:
    """Read a counts Parquet file or directory, checking the schema; bad input → one UserError line."""
    table, unreadable = read_counts_reporting(path)
    if unreadable:
        raise UserError(f"cannot read counts Parquet under {path}: {unreadable[0]}")
    return table


def read_counts_reporting(path: str | Path) -> tuple[pa.Table, list[str]]:
    """Like read_counts, but a directory's unreadable files are returned by name (with the error)
    instead of failing the read, so that the reduce can name them beside the images they held. A
    single unreadable file is still an error: there is nothing else to reduce."""
    location = Path(path)
    files = _parquet_files(location)
    tables, unreadable = [], []
    for file in files:
        try:
            table = read_parquet(str(file))  # synchronous: no scanner threads left at exit
        except (pa.ArrowInvalid, OSError) as error:
            if location.is_file():
                raise UserError(f"cannot read counts Parquet under {path}: {str(error).splitlines()[0]}") from error
            unreadable.append(f"{file.name} ({str(error).splitlines()[0]})")
            continue
        validate_counts_schema(table.schema, str(file if location.is_dir() else path))
        tables.append(table.select(COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA))
    table = pa.concat_tables(tables) if tables else COUNTS_SCHEMA.empty_table()
    return table, unreadable


def validate_counts_schema(schema: pa.Schema, where: str) -> None:
    missing = [f.name for f in COUNTS_SCHEMA if f.name not in schema.names]
    if missing:
        raise UserError(f"{where} is not a counts table: missing column(s) {', '.join(missing)} "
                        f"(expected {', '.join(COUNTS_SCHEMA.names)})")
    for field in COUNTS_SCHEMA:
        actual = schema.field(field.name).type
        compatible = actual == field.type or (
            pa.types.is_list(field.type) and (pa.types.is_list(actual) or pa.types.is_large_list(actual))
            and pa.types.is_integer(actual.value_type)
        ) or (pa.types.is_integer(field.type) and pa.types.is_integer(actual)) or (
            pa.types.is_floating(field.type) and pa.types.is_floating(actual))
        if not compatible:
            raise UserError(f"{where}: column {field.name} has type {actual}, expected {field.type}")


def _dense(column: pa.ChunkedArray, name: str) -> np.ndarray:
    lengths = set(column.combine_chunks().value_lengths().to_numpy(zero_copy_only=False).tolist())
    if len(lengths) != 1:
        raise UserError(f"{name} rows have different numbers of classes: {sorted(lengths)}")
    (num_classes,) = lengths
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if values.size and values.min() < 0:
        raise UserError(f"{name} contains negative counts")
    return values.astype(np.int64).reshape(-1, num_classes)


def counts_to_arrays(table: pa.Table, sigmas: Sequence[float] | None = None) -> CountsArrays:
    """Pivot rows into (image, stage, class) arrays; duplicate (image_id, sigma) rows are an error.

    `sigmas` are the run's scales. Pass them whenever known: the alpha split depends on the number
    of scales the cascade could consult, and early exit may leave a scale with no rows at all, so
    scales read from the data alone can undercount and make the union-mode bounds too narrow.
    """
    if table.num_rows == 0:
        raise UserError("the counts table has no rows")
    image_id = table["image_id"].to_numpy()
    label = table["label"].to_numpy()
    sigma = table["sigma"].to_numpy()
    if np.isnan(sigma).any() or (sigma <= 0).any():
        raise UserError("sigma must be positive in every counts row")
    select, estimate = _dense(table["select_counts"], "select_counts"), _dense(table["estimate_counts"], "estimate_counts")
    if select.shape[1] != estimate.shape[1]:
        raise UserError("select_counts and estimate_counts have different numbers of classes")
    image_ids, row_image = np.unique(image_id, return_inverse=True)
    found = np.unique(sigma)
    if sigmas is None:
        sigmas = found[::-1].copy()
    else:
        sigmas = np.array(sorted({float(s) for s in sigmas}, reverse=True))
        unknown = np.setdiff1d(found, sigmas)
        if unknown.size:
            raise UserError(f"counts hold sigma(s) {unknown.tolist()} outside the run's scales {sigmas.tolist()}")
    row_scale = np.searchsorted(-sigmas, -sigma)
    keys = row_image * len(sigmas) + row_scale
    unique_keys, first = np.unique(keys, return_index=True)
    if len(unique_keys) != len(keys):
        raise UserError(f"{len(keys) - len(unique_keys)} duplicate (image_id, sigma) rows in the counts table")
    labels = np.full(len(image_ids), -1, dtype=np.int64)
    labels[row_image] = label
    if (labels[row_image] != label).any():
        raise UserError("an image_id appears with two different labels")
    num_classes = select.shape[1]
    shape = (len(image_ids), len(sigmas), num_classes)
    select_counts, estimate_counts = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    present = np.zeros(shape[:2], dtype=bool)
    select_counts[row_image, row_scale] = select
    estimate_counts[row_image, row_scale] = estimate
    present[row_image, row_scale] = True
    return CountsArrays(image_ids, labels, sigmas, select_counts, estimate_counts, present)
