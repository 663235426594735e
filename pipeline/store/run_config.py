"""The run's own record under OUT: its settings (run_config.json, and a copy in every shard's
Parquet metadata) and the image ids it was asked to certify (images.parquet).

Why both: `--resume` must refuse changed settings, and `jobs/reduce.py` must know how counts were
sampled (an adaptive run's counts need the sequential reduce) even for a counts directory copied
without its run config. The image list lets reduce and certify report images with no rows instead
of silently shrinking the denominator.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.store.atomic import read_parquet, write_bytes, write_parquet

RUN_CONFIG = "run_config.json"
IMAGES = "images.parquet"
METADATA_KEY = b"mdds.run"


def join(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}"


def check_resume(out: str, settings: dict, resume: bool) -> None:
    """Write the run's settings to OUT/run_config.json, or on resume check they are unchanged."""
    url = join(out, RUN_CONFIG)
    fs, path = fsspec.core.url_to_fs(url)
    if resume and fs.exists(path):
        found = json.loads(fs.cat_file(path))
        if found != settings:
            changed = _changed(found, settings)
            raise UserError(f"--resume with different settings than the interrupted run: {', '.join(changed)}")
    write_bytes(url, json.dumps(settings, indent=2).encode())


def _changed(found: dict, wanted: dict, prefix: str = "") -> list[str]:
    """Names of the settings that differ; nested ones as parent.name (e.g. inputs.denoiser_fit)."""
    names = []
    for key in sorted(found.keys() | wanted.keys()):
        old, new = found.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            names += _changed(old, new, f"{prefix}{key}.")
        elif old != new:
            names.append(f"{prefix}{key}")
    return names


def shard_metadata(settings: dict) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps(settings, sort_keys=True).encode()}


def write_image_ids(out: str, image_ids: np.ndarray) -> None:
    write_parquet(pa.table({"image_id": pa.array(np.asarray(image_ids, np.int64))}), join(out, IMAGES))


def read_image_ids(out: str) -> np.ndarray | None:
    """The ids a run was asked to certify, or None when OUT has no images.parquet (a bare counts copy)."""
    fs, path = fsspec.core.url_to_fs(join(out, IMAGES))
    if not fs.exists(path):
        return None
    return read_parquet(join(out, IMAGES))["image_id"].to_numpy()


def counts_run_settings(counts: str) -> dict | None:
    """How the counts at `counts` (a counts/ directory or one Parquet file, local or fsspec URL) were
    sampled: the run_config.json of the run directory holding counts/, else the settings in the
    metadata of the first shard that has them, else None (bare counts: fixed n)."""
    fs, location = fsspec.core.url_to_fs(counts)  # local paths come back absolute, so `parent` is real
    location = location.rstrip("/")
    fs.invalidate_cache(location)  # a listing cached earlier in this process misses what actors wrote since
    is_dir = fs.isdir(location)
    config = join(location.rsplit("/", 1)[0], RUN_CONFIG) if "/" in location else None
    if is_dir and config and fs.isfile(config):
        return json.loads(fs.cat_file(config))
    files = sorted(p for p in fs.find(location) if p.endswith(".parquet")) if is_dir else (
        [location] if fs.isfile(location) else [])
    for file in files:
        try:
            with fs.open(file, "rb") as handle:  # the footer only, not the whole shard
                metadata = pq.read_schema(handle).metadata or {}
        except (pa.ArrowException, OSError):
            continue
        if METADATA_KEY in metadata:
            return json.loads(metadata[METADATA_KEY])
    return None
