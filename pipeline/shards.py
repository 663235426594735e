"""Counts shards on any fsspec filesystem: written whole or not at all, named by their content.

A shard holds the counts rows of one actor batch. Its name is derived from the batch's sigmas and
image ids, so a retried batch rewrites the same file with the same (counter-seeded) counts instead
of adding a duplicate. Local writes go to a hidden temp name and are renamed into place; object
stores make a PUT visible only once complete. Readers still verify every footer and ignore a shard
they cannot read, so a SIGKILL at any point never leaves data a resume would trust.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.counts import COUNTS_SCHEMA

logger = logging.getLogger(__name__)


def shard_name(sigmas: Sequence[float], image_ids: np.ndarray) -> str:
    ids = np.sort(np.asarray(image_ids, dtype=np.int64))
    digest = hashlib.blake2b(ids.tobytes() + repr([float(s) for s in sigmas]).encode(), digest_size=6).hexdigest()
    scales = "_".join(f"{float(s):g}" for s in sigmas)
    return f"part-s{scales}-i{ids[0]:09d}-{ids[-1]:09d}-{digest}.parquet"


def write_shard(table: pa.Table, directory: str, name: str) -> str:
    """Write `table` as directory/name so that no reader ever sees a partial file."""
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    final = f"{root.rstrip('/')}/{name}"
    if "file" in fs.protocol or "local" in fs.protocol:
        tmp = f"{root.rstrip('/')}/.{name}.{uuid.uuid4().hex}.tmp"
        with fs.open(tmp, "wb") as handle:
            pq.write_table(table, handle)
        fs.mv(tmp, final)
    else:
        with fs.open(final, "wb") as handle:
            pq.write_table(table, handle)
    return final


def read_shards(directory: str) -> pa.Table:
    """All readable shards under `directory` (empty table if none); unreadable ones are skipped
    with a warning because a resume recomputes them."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.exists(root):
        return COUNTS_SCHEMA.empty_table()
    tables = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/part-*.parquet")):
        try:
            with fs.open(path, "rb") as handle:
                tables.append(pq.read_table(handle).select(COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA))
        except (pa.ArrowException, OSError, KeyError) as error:
            logger.warning("ignoring unreadable counts shard %s (%s); it will be recomputed", path, error)
    return pa.concat_tables(tables) if tables else COUNTS_SCHEMA.empty_table()
