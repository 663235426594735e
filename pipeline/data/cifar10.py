"""The CIFAR-10 "python version" batches (`cifar-10-batches-py/`) as a Ray Dataset, 32×32 as stored.

The official format is Python pickle, which can run arbitrary code when loaded. Batches are therefore
read with an unpickler that only rebuilds numpy arrays, lists and bytes, and only from the directory the
user names; anything else in the file is refused with a UserError.
"""

import codecs
import pickle
import posixpath
from collections.abc import Collection, Mapping
from typing import Any, Literal

import numpy as np
import ray.data
from fsspec import AbstractFileSystem

from pipeline.errors import UserError
from pipeline.data.filesystems import display_path, resolve
from pipeline.data.info import Source, SourceInfo, chosen
from pipeline.data.ray_steps import surface_user_errors
from pipeline.data.selection import select_image_ids

BATCH_FILES: dict[str, tuple[str, ...]] = {
    "test": ("test_batch",),
    "train": tuple(f"data_batch_{index}" for index in range(1, 6)),
}
IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


# numpy 1 and 2 file this function under different private modules; take it from numpy itself.
_RECONSTRUCT_ARRAY = np.zeros(0).__reduce__()[0]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuild numpy arrays, bytes and builtin containers only: the globals a CIFAR batch references."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT_ARRAY,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT_ARRAY,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def cifar10_source(
    root: str,
    *,
    split: Literal["test", "train"] = "test",
    skip: int = 1,
    num_images: int | None = None,
    start: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """Rows {image_id, label, image (3, 32, 32) float32 in [0, 1]} of the selected CIFAR-10 images.

    `root` is the `cifar-10-batches-py` directory or the folder holding it. image_id is the index in
    test_batch (test) or in data_batch_1..5 concatenated (train).
    """
    if split not in BATCH_FILES:
        raise UserError(f"split must be one of {sorted(BATCH_FILES)}, got {split!r}")
    fs, batches_dir = _batches_dir(root, split, storage_options)
    batches = [_load_batch(fs, posixpath.join(batches_dir, name)) for name in BATCH_FILES[split]]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    selected = select_image_ids(np.arange(len(labels)), start=start, skip=skip, num_images=num_images)
    offsets = np.cumsum([0] + [len(batch_labels) for _, batch_labels in batches])
    info = SourceInfo(
        num_classes=NUM_CLASSES,
        class_names=_class_names(fs, batches_dir),
        image_shape=IMAGE_SHAPE,
        locations={int(i): _location(fs, batches_dir, split, offsets, int(i)) for i in selected},
    )

    def read(image_ids: Collection[int] | None = None, num_blocks: int | None = None) -> ray.data.Dataset:
        rows = [{"image_id": i, "label": int(labels[i]), "image": images[i]} for i in chosen(info.locations, image_ids)]
        items = ray.data.from_items(rows, override_num_blocks=num_blocks)
        return surface_user_errors(items.map_batches(_to_unit_float, batch_format="numpy"))

    return Source(info, read)


def _batches_dir(
    root: str, split: str, storage_options: Mapping[str, Any] | None
) -> tuple[AbstractFileSystem, str]:
    """The directory holding the split's batch files: `root` itself or `root/cifar-10-batches-py`."""
    expected = ", ".join(BATCH_FILES[split])
    what = f"CIFAR-10 directory (expected cifar-10-batches-py with {expected})"
    fs, path = resolve(root, what=what, storage_options=storage_options)
    for candidate in (path, posixpath.join(path, "cifar-10-batches-py")):
        if all(fs.isfile(posixpath.join(candidate, name)) for name in BATCH_FILES[split]):
            return fs, candidate
    raise UserError(
        f"no CIFAR-10 {split} batches in {root}: expected {expected} there or in {root}/cifar-10-batches-py "
        "(the 'python version' from https://www.cs.toronto.edu/~kriz/cifar.html, extracted)"
    )


def _unpickle(fs: AbstractFileSystem, path: str) -> Any:
    """Load a pickle that may only hold arrays and builtins; refuse anything else as a UserError."""
    with fs.open(path, "rb") as handle:
        try:
            return _ArraysOnlyUnpickler(handle, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise UserError(f"{path} is not a CIFAR-10 python batch: {err}") from None


def _load_batch(fs: AbstractFileSystem, path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one batch file, checked against the format."""
    batch = _unpickle(fs, path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise UserError(f"{path}: b'data' must be uint8 (N, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
        raise UserError(f"{path}: b'labels' must be {data.shape[0]} labels in 0..{NUM_CLASSES - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _class_names(fs: AbstractFileSystem, batches_dir: str) -> tuple[str, ...] | None:
    """Names from batches.meta when present (they are not needed to certify, only to report)."""
    meta_path = posixpath.join(batches_dir, "batches.meta")
    if not fs.isfile(meta_path):
        return None
    meta = _unpickle(fs, meta_path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    return tuple(name.decode() for name in names) if names else None


def _location(fs: AbstractFileSystem, batches_dir: str, split: str, offsets: np.ndarray, image_id: int) -> str:
    """`<batch file>[<index in it>]`, so a report can point at the stored image."""
    batch_index = int(np.searchsorted(offsets, image_id, side="right")) - 1
    name = BATCH_FILES[split][batch_index]
    return f"{display_path(fs, posixpath.join(batches_dir, name))}[{image_id - offsets[batch_index]}]"


def _to_unit_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray step: uint8 pixels (kept small in the object store) → float32 in [0, 1]."""
    return {
        "image_id": batch["image_id"].astype(np.int64),
        "label": batch["label"].astype(np.int64),
        "image": batch["image"].astype(np.float32) / np.float32(255.0),
    }
