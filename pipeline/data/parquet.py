"""Parquet files of encoded images (PNG/JPEG bytes, or Hugging Face {bytes, path} structs) and labels.

image_id is the `image_id` column when there is one, else the row's position in the files taken in
sorted path order. `ray.data.read_parquet` cannot say which position a row had (its output order is not
stable), so the positions are computed here from the Parquet footers and Ray reads exactly the row
groups holding selected rows, one task each.
"""

import posixpath
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from fsspec import AbstractFileSystem

from pipeline.errors import UserError
from pipeline.data.decode import ImageMode, OnBadImage, Resample, check_options, output_shape
from pipeline.data.filesystems import display_path, resolve
from pipeline.data.info import Source, SourceInfo, chosen
from pipeline.data.ray_steps import decode_step
from pipeline.data.selection import select_image_ids


@dataclass(frozen=True)
class _RowGroups:
    """Per source row (all files, in order): its id, label, file, row group and position in the group."""

    image_ids: np.ndarray
    labels: np.ndarray
    file_index: np.ndarray
    row_group: np.ndarray
    row_in_group: np.ndarray


def parquet_image_source(
    path: str,
    *,
    image_column: str = "image",
    label_column: str = "label",
    id_column: str | None = None,
    mode: ImageMode = "RGB",
    resize: int | None = None,
    crop: int | None = None,
    skip: int = 1,
    num_images: int | None = None,
    start: int = 0,
    on_bad_image: OnBadImage = "fail",
    resample: Resample = "pil-bilinear",
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """Rows {image_id, label, image (C, H, W) float32 in [0, 1]} of the selected rows of a Parquet file or folder.

    `id_column` None uses a column named "image_id" if the files have one, else row positions.
    Only the row groups holding selected rows are read, and only the selected rows decoded.
    """
    check_options(mode, resize, crop, on_bad_image, resample)
    fs, root_path = resolve(path, what="Parquet path", storage_options=storage_options)
    files = sorted(p for p in fs.find(root_path) if p.endswith(".parquet")) if fs.isdir(root_path) else [root_path]
    if not files:
        raise UserError(f"no .parquet files under {path}")
    image_is_struct, id_column = _check_schema(fs, files[0], image_column, label_column, id_column)
    rows = _index_rows(fs, files, image_column, label_column, id_column)
    selected = select_image_ids(rows.image_ids, start=start, skip=skip, num_images=num_images)
    positions = np.flatnonzero(np.isin(rows.image_ids, selected))
    location_of = {
        int(rows.image_ids[p]): f"{display_path(fs, files[rows.file_index[p]])} row group {rows.row_group[p]} "
        f"row {rows.row_in_group[p]}"
        for p in positions
    }
    info = SourceInfo(
        num_classes=int(rows.labels.max()) + 1,
        class_names=None,
        image_shape=output_shape(mode, crop),
        locations=dict(sorted(location_of.items())),
    )

    def read(image_ids: Collection[int] | None = None, num_blocks: int | None = None) -> ray.data.Dataset:
        wanted = np.flatnonzero(np.isin(rows.image_ids, chosen(location_of, image_ids)))
        work = [
            {
                "file": files[file_index],
                "row_group": row_group,
                "rows": rows.row_in_group[group].tolist(),
                "image_ids": rows.image_ids[group].tolist(),
                "labels": rows.labels[group].tolist(),
                "locations": [location_of[int(image_id)] for image_id in rows.image_ids[group]],
            }
            for (file_index, row_group), group in _group_positions(wanted, rows).items()
        ]
        blocks = len(work) if num_blocks is None else max(1, min(num_blocks, len(work)))
        items = ray.data.from_items(work, override_num_blocks=blocks).flat_map(
            _read_rows, fn_kwargs={"fs": fs, "image_column": image_column, "image_is_struct": image_is_struct}
        )
        return decode_step(items, mode=mode, resize=resize, crop=crop, on_bad_image=on_bad_image,
                           resample=resample)

    return Source(info, read)


def _check_schema(
    fs: AbstractFileSystem, first_file: str, image_column: str, label_column: str, id_column: str | None
) -> tuple[bool, str | None]:
    """Whether the image column is a {bytes, path} struct, and the id column to use (None: positions)."""
    with fs.open(first_file, "rb") as handle:
        schema = pq.read_schema(handle)
    names = schema.names
    for role, name in (("image", image_column), ("label", label_column)):
        if name not in names:
            raise UserError(f"{posixpath.basename(first_file)} has no {role} column {name!r}; columns: {names}")
    if id_column is None:
        id_column = "image_id" if "image_id" in names else None
    elif id_column not in names:
        raise UserError(f"{posixpath.basename(first_file)} has no id column {id_column!r}; columns: {names}")
    image_type = schema.field(image_column).type
    image_is_struct = pa.types.is_struct(image_type)
    if image_is_struct and image_type.get_field_index("bytes") < 0:
        raise UserError(f"image column {image_column!r} is a struct without a 'bytes' field: {image_type}")
    if not image_is_struct and not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise UserError(f"image column {image_column!r} must hold encoded image bytes, found {image_type}")
    return image_is_struct, id_column


def _index_rows(
    fs: AbstractFileSystem, files: list[str], image_column: str, label_column: str, id_column: str | None
) -> _RowGroups:
    """Read only the label (and id) columns and the footers, to place every row without touching images."""
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("ids", "labels", "file", "group", "row")}
    for file_index, file in enumerate(files):
        columns = [image_column, label_column] + ([id_column] if id_column else [])
        with fs.open(file, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            missing = [name for name in columns if name not in parquet.schema_arrow.names]
            if missing:  # pyarrow would silently read the other columns only
                raise UserError(f"{posixpath.basename(file)} lacks column(s) {missing} that {files[0]} has")
            # on this thread: a pool thread freeing the Python file handle at shutdown aborts the process
            # (see store.atomic.open_parquet)
            table = parquet.read(columns=columns[1:], use_threads=False)
            group_sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        parts["labels"].append(_integers(table.column(label_column), label_column, file))
        if id_column:
            parts["ids"].append(_integers(table.column(id_column), id_column, file))
        parts["file"].append(np.full(table.num_rows, file_index, dtype=np.int64))
        parts["group"].append(np.repeat(np.arange(len(group_sizes)), group_sizes))
        parts["row"].append(np.concatenate([np.arange(size) for size in group_sizes] or [np.zeros(0, np.int64)]))
    labels = np.concatenate(parts["labels"])
    if labels.size == 0:
        raise UserError(f"the Parquet files ({len(files)}) have no rows")
    image_ids = np.concatenate(parts["ids"]) if id_column else np.arange(labels.size, dtype=np.int64)
    if np.unique(image_ids).size != image_ids.size:
        raise UserError(f"column {id_column!r} has duplicate image ids")
    return _RowGroups(
        image_ids=image_ids,
        labels=labels,
        file_index=np.concatenate(parts["file"]),
        row_group=np.concatenate(parts["group"]).astype(np.int64),
        row_in_group=np.concatenate(parts["row"]).astype(np.int64),
    )


def _integers(column: pa.ChunkedArray, name: str, file: str) -> np.ndarray:
    """A column as non-negative int64, or a UserError saying what is wrong with it."""
    if not pa.types.is_integer(column.type):
        raise UserError(f"column {name!r} in {posixpath.basename(file)} must hold integers, found {column.type}")
    if column.null_count:
        raise UserError(f"column {name!r} in {posixpath.basename(file)} has missing values")
    values = column.to_numpy().astype(np.int64)
    if values.size and values.min() < 0:
        raise UserError(f"column {name!r} in {posixpath.basename(file)} has negative values")
    return values


def _group_positions(positions: np.ndarray, rows: _RowGroups) -> dict[tuple[int, int], np.ndarray]:
    """Selected positions grouped by (file, row group), the unit one Ray task reads."""
    groups: dict[tuple[int, int], list[int]] = {}
    for position in positions.tolist():
        groups.setdefault((int(rows.file_index[position]), int(rows.row_group[position])), []).append(position)
    return {key: np.array(members, dtype=np.int64) for key, members in groups.items()}


def _read_rows(item: dict, *, fs: AbstractFileSystem, image_column: str, image_is_struct: bool) -> list[dict]:
    """Ray step: the selected rows' image bytes from one row group, with their ids, labels and locations."""
    with fs.open(str(item["file"]), "rb") as handle:
        group = pq.ParquetFile(handle).read_row_group(int(item["row_group"]), columns=[image_column],
                                                      use_threads=False)  # see _index_rows
    images = group.column(image_column).take(pa.array(item["rows"], type=pa.int64()))
    if image_is_struct:
        images = pc.struct_field(images, "bytes")
    return [
        {"bytes": data, "image_id": image_id, "label": label, "location": location}
        for data, image_id, label, location in zip(
            images.to_pylist(), item["image_ids"], item["labels"], item["locations"], strict=True
        )
    ]
