"""Counts shards on any fsspec filesystem: written whole or not at all, named by their content.

A shard holds the counts rows of one actor batch. Its name is derived from the batch's sigmas and
image ids, so a retried batch rewrites the same file with the same (counter-seeded) counts instead
of adding a duplicate. Shards are written atomically (store/atomic.py) and carry the run's settings
in their Parquet key-value metadata (store/run_config.py), so a counts directory copied without its
run_config.json still says how it was sampled. Readers verify every footer and ignore a shard they
cannot read, so a SIGKILL at any point never leaves data a resume would trust.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.store.atomic import write_parquet
from pipeline.store.counts import index_counts

logger = logging.getLogger(__name__)


def shard_name(sigmas: Sequence[float], image_ids: np.ndarray) -> str:
    ids = np.sort(np.asarray(image_ids, dtype=np.int64))
    digest = hashlib.blake2b(ids.tobytes() + repr([float(s) for s in sigmas]).encode(), digest_size=6).hexdigest()
    scales = "_".join(f"{float(s):g}" for s in sigmas)
    return f"part-s{scales}-i{ids[0]:09d}-{ids[-1]:09d}-{digest}.parquet"


def write_shard(table: pa.Table, directory: str, name: str, metadata: dict[bytes, bytes] | None = None) -> str:
    """Write `table` as directory/name so that no reader ever sees a partial file."""
    final = f"{directory.rstrip('/')}/{name}"
    write_parquet(table.replace_schema_metadata(metadata) if metadata else table, final)
    return final


def read_shards(directory: str) -> pa.Table:
    """All readable shards under `directory` (empty table if none) in one table, a row repeated exactly
    by a later shard once (store/counts.py `index_counts`); unreadable ones are skipped with a warning
    because a resume recomputes them. For the rows of a whole run group by group, use
    `index_counts(directory, missing_ok=True).groups(...)`."""
    index = index_counts(directory, missing_ok=True)
    for unreadable in index.unreadable:
        logger.warning("ignoring unreadable counts shard %s; it will be recomputed", unreadable)
    return index.table()
