"""Reading counts group by group of images (store/counts.py `index_counts`, `CountsIndex.groups`): the
groups are exactly the in-memory pivot of every row, cut into consecutive images, whatever the grouping
and however the rows are spread over files; every check and error of the in-memory read holds."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.errors import UserError
from pipeline.store.counts import (
    COUNTS_SCHEMA,
    CountsArrays,
    counts_table,
    counts_to_arrays,
    index_counts,
    read_counts,
    read_counts_groups,
    read_counts_reporting,
)
from pipeline.store.shards import read_shards

SIGMAS = (1.0, 0.5, 0.25)
FIELDS = ("image_ids", "labels", "sigmas", "select_counts", "estimate_counts", "present")


def random_cells(rng: np.random.Generator, num_images: int, num_classes: int) -> pa.Table:
    """Rows of an early-exit-like run: every image at the first scale, some at later ones (a later scale
    without an earlier one too, as a resume can leave); sparse ids, distinct counts everywhere."""
    ids = np.sort(rng.choice(10_000, size=num_images, replace=False))
    labels = rng.integers(num_classes, size=num_images)
    present = np.column_stack([np.ones(num_images, bool), rng.random((num_images, len(SIGMAS) - 1)) < 0.6])
    image, scale = np.nonzero(present)
    select = rng.integers(0, 30, size=(len(image), num_classes))
    estimate = rng.integers(0, 300, size=(len(image), num_classes))
    return counts_table(ids[image], labels[image], np.array(SIGMAS)[scale], select, estimate)


def write_files(directory: Path, table: pa.Table, file_of_row: np.ndarray) -> None:
    """Row i goes to part-<file_of_row[i]>.parquet, rows shuffled within their file."""
    for file in np.unique(file_of_row):
        rows = np.flatnonzero(file_of_row == file)
        pq.write_table(table.take(pa.array(np.random.default_rng(int(file)).permutation(rows))),
                       directory / f"part-{file:03d}.parquet")


def concatenated(groups: list[CountsArrays]) -> dict[str, np.ndarray]:
    assert groups, "no groups"
    for arrays in groups[1:]:
        np.testing.assert_array_equal(arrays.sigmas, groups[0].sigmas)
    return {name: groups[0].sigmas if name == "sigmas" else np.concatenate([getattr(a, name) for a in groups])
            for name in FIELDS}


def assert_same_arrays(groups: list[CountsArrays], expected: CountsArrays) -> None:
    joined = concatenated(groups)
    for name in FIELDS:
        np.testing.assert_array_equal(joined[name], getattr(expected, name), err_msg=name)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_images=st.integers(1, 30), num_files=st.integers(1, 8),
       num_classes=st.integers(1, 5), images_per_group=st.integers(1, 35), hold=st.sampled_from([0, 1 << 20]),
       run_sigmas=st.booleans())
@example(seed=0, num_images=2, num_files=1, num_classes=1, images_per_group=1, hold=0, run_sigmas=False)
def test_groups_concatenate_to_the_in_memory_pivot(seed, num_images, num_files, num_classes, images_per_group, hold,
                                                   run_sigmas):
    """Rows dealt to files at random (an image's scales in different files, files spanning every group):
    the groups are consecutive images, complete, and together the pivot of all rows, for any group size and
    whether straddling files are held or read again."""
    rng = np.random.default_rng(seed)
    table = random_cells(rng, num_images, num_classes)
    sigmas = SIGMAS if run_sigmas else None
    with tempfile.TemporaryDirectory() as directory:
        write_files(Path(directory), table, rng.integers(num_files, size=table.num_rows))
        groups = list(index_counts(directory).groups(images_per_group, sigmas, hold_bytes=hold))
        in_memory = counts_to_arrays(read_counts(directory), sigmas)
    assert all(len(g.image_ids) == images_per_group for g in groups[:-1])
    assert 1 <= len(groups[-1].image_ids) <= images_per_group
    assert_same_arrays(groups, counts_to_arrays(table, sigmas))
    assert_same_arrays([in_memory], counts_to_arrays(table, sigmas))


def test_files_are_read_once_when_held_and_again_when_not(tmp_path, monkeypatch):
    """Two files of consecutive images straddle a group boundary: held, each file is read once; with
    nothing held (hold_bytes=0) the straddling one is read again, with the same groups."""
    table = random_cells(np.random.default_rng(1), 12, 3)
    ids = table["image_id"].to_numpy()
    write_files(tmp_path, table, (ids > np.unique(ids)[6]).astype(int))  # images 0-6 | 7-11
    index = index_counts(str(tmp_path))
    reads = []
    original = type(index)._read
    monkeypatch.setattr(type(index), "_read", lambda self, file: reads.append(file) or original(self, file))
    held = list(index.groups(4))  # groups 0-3 | 4-7 | 8-11: file 0 reaches the second group
    assert sorted(reads) == [0, 1]
    reads.clear()
    again = list(index.groups(4, hold_bytes=0))
    assert sorted(reads) == [0, 0, 1, 1]
    assert_same_arrays(again, counts_to_arrays(table))
    assert_same_arrays(held, counts_to_arrays(table))


def test_only_narrows_to_images_and_scales(tmp_path):
    table = random_cells(np.random.default_rng(2), 10, 3)
    write_files(tmp_path, table, np.arange(table.num_rows) % 3)
    ids = np.unique(table["image_id"].to_numpy())[::2]
    wanted = pa.compute.is_in(table["image_id"], value_set=pa.array(ids))
    wanted = pa.compute.and_(wanted, pa.compute.is_in(table["sigma"], value_set=pa.array([1.0, 0.25])))
    index = index_counts(str(tmp_path)).only(image_ids=ids, sigmas=[1.0, 0.25])
    assert_same_arrays(list(index.groups(2, (1.0, 0.25))), counts_to_arrays(table.filter(wanted), (1.0, 0.25)))
    np.testing.assert_array_equal(index.image_ids, ids)


def test_a_file_url_reads_like_a_path(tmp_path):
    table = random_cells(np.random.default_rng(3), 9, 4)
    write_files(tmp_path, table, np.arange(table.num_rows) % 2)
    assert_same_arrays(list(read_counts_groups(tmp_path.as_uri(), SIGMAS, images_per_group=4)),
                       counts_to_arrays(read_counts(str(tmp_path)), SIGMAS))
    assert read_counts((tmp_path / "part-001.parquet").as_uri()).num_rows == (table.num_rows // 2)
    missing = (tmp_path / "nowhere").as_uri()
    with pytest.raises(UserError, match=f"^counts not found: {re.escape(missing)}$"):
        index_counts(missing)


def test_streaming_over_s3_equals_the_local_read(s3_url, tmp_path):
    from pipeline.store.atomic import write_parquet

    table = random_cells(np.random.default_rng(4), 8, 3)
    write_files(tmp_path, table, np.arange(table.num_rows) % 3)
    for path in sorted(tmp_path.iterdir()):
        write_parquet(pq.read_table(path), f"{s3_url}/counts/{path.name}")
    assert_same_arrays(list(read_counts_groups(f"{s3_url}/counts", SIGMAS, images_per_group=3)),
                       counts_to_arrays(table, SIGMAS))


# ---------------------------------------------------------------- the errors of the in-memory read, unchanged


def rows(ids, sigmas=0.5, labels=None, select=None, estimate=None, num_classes: int = 3) -> pa.Table:
    ids = np.atleast_1d(ids)
    sigmas = np.broadcast_to(sigmas, ids.shape)
    labels = np.zeros(len(ids), np.int64) if labels is None else np.broadcast_to(labels, ids.shape)
    select = np.tile(np.arange(num_classes), (len(ids), 1)) if select is None else np.asarray(select)
    estimate = select * 10 if estimate is None else np.asarray(estimate)
    return counts_table(ids, labels, sigmas, select, estimate)


def ragged(ids, widths) -> pa.Table:
    """Rows whose count lists have the given lengths (counts_table makes them all one width)."""
    return pa.table({"image_id": ids, "label": [0] * len(ids), "sigma": [0.5] * len(ids),
                     "select_counts": [list(range(w)) for w in widths],
                     "estimate_counts": [[5] * w for w in widths]}).cast(COUNTS_SCHEMA)


BAD_LAYOUTS = {
    # name: (files, run sigmas, message, good groups read before the error; None: refused from the index alone)
    "no_rows": ([COUNTS_SCHEMA.empty_table()], None, "the counts table has no rows", None),
    "sigma_not_positive": ([rows([0, 1]), rows(9, sigmas=-0.5)], None, "sigma must be positive", None),
    "sigma_outside_the_run": ([rows([0, 1]), rows(9, sigmas=0.25)], (0.5,), "outside the run's scales", None),
    "duplicates_counted_over_all_groups": (
        [pa.concat_tables([rows([0, 1]), rows(1)]), rows([8, 9]), rows(9, estimate=[[1, 1, 1]])], None,
        "2 duplicate (image_id, sigma) rows", None),
    "two_labels": ([rows([0, 1]), rows(9, sigmas=0.25, labels=1), rows(9, labels=2)], None, "two different labels",
                   None),
    "negative_counts_in_a_later_group": ([rows([0, 1]), rows(9, select=[[1, -1, 0]])], None,
                                         "select_counts contains negative counts", 1),
    "classes_differ_within_a_group": ([rows([0, 1]), ragged([8, 9], [3, 4])], None,
                                      "select_counts rows have different numbers of classes: [3, 4]", 1),
    "classes_differ_between_groups": ([rows([0, 1]), rows([8, 9], num_classes=4)], None,
                                      "select_counts rows have different numbers of classes: [3, 4]", 1),
    "select_and_estimate_classes_differ": (
        [rows([0, 1, 8, 9]).set_column(4, "estimate_counts", pa.array([[1, 2]] * 4, pa.list_(pa.int64())))], None,
        "select_counts and estimate_counts have different numbers of classes", 0),
}


@pytest.mark.parametrize("name", BAD_LAYOUTS)
def test_bad_counts_fail_as_in_memory_with_the_same_message(name, tmp_path):
    """The problem sits in the last group where it can (images 8, 9; groups of 2): the in-memory read and
    the groups report it in the same words; what the index alone shows is refused before any group is read."""
    files, sigmas, message, good_groups = BAD_LAYOUTS[name]
    for number, table in enumerate(files):
        pq.write_table(table, tmp_path / f"part-{number}.parquet")
    with pytest.raises(UserError) as in_memory:
        counts_to_arrays(read_counts(str(tmp_path)), sigmas)
    assert message in str(in_memory.value)
    index = index_counts(str(tmp_path))
    read = []
    with pytest.raises(UserError) as streaming:
        groups = index.groups(2, sigmas)
        assert good_groups is not None, "an error the index shows must be raised before any group is read"
        read.extend(groups)
    assert str(streaming.value) == str(in_memory.value)
    assert len(read) == (good_groups or 0)


def test_unreadable_files_are_named_and_the_rest_read(tmp_path, caplog):
    good = random_cells(np.random.default_rng(5), 6, 3)
    pq.write_table(good, tmp_path / "part-a.parquet")
    (tmp_path / "part-b.parquet").write_bytes(b"PAR1 not a parquet file")
    (tmp_path / ".part-c.parquet.tmp.parquet").write_bytes(b"an atomic write in progress")
    (tmp_path / "_SUCCESS.parquet").write_bytes(b"a marker")
    index = index_counts(str(tmp_path))
    assert len(index.unreadable) == 1 and index.unreadable[0].startswith("part-b.parquet (")
    assert_same_arrays(list(index.groups(4)), counts_to_arrays(good))
    table, unreadable = read_counts_reporting(str(tmp_path))
    assert table.equals(good) and unreadable == list(index.unreadable)
    for read in (read_counts, read_counts_groups):
        with pytest.raises(UserError, match=re.escape(f"cannot read counts Parquet under {tmp_path}: part-b.parquet")):
            read(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert read_shards(str(tmp_path)).equals(good)
    assert "part-b.parquet" in caplog.text
    with pytest.raises(UserError, match="cannot read counts Parquet"):
        index_counts(str(tmp_path / "part-b.parquet"))  # a single file: nothing else to read


def test_a_file_missing_a_column_is_named_by_its_path(tmp_path):
    pq.write_table(random_cells(np.random.default_rng(6), 3, 3), tmp_path / "part-a.parquet")
    pq.write_table(pa.table({"image_id": [1], "sigma": [0.5]}), tmp_path / "part-b.parquet")
    named = re.escape(f"{tmp_path / 'part-b.parquet'} is not a counts table: missing column")
    with pytest.raises(UserError, match=named):
        index_counts(str(tmp_path))


def test_missing_locations(tmp_path):
    with pytest.raises(UserError, match="counts not found"):
        index_counts(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .parquet files under"):
        index_counts(str(tmp_path / "empty"))
    for where in ("nowhere", "empty"):  # a run's counts before its first shard
        assert index_counts(str(tmp_path / where), missing_ok=True).table().equals(COUNTS_SCHEMA.empty_table())
        assert read_shards(str(tmp_path / where)).num_rows == 0


def test_rows_repeated_exactly_by_a_later_file_are_read_once(tmp_path):
    """A killed run's late actor and its resume can write the same cells in differently composed shards:
    identical rows collapse. A row repeated inside one file, or differing, stays a duplicate."""
    table = random_cells(np.random.default_rng(7), 6, 3)
    pq.write_table(table, tmp_path / "part-a.parquet")
    pq.write_table(table.slice(2, 5), tmp_path / "part-b.parquet")
    assert_same_arrays(list(index_counts(str(tmp_path)).groups(2)), counts_to_arrays(table))
    assert read_counts(str(tmp_path)).equals(table)
    changed = table.slice(3, 1).set_column(4, "estimate_counts", pa.array([[0, 0, 1]], pa.list_(pa.int64())))
    pq.write_table(changed, tmp_path / "part-c.parquet")
    assert read_shards(str(tmp_path)).num_rows == table.num_rows + 1  # kept, for the pivot to refuse
    with pytest.raises(UserError, match="^1 duplicate"):
        index_counts(str(tmp_path)).groups(2)
    (tmp_path / "part-c.parquet").unlink()
    pq.write_table(pa.concat_tables([table.slice(0, 1), table.slice(0, 1)]), tmp_path / "one-file.parquet")
    with pytest.raises(UserError, match="^1 duplicate"):
        counts_to_arrays(read_counts(str(tmp_path / "one-file.parquet")))
    with pytest.raises(UserError, match="^1 duplicate"):
        index_counts(str(tmp_path / "one-file.parquet")).groups(2)


def test_group_size_must_be_positive(tmp_path):
    pq.write_table(rows([0, 1]), tmp_path / "part-a.parquet")
    with pytest.raises(ValueError, match="images_per_group"):
        index_counts(str(tmp_path)).groups(0)
