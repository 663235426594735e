"""The OUT layout on object storage: every store/ reader and writer against a real S3-protocol server
(tests/s3_server.py), reached as users reach MinIO or an on-prem store, through AWS_ENDPOINT_URL.

What is checked goes through a second client where it matters (boto3 for the bytes, Arrow's own S3
client, a subprocess), so a test cannot pass by fsspec agreeing with itself.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.store.atomic import read_parquet, write_bytes, write_parquet
from pipeline.store.counts import counts_table, counts_to_arrays, read_counts, read_counts_reporting
from pipeline.store.run_config import (
    check_resume,
    counts_run_settings,
    read_image_ids,
    shard_metadata,
    write_image_ids,
)
from pipeline.store.shards import read_shards, shard_name, write_shard
from tests.conftest import REPO_ROOT

SETTINGS = {"strategy": "adaptive", "sigmas": [0.5, 0.25], "n": 1000, "inputs": {"denoiser_fit": "pad"}}


def counts_rows(first_id: int, num_images: int = 2) -> pa.Table:
    """Two scales per image, three classes; counts differ per image so a mixed-up row would show."""
    ids = np.repeat(np.arange(first_id, first_id + num_images), 2)
    sigmas = np.tile([0.5, 0.25], num_images)
    select = np.stack([ids % 3, ids % 5, 20 - ids % 3 - ids % 5], axis=1)
    estimate = select * 10 + np.arange(len(ids))[:, None]
    return counts_table(ids, ids % 3, sigmas, select, estimate)


def objects_under(url: str) -> dict[str, bytes]:
    """Every object under `url` as the server holds it, read with boto3 rather than fsspec."""
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix):].lstrip("/"): client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for item in listed}


def put_object(url: str, payload: bytes) -> None:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=payload)


def write_counts_dir(counts: str, settings: dict | None) -> pa.Table:
    """Two shards as the actors write them; returns their rows."""
    tables = [counts_rows(0), counts_rows(2)]
    for table in tables:
        ids = table["image_id"].to_numpy()
        write_shard(table, counts, shard_name([0.5, 0.25], ids), shard_metadata(settings) if settings else None)
    return pa.concat_tables(tables)


def test_atomic_writes_land_whole_on_the_server_and_read_back(s3_url):
    table = counts_rows(0)
    write_parquet(table, f"{s3_url}/results.parquet")
    write_bytes(f"{s3_url}/note.txt", b"first")
    write_bytes(f"{s3_url}/note.txt", b"second")  # an overwrite replaces, it never appends
    stored = objects_under(s3_url)
    assert set(stored) == {"results.parquet", "note.txt"}  # no temporary objects left beside them
    assert stored["note.txt"] == b"second"
    assert pq.read_table(io.BytesIO(stored["results.parquet"])).equals(table)
    assert read_parquet(f"{s3_url}/results.parquet").equals(table)


def test_arrow_s3_client_finds_the_server_through_the_same_variables(s3_url):
    """Ray Data hands s3:// paths to Arrow's own S3 client; it must read what mdds wrote via fsspec."""
    write_parquet(counts_rows(0), f"{s3_url}/counts.parquet")
    filesystem, path = pafs.FileSystem.from_uri(f"{s3_url}/counts.parquet")
    assert isinstance(filesystem, pafs.S3FileSystem)
    with filesystem.open_input_file(path) as handle:
        assert pq.ParquetFile(handle).read().equals(counts_rows(0))


def test_shards_round_trip_with_their_settings_and_skip_garbage(s3_url, caplog):
    counts = f"{s3_url}/counts"
    rows = write_counts_dir(counts, SETTINGS)
    assert read_shards(counts).sort_by([("image_id", "ascending"), ("sigma", "descending")]).equals(rows)
    footer = pq.ParquetFile(io.BytesIO(next(iter(objects_under(counts).values())))).schema_arrow.metadata
    assert json.loads(footer[b"mdds.run"]) == SETTINGS
    put_object(f"{counts}/part-garbage.parquet", b"not parquet")
    with caplog.at_level(logging.WARNING, logger="pipeline.store.shards"):
        assert read_shards(counts).num_rows == rows.num_rows
    assert "part-garbage.parquet" in caplog.text
    assert read_shards(f"{s3_url}/nothing-here").num_rows == 0


def test_shards_written_by_another_process_are_seen(s3_url):
    """The driver lists counts/ on resume, then actors (other processes) write shards, then the driver
    reads counts/ again: a listing cached by the first read must not hide the new shards. The
    subprocess also shows the endpoint reaches child processes through the environment alone."""
    counts = f"{s3_url}/counts"
    first = write_counts_dir(counts, None)
    assert read_shards(counts).num_rows == first.num_rows
    filesystem, root = fsspec.core.url_to_fs(counts)
    assert len(filesystem.ls(root)) == 2  # any listing in this process (s3fs caches them) comes before the writes
    write_elsewhere = (
        "import sys; from pipeline.store.shards import write_shard, shard_name; "
        "from tests.store.test_object_storage import counts_rows; "
        "write_shard(counts_rows(10), sys.argv[1], shard_name([0.5, 0.25], counts_rows(10)['image_id'].to_numpy()))"
    )
    subprocess.run([sys.executable, "-c", write_elsewhere, counts], cwd=REPO_ROOT, check=True, timeout=120)
    assert sorted(set(read_shards(counts)["image_id"].to_pylist())) == [0, 1, 2, 3, 10, 11]


