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

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.store.atomic import read_parquet, write_parquet
from pipeline.store.counts import COUNTS_SCHEMA

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
    """All readable shards under `directory` (empty table if none); unreadable ones are skipped
    with a warning because a resume recomputes them."""
    fs, root = fsspec.core.url_to_fs(directory)
    if not fs.exists(root):
        return COUNTS_SCHEMA.empty_table()
    tables = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/part-*.parquet")):
        try:
            table = read_parquet(fs.unstrip_protocol(path))
            tables.append(table.select(COUNTS_SCHEMA.names).cast(COUNTS_SCHEMA))
        except (pa.ArrowException, OSError, KeyError) as error:
            logger.warning("ignoring unreadable counts shard %s (%s); it will be recomputed", path, error)
    return _drop_repeated_rows(pa.concat_tables(tables)) if tables else COUNTS_SCHEMA.empty_table()


def _drop_repeated_rows(table: pa.Table) -> pa.Table:
    """Keep one of several identical rows. An actor of a killed driver can finish its batch after a
    resume has started and recomputed the same images in differently composed (differently named)
    shards; counts are deterministic, so such rows are identical and one copy is the truth. Rows that
    differ for one (image_id, sigma) stay, and counts_to_arrays refuses them."""
    keys = np.stack([table["image_id"].to_numpy().astype(np.float64), table["sigma"].to_numpy()], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    if len(first) == table.num_rows:  # the usual case: nothing repeated, nothing to compare
        return table
    inverse = inverse.reshape(-1)
    keep = []
    for index in range(table.num_rows):
        original = int(first[inverse[index]])
        if index == original or not all(table[name][index] == table[name][original]
                                        for name in ("label", "select_counts", "estimate_counts")):
            keep.append(index)
    return table.take(pa.array(keep, pa.int64()))
