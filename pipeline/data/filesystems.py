"""Local paths and fsspec URLs (s3://, gs://, file://) resolved once, for listing and for Ray's readers."""

from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow.fs as pafs
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError


def open_location(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """Filesystem and path for `url`, which need not exist yet (an output); UserError for an unknown
    scheme or a store whose fsspec backend (s3fs, gcsfs) is not installed, so a bad URL fails as one line."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as err:
        raise UserError(f"cannot open {url}: {err}") from err


def resolve(
    url: str, *, what: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[AbstractFileSystem, str]:
    """Filesystem and path for `url`; UserError naming `what` was expected when it does not exist.

    `storage_options` go to the fsspec filesystem (e.g. {"anon": True} or {"endpoint_url": ...} for s3://).
    """
    fs, path = open_location(url, storage_options)
    if not fs.exists(path):
        raise UserError(f"{what} {url} does not exist")
    return fs, path


def pyarrow_filesystem(fs: AbstractFileSystem) -> pafs.FileSystem:
    """The pyarrow filesystem Ray's readers take: native for local disks, else a wrapper of the same fsspec one."""
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def display_path(fs: AbstractFileSystem, path: str) -> str:
    """The path as a user would write it: plain for local files, with its scheme otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)
