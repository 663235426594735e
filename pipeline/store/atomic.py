"""Whole-or-nothing writes on any fsspec filesystem: the one way mdds writes a file under OUT (and the
matching whole-file Parquet read).

Local files go to a hidden temp name beside the target and are renamed into place; object stores
make a PUT visible only once complete. A SIGKILL at any point therefore never leaves a partial file
that a resume or a reader would trust.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def write_bytes(url: str, payload: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" in fs.protocol or "local" in fs.protocol:
        name = path.rsplit("/", 1)[-1]
        tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp" if parent else f".{name}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, payload)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, payload)


def write_parquet(table: pa.Table, url: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(url, buffer.getvalue())


def read_parquet(url: str) -> pa.Table:
    """Read a whole Parquet file (see open_parquet)."""
    with open_parquet(url) as parquet:
        return parquet.read()


@contextmanager
def open_parquet(url: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file read from its bytes, to be read synchronously on the calling thread (its schema,
    some columns, or all of them).

    `pq.read_table` on a Python-owned buffer (or an fsspec file object) scans through Arrow's async
    dataset scanner, whose pool threads may drop the last reference to that buffer after the call
    returns; when that happens during interpreter shutdown the thread cannot take the GIL, exits
    inside a noexcept destructor and the process aborts ("terminate called without an active
    exception", apache/arrow#34314; about 2 % of short jobs here). `ParquetFile.read` holds the
    buffer until it returns and releases it on this thread."""
    fs, path = fsspec.core.url_to_fs(url)
    with pq.ParquetFile(pa.BufferReader(fs.cat_file(path))) as parquet:
        yield parquet