def test_run_config_is_written_and_guards_resume(s3_url):
    check_resume(s3_url, SETTINGS, resume=False)
    assert json.loads(objects_under(s3_url)["run_config.json"]) == SETTINGS
    check_resume(s3_url, SETTINGS, resume=True)  # unchanged settings resume
    changed = {**SETTINGS, "n": 2000, "inputs": {"denoiser_fit": "resize"}}
    with pytest.raises(UserError, match=r"n, inputs\.denoiser_fit|inputs\.denoiser_fit, n"):
        check_resume(s3_url, changed, resume=True)
    assert json.loads(objects_under(s3_url)["run_config.json"]) == SETTINGS  # the refused run wrote nothing


def test_image_ids_round_trip(s3_url):
    assert read_image_ids(s3_url) is None
    ids = np.array([7, 3, 100_000], np.int64)
    write_image_ids(s3_url, ids)
    np.testing.assert_array_equal(read_image_ids(s3_url), ids)


def test_counts_are_read_from_a_url_like_from_disk(s3_url, tmp_path):
    counts = f"{s3_url}/counts"
    rows = write_counts_dir(counts, SETTINGS)
    for name, payload in objects_under(counts).items():  # the same shards on disk, for the reference read
        (tmp_path / name).write_bytes(payload)
    remote, local = counts_to_arrays(read_counts(counts)), counts_to_arrays(read_counts(str(tmp_path)))
    for field in ("image_ids", "labels", "sigmas", "select_counts", "estimate_counts", "present"):
        np.testing.assert_array_equal(getattr(remote, field), getattr(local, field))
    np.testing.assert_array_equal(remote.image_ids, np.unique(rows["image_id"].to_numpy()))
    single = f"{s3_url}/one.parquet"
    write_parquet(counts_rows(5), single)
    assert read_counts(single).equals(counts_rows(5))


def test_unreadable_counts_on_a_url_are_named(s3_url):
    counts = f"{s3_url}/counts"
    rows = write_counts_dir(counts, None)
    put_object(f"{counts}/part-garbage.parquet", b"not parquet")
    table, unreadable = read_counts_reporting(counts)
    assert table.num_rows == rows.num_rows
    assert len(unreadable) == 1 and "part-garbage.parquet" in unreadable[0]
    with pytest.raises(UserError, match="cannot read"):
        read_counts(counts)
    with pytest.raises(UserError):
        read_counts(f"{s3_url}/missing")


def test_counts_run_settings_on_urls(s3_url):
    run = f"{s3_url}/run"
    write_counts_dir(f"{run}/counts", {**SETTINGS, "n": 1})  # shards say n=1, run_config.json says otherwise
    check_resume(run, SETTINGS, resume=False)
    assert counts_run_settings(f"{run}/counts") == SETTINGS  # the run's own record wins
    assert counts_run_settings(f"{run}/counts/") == SETTINGS
    copied = f"{s3_url}/copied-counts"  # counts copied without their run directory: the shards' footers
    write_counts_dir(copied, SETTINGS)
    assert counts_run_settings(copied) == SETTINGS
    single = f"{s3_url}/single.parquet"
    write_parquet(counts_rows(0).replace_schema_metadata(shard_metadata(SETTINGS)), single)
    assert counts_run_settings(single) == SETTINGS
    bare = f"{s3_url}/bare"
    write_counts_dir(bare, None)
    assert counts_run_settings(bare) is None
    assert counts_run_settings(f"{s3_url}/missing") is None



def run_reduce(counts: str, out: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/reduce.py", counts, "--out", out, "--routing", "cascade", *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_reduce_job_reads_counts_and_image_list_from_a_url_and_writes_to_one(s3_url, tmp_path):
    """The job as issue 23 found it failing (`counts not found: s3:/…`), in a process of its own that finds
    the server through the inherited environment; the same counts reduced on disk are the reference."""
    run = f"{s3_url}/run"
    write_counts_dir(f"{run}/counts", None)
    for name, payload in objects_under(f"{run}/counts").items():
        (tmp_path / name).write_bytes(payload)
    local = run_reduce(str(tmp_path), str(tmp_path / "results.parquet"))
    assert local.returncode == 0, local.stderr
    remote = run_reduce(f"{run}/counts", f"{run}/results.parquet")
    assert remote.returncode == 0, remote.stderr
    assert read_parquet(f"{run}/results.parquet").equals(pq.read_table(tmp_path / "results.parquet"))
    write_image_ids(run, np.array([0, 1, 2, 3, 99]))  # the run was asked for an image it has no rows of
    refused = run_reduce(f"{run}/counts", f"{run}/again.parquet")
    assert refused.returncode == 2 and "1 of 5 image(s) lack the counts" in refused.stderr and "99" in refused.stderr
    assert "again.parquet" not in objects_under(run)
