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
    """A Parquet file read from a copy of its bytes in Arrow-owned memory (its schema, some columns, or
    all of them).

    Arrow decodes column chunks on its pool threads, and whichever thread drops the last page reader
    frees the input buffer. Were that buffer Python's (`pa.BufferReader(bytes)`, an fsspec file), the
    free needs the GIL; during interpreter shutdown the thread cannot take it, exits inside a noexcept
    destructor and the process aborts after its work is done ("terminate called without an active
    exception", exit -6, apache/arrow#34314; seen in CI and reproduced here under load, core dump:
    `PyBuffer::~PyBuffer` on a `ThreadPool` worker). An Arrow-allocated copy frees without Python."""
    fs, path = fsspec.core.url_to_fs(url)
    payload = fs.cat_file(path)
    buffer = pa.allocate_buffer(len(payload))
    memoryview(buffer).cast("B")[:] = payload
    del payload
    with pq.ParquetFile(pa.BufferReader(buffer)) as parquet:
        yield parquet
