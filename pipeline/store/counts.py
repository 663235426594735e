"""The counts table: one row per (image, sigma) with the select/estimate class counts.

This is the contract between the sampling stage (Ray actors writing Parquet) and the reduce stage
(pure numpy): everything the reduce needs, including n and the sigmas, is read from the data.

Reading streams. Each image's certificate depends only on its own rows, and the dense (images, scales,
classes) arrays of a whole ImageNet run are gigabytes, so a counts location (a Parquet file, a directory
of shards, or an fsspec URL of either) is first indexed, reading only the image_id, label and sigma
columns of every file (`index_counts`), and then read group of images by group, each group complete
across all files (`CountsIndex.groups`). Reading everything at once (`read_counts`) is one group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.errors import UserError
from pipeline.store.atomic import open_parquet, read_parquet

COUNTS_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("label", pa.int64()),
    ("sigma", pa.float64()),
    ("select_counts", pa.list_(pa.int64())),
    ("estimate_counts", pa.list_(pa.int64())),
])
#: The columns the index reads from every file: which images (and scales) a file holds.
INDEX_SCHEMA = pa.schema([COUNTS_SCHEMA.field(name) for name in ("image_id", "label", "sigma")])
INDEX_COLUMNS = INDEX_SCHEMA.names
#: Images per group of `CountsIndex.groups`: ImageNet's 3 scales x 1,000 classes make a group's dense
#: arrays of both phases about 50 MB, and the reduce's peak a few times that.
DEFAULT_IMAGES_PER_GROUP = 1024
#: At most this many bytes of files whose rows reach a later group are held between groups (CountsIndex.tables).
DEFAULT_HOLD_BYTES = 256 << 20


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


def read_counts(location: str) -> pa.Table:
    """Read a counts Parquet file or directory (local or a URL), checking the schema; bad input → one
    UserError line."""
    index = index_counts(location)
    if index.unreadable:
        raise UserError(f"cannot read counts Parquet under {location}: {index.unreadable[0]}")
    return index.table()


def read_counts_reporting(location: str) -> tuple[pa.Table, list[str]]:
    """Like read_counts, but a directory's unreadable files are returned by name (with the error)
    instead of failing the read, so that the reduce can name them beside the images they held. A
    single unreadable file is still an error: there is nothing else to reduce."""
    index = index_counts(location)
    return index.table(), list(index.unreadable)


def read_counts_groups(location: str, sigmas: Sequence[float] | None = None,
                       images_per_group: int = DEFAULT_IMAGES_PER_GROUP) -> Iterator[CountsArrays]:
    """`counts_to_arrays(read_counts(location), sigmas)` in consecutive groups of `images_per_group`
    images, ascending by image_id, without ever holding the dense arrays of every image: the groups
    concatenated are those arrays. `index_counts` for unreadable files, image subsets and scale subsets."""
    index = index_counts(location)
    if index.unreadable:
        raise UserError(f"cannot read counts Parquet under {location}: {index.unreadable[0]}")
    return index.groups(images_per_group, sigmas)


@dataclass(frozen=True, eq=False)
class CountsIndex:
    """Which file holds which counts rows: one entry per row (the file, the row's position in it, its
    image_id, label and sigma), without the class counts. Rows repeating a row of an earlier file
    exactly are left out (`_identical_repeats`). Built by `index_counts`; `only` narrows it."""

    location: str
    files: tuple[str, ...]  # URLs of the readable files, in sorted order
    unreadable: tuple[str, ...]  # "name (first line of the error)" of each file that could not be read
    file: np.ndarray  # int64 (rows,): index into files
    position: np.ndarray  # int64 (rows,): row number within its file
    image_id: np.ndarray  # int64 (rows,)
    label: np.ndarray  # int64 (rows,)
    sigma: np.ndarray  # float64 (rows,)

    @property
    def image_ids(self) -> np.ndarray:
        """The images with at least one row, ascending."""
        return np.unique(self.image_id)

    def only(self, image_ids: np.ndarray | None = None, sigmas: Sequence[float] | None = None) -> CountsIndex:
        """The rows of these images and/or these scales only (a resumed run's directory may hold other
        images; a reduce over a subset of the scales drops the others' rows)."""
        drop = np.zeros(len(self.file), dtype=bool)
        if image_ids is not None:
            drop |= ~np.isin(self.image_id, np.asarray(image_ids, dtype=np.int64))
        if sigmas is not None:
            drop |= ~np.isin(self.sigma, np.asarray(sigmas, dtype=np.float64))
        return self._without(drop)

    def table(self) -> pa.Table:
        """Every indexed row, in file order (an empty COUNTS_SCHEMA table when there are none)."""
        if len(self.file) == 0:
            return COUNTS_SCHEMA.empty_table()
        return next(self.tables(len(self.image_ids)))

    def tables(self, images_per_group: int = DEFAULT_IMAGES_PER_GROUP,
               hold_bytes: int = DEFAULT_HOLD_BYTES) -> Iterator[pa.Table]:
        """The rows of consecutive groups of `images_per_group` images (ascending image_id), each group
        with every indexed row of its images, in file order.

        A file whose images reach a later group is held (as Arrow rows) until then while the files held
        total at most `hold_bytes`, and read again beyond: shards of consecutive images, as a run writes
        them, straddle a group boundary one or two at a time and are each read once, while a layout that
        spreads every group over every file (one big file, images dealt out at random) costs reading
        time instead of memory."""
        if images_per_group < 1:
            raise ValueError(f"images_per_group must be >= 1, got {images_per_group}")
        return self._tables(images_per_group, hold_bytes)

    def _tables(self, images_per_group: int, hold_bytes: int) -> Iterator[pa.Table]:
        group = np.searchsorted(self.image_ids, self.image_id) // images_per_group
        order = np.lexsort((self.position, self.file, group))  # by group, then file order
        num_groups = int(group.max()) + 1 if len(group) else 0
        bounds = np.searchsorted(group[order], np.arange(num_groups + 1))
        last_group = np.full(len(self.files), -1)
        np.maximum.at(last_group, self.file, group)
        held: dict[int, pa.Table] = {}
        held_bytes = 0
        for index in range(num_groups):
            rows = order[bounds[index]:bounds[index + 1]]
            files, starts = np.unique(self.file[rows], return_index=True)
            parts = []
            for file, start, stop in zip(files.tolist(), starts, [*starts[1:], len(rows)]):
                if file in held:
                    table = held.pop(file)
                    held_bytes -= table.nbytes
                else:
                    table = self._read(file)
                positions = self.position[rows[start:stop]]
                parts.append(table if len(positions) == table.num_rows else table.take(pa.array(positions)))
                if last_group[file] > index and held_bytes + table.nbytes <= hold_bytes:
                    held[file] = table
                    held_bytes += table.nbytes
            yield pa.concat_tables(parts)

    def groups(self, images_per_group: int = DEFAULT_IMAGES_PER_GROUP, sigmas: Sequence[float] | None = None,
               hold_bytes: int = DEFAULT_HOLD_BYTES) -> Iterator[CountsArrays]:
        """`counts_to_arrays` of each of `tables(images_per_group)`: the same arrays as pivoting every
        row at once, group by group. Every check that needs only the index (no rows, sigma outside
        `sigmas`, duplicate (image_id, sigma) rows, two labels for an image) runs on all rows now,
        before anything is read; the class counts are checked as their groups are read."""
        scales = _row_keys(self.image_id, self.label, self.sigma, sigmas).sigmas
        return _same_classes(counts_to_arrays(table, scales) for table in self.tables(images_per_group, hold_bytes))

    def _read(self, file: int) -> pa.Table:
        return _read_counts_file(self.files[file], self.location)

    def _without(self, drop: np.ndarray) -> CountsIndex:
        if not drop.any():
            return self
        keep = ~drop
        return replace(self, file=self.file[keep], position=self.position[keep], image_id=self.image_id[keep],
                       label=self.label[keep], sigma=self.sigma[keep])


def index_counts(location: str, missing_ok: bool = False) -> CountsIndex:
    """Index the counts at `location` (a Parquet file, or the *.parquet files under a directory, names
    starting with "." or "_" excepted; a local path or an fsspec URL): every file's schema is checked
    and its image_id, label and sigma columns read. A directory's unreadable files are listed in
    `unreadable` (a single unreadable file is an error). `missing_ok`: a location that does not exist
    or holds no Parquet files is an empty index instead of an error (a run's counts before its first
    shard)."""
    fs, root = fsspec.core.url_to_fs(location)
    fs.invalidate_cache(root)  # object stores' cached listings miss the shards other processes (actors) wrote since
    single = fs.isfile(root)
    files, unreadable, keys = [], [], []
    for path in _counts_paths(fs, root, location, missing_ok):
        url = fs.unstrip_protocol(path)
        try:
            with open_parquet(url) as parquet:
                validate_counts_schema(parquet.schema_arrow, location if single else _shown(fs, path))
                keys.append(parquet.read(columns=INDEX_COLUMNS, use_threads=False).cast(INDEX_SCHEMA))
        except (pa.ArrowException, OSError) as error:
            if single:
                raise UserError(f"cannot read counts Parquet under {location}: {_first_line(error)}") from error
            unreadable.append(f"{path.rsplit('/', 1)[-1]} ({_first_line(error)})")
            continue
        files.append(url)
    rows = pa.concat_tables(keys) if keys else INDEX_SCHEMA.empty_table()
    index = CountsIndex(
        location, tuple(files), tuple(unreadable),
        file=np.repeat(np.arange(len(keys), dtype=np.int64), [table.num_rows for table in keys]),
        position=np.concatenate([np.arange(table.num_rows, dtype=np.int64) for table in keys]
                                or [np.array([], np.int64)]),
        **{name: rows[name].combine_chunks().to_numpy(zero_copy_only=False) for name in INDEX_COLUMNS})
    return index._without(_identical_repeats(index))


@dataclass(frozen=True, eq=False)
class _TableIndex(CountsIndex):
    """A counts table already in memory (the Python API's), indexed like a file of that table."""

    source: pa.Table = field(default_factory=COUNTS_SCHEMA.empty_table)

    def _read(self, file: int) -> pa.Table:
        return self.source


def index_table(table: pa.Table) -> CountsIndex:
    """`index_counts` of a table in memory: one 'file', checked like one."""
    validate_counts_schema(table.schema, "the counts table")
    table = table.select(COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA)
    return _TableIndex("the counts table", ("<table>",), (), file=np.zeros(table.num_rows, np.int64),
                       position=np.arange(table.num_rows, dtype=np.int64),
                       **{name: table[name].combine_chunks().to_numpy(zero_copy_only=False) for name in INDEX_COLUMNS},
                       source=table)


def _counts_paths(fs: fsspec.AbstractFileSystem, root: str, location: str, missing_ok: bool) -> list[str]:
    if fs.isfile(root):
        return [root]
    if fs.isdir(root):
        paths = sorted(path for path in fs.find(root)
                       if path.endswith(".parquet") and not path.rsplit("/", 1)[-1].startswith((".", "_")))
        if paths or missing_ok:
            return paths
        raise UserError(f"no .parquet files under {location}")
    if missing_ok:
        return []
    raise UserError(f"counts not found: {location}")


def _shown(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A file as a user names it: a plain path on the local disk, else its URL."""
    local = "file" in fs.protocol or "local" in fs.protocol
    return path if local else fs.unstrip_protocol(path)


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _read_counts_file(url: str, location: str) -> pa.Table:
    """A whole indexed file in COUNTS_SCHEMA; one that became unreadable since it was indexed is an error."""
    try:
        return read_parquet(url).select(COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"cannot read counts Parquet under {location}: {url.rsplit('/', 1)[-1]} "
                        f"({_first_line(error)})") from error


def _identical_repeats(index: CountsIndex) -> np.ndarray:
    """Rows to leave out: those identical to a row of an earlier file. An actor of a killed driver can
    finish its batch after a resume has started and recomputed the same images in differently composed
    (differently named) shards; counts are deterministic, so such rows are identical and one copy is the
    truth. Rows that differ for one (image_id, sigma), or repeat within one file, stay, and
    counts_to_arrays refuses them. Only the files holding a repeated (image_id, sigma) are read again."""
    drop = np.zeros(len(index.file), dtype=bool)
    order = np.lexsort((index.position, index.file, index.sigma, index.image_id))
    same = (np.diff(index.image_id[order]) == 0) & (np.diff(index.sigma[order]) == 0)
    if not same.any():  # the usual case: nothing repeated, nothing to compare
        return drop
    in_run = np.zeros(len(order), dtype=bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    repeated = order[in_run]  # by key, then file: the first file holding a content is the earliest
    content: dict[int, tuple] = {}
    for file in np.unique(index.file[repeated]).tolist():
        rows = repeated[index.file[repeated] == file]
        values = index._read(file).take(pa.array(index.position[rows])).to_pylist()
        content.update((row, (v["image_id"], v["sigma"], v["label"], tuple(v["select_counts"]),
                              tuple(v["estimate_counts"]))) for row, v in zip(rows.tolist(), values))
    first_file: dict[tuple, int] = {}
    for row in repeated.tolist():
        if first_file.setdefault(content[row], int(index.file[row])) != index.file[row]:
            drop[row] = True
    return drop


def validate_counts_schema(schema: pa.Schema, where: str) -> None:
    missing = [f.name for f in COUNTS_SCHEMA if f.name not in schema.names]
    if missing:
        raise UserError(f"{where} is not a counts table: missing column(s) {', '.join(missing)} "
                        f"(expected {', '.join(COUNTS_SCHEMA.names)})")
    for expected in COUNTS_SCHEMA:
        actual = schema.field(expected.name).type
        compatible = actual == expected.type or (
            pa.types.is_list(expected.type) and (pa.types.is_list(actual) or pa.types.is_large_list(actual))
            and pa.types.is_integer(actual.value_type)
        ) or (pa.types.is_integer(expected.type) and pa.types.is_integer(actual)) or (
            pa.types.is_floating(expected.type) and pa.types.is_floating(actual))
        if not compatible:
            raise UserError(f"{where}: column {expected.name} has type {actual}, expected {expected.type}")


@dataclass(frozen=True)
class _RowKeys:
    """Where each row goes in the dense arrays."""

    image_ids: np.ndarray  # the images, ascending
    labels: np.ndarray  # per image
    sigmas: np.ndarray  # the scales, descending
    row_image: np.ndarray  # per row: index into image_ids
    row_scale: np.ndarray  # per row: index into sigmas


def _row_keys(image_id: np.ndarray, label: np.ndarray, sigma: np.ndarray,
              sigmas: Sequence[float] | None) -> _RowKeys:
    """Check the rows' keys (no rows, sigmas, duplicate (image_id, sigma), labels) and place each row."""
    if len(image_id) == 0:
        raise UserError("the counts table has no rows")
    if np.isnan(sigma).any() or (sigma <= 0).any():
        raise UserError("sigma must be positive in every counts row")
    image_ids, row_image = np.unique(image_id, return_inverse=True)
    found = np.unique(sigma)
    if sigmas is None:
        scales = found[::-1].copy()
    else:
        scales = np.array(sorted({float(s) for s in sigmas}, reverse=True))
        unknown = np.setdiff1d(found, scales)
        if unknown.size:
            raise UserError(f"counts hold sigma(s) {unknown.tolist()} outside the run's scales {scales.tolist()}")
    row_scale = np.searchsorted(-scales, -sigma)
    keys = row_image * len(scales) + row_scale
    distinct = len(np.unique(keys))
    if distinct != len(keys):
        raise UserError(f"{len(keys) - distinct} duplicate (image_id, sigma) rows in the counts table")
    labels = np.full(len(image_ids), -1, dtype=np.int64)
    labels[row_image] = label
    if (labels[row_image] != label).any():
        raise UserError("an image_id appears with two different labels")
    return _RowKeys(image_ids, labels, scales, row_image, row_scale)


def counts_to_arrays(table: pa.Table, sigmas: Sequence[float] | None = None) -> CountsArrays:
    """Pivot rows into (image, stage, class) arrays; duplicate (image_id, sigma) rows are an error.

    `sigmas` are the run's scales. Pass them whenever known: the alpha split depends on the number
    of scales the cascade could consult, and early exit may leave a scale with no rows at all, so
    scales read from the data alone can undercount and make the union-mode bounds too narrow.
    """
    keys = _row_keys(table["image_id"].to_numpy(), table["label"].to_numpy(), table["sigma"].to_numpy(), sigmas)
    num_classes = _num_classes(table["select_counts"], "select_counts")
    if _num_classes(table["estimate_counts"], "estimate_counts") != num_classes:
        raise UserError("select_counts and estimate_counts have different numbers of classes")
    shape = (len(keys.image_ids), len(keys.sigmas), num_classes)
    select_counts = _dense(table["select_counts"], "select_counts", keys, shape)
    estimate_counts = _dense(table["estimate_counts"], "estimate_counts", keys, shape)
    present = np.zeros(shape[:2], dtype=bool)
    present[keys.row_image, keys.row_scale] = True
    return CountsArrays(keys.image_ids, keys.labels, keys.sigmas, select_counts, estimate_counts, present)


def _num_classes(column: pa.ChunkedArray, name: str) -> int:
    lengths = np.unique(np.concatenate([chunk.value_lengths().to_numpy(zero_copy_only=False) for chunk in column.chunks]
                                       or [np.array([], np.int64)]))
    if len(lengths) != 1:
        raise UserError(f"{name} rows have different numbers of classes: {lengths.tolist()}")
    return int(lengths[0])


def _dense(column: pa.ChunkedArray, name: str, keys: _RowKeys, shape: tuple[int, int, int]) -> np.ndarray:
    """(images, scales, classes) from a list column, chunk by chunk (no combined copy of the column)."""
    dense = np.zeros(shape, np.int64)
    start = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        if values.size and values.min() < 0:
            raise UserError(f"{name} contains negative counts")
        rows = slice(start, start + len(chunk))
        dense[keys.row_image[rows], keys.row_scale[rows]] = values.reshape(len(chunk), shape[2])
        start += len(chunk)
    return dense


def _same_classes(groups: Iterator[CountsArrays]) -> Iterator[CountsArrays]:
    """Pass the groups on, refusing one whose number of classes differs from the first's (within a
    group counts_to_arrays checks it)."""
    first = None
    for arrays in groups:
        width = arrays.select_counts.shape[2]
        if first is not None and width != first:
            raise UserError(f"select_counts rows have different numbers of classes: {sorted({first, width})}")
        first = width
        yield arrays
