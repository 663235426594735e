"""ImageNet-style class-folder trees (`root/<class_name>/<file>`) as a Ray Dataset.

The order of images, and so every image_id, is torchvision `ImageFolder`'s: classes sorted by folder
name, then files by (sub-folder, file name). `skip`/`num_images` therefore pick the same images as the
reference scripts, which iterate an `ImageFolder` by index.
"""

import csv
import io
import posixpath
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import ray.data
from fsspec import AbstractFileSystem

from pipeline.errors import UserError
from pipeline.data.decode import ImageMode, OnBadImage, Resample, check_options, output_shape
from pipeline.data.filesystems import display_path, pyarrow_filesystem, resolve
from pipeline.data.info import Source, SourceInfo, chosen
from pipeline.data.ray_steps import decode_step
from pipeline.data.selection import select_image_ids

# torchvision's IMG_EXTENSIONS: files with other extensions (README, labels.txt) are not images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def class_folder_source(
    root: str,
    *,
    labels_csv: str | None = None,
    mode: ImageMode = "RGB",
    resize: int | None = 256,
    crop: int | None = 224,
    skip: int = 1,
    num_images: int | None = None,
    start: int = 0,
    on_bad_image: OnBadImage = "fail",
    resample: Resample = "pil-bilinear",
    storage_options: Mapping[str, Any] | None = None,
) -> Source:
    """Rows {image_id, label, image (C, H, W) float32 in [0, 1]} of the selected images under `root`.

    Labels are the index of the sorted class folder names, or, with `labels_csv` (columns path, label;
    paths relative to `root`), the CSV's labels for exactly the files it lists, ordered by path. Only the
    selected files are read. Rows arrive in no particular order; image_id identifies them.
    """
    check_options(mode, resize, crop, on_bad_image, resample)
    fs, root_path = resolve(root, what="image folder", storage_options=storage_options)
    if not fs.isdir(root_path):
        raise UserError(f"image folder {root} is not a directory")
    relative_paths = _image_files(fs, root_path)
    if not relative_paths:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if labels_csv is None:
        class_names = _class_folders(fs, root_path)
        ordered, labels = _class_folder_order(relative_paths, class_names)
        num_classes = len(class_names)
        names: tuple[str, ...] | None = tuple(class_names)
    else:
        ordered, labels = _csv_order(relative_paths, labels_csv)
        num_classes, names = int(labels.max()) + 1, None
    selected = select_image_ids(np.arange(len(ordered)), start=start, skip=skip, num_images=num_images)
    paths = {int(image_id): posixpath.join(root_path, ordered[image_id]) for image_id in selected}
    locations = {image_id: display_path(fs, path) for image_id, path in paths.items()}
    rows_by_path = {path: (image_id, int(labels[image_id]), locations[image_id]) for image_id, path in paths.items()}
    info = SourceInfo(
        num_classes=num_classes,
        class_names=names,
        image_shape=output_shape(mode, crop),
        locations=locations,
    )

    def read(image_ids: Collection[int] | None = None, num_blocks: int | None = None) -> ray.data.Dataset:
        wanted = [paths[i] for i in chosen(paths, image_ids)]
        try:  # a listed file can be gone by now (a broken link, a file deleted since the listing)
            files = ray.data.read_binary_files(wanted, include_paths=True, filesystem=pyarrow_filesystem(fs),
                                               ignore_missing_paths=on_bad_image == "skip",
                                               override_num_blocks=num_blocks)
        except FileNotFoundError as error:
            raise UserError(f"image file missing: {error}") from None
        with_ids = files.map_batches(_attach_ids, batch_format="numpy", fn_kwargs={"rows_by_path": rows_by_path})
        return decode_step(with_ids, mode=mode, resize=resize, crop=crop, on_bad_image=on_bad_image,
                           resample=resample)

    return Source(info, read)


def _image_files(fs: AbstractFileSystem, root_path: str) -> list[str]:
    """Paths (relative to root, '/'-separated) of every file with an image extension, at any depth."""
    prefix = root_path.rstrip("/") + "/" if root_path else ""  # "" is the top of e.g. a dir:// filesystem
    return [
        path[len(prefix):]
        for path in fs.find(root_path)
        if path.startswith(prefix) and path.lower().endswith(IMAGE_EXTENSIONS)
    ]


def _class_folders(fs: AbstractFileSystem, root_path: str) -> list[str]:
    """Sorted names of the folders directly under root; empty ones count, so indices match the full tree."""
    return sorted(
        posixpath.basename(entry["name"].rstrip("/"))
        for entry in fs.ls(root_path, detail=True)
        if entry["type"] == "directory"
    )


def _class_folder_order(relative_paths: list[str], class_names: list[str]) -> tuple[list[str], np.ndarray]:
    """ImageFolder order (class, sub-folder, file name) of the files inside class folders, and their labels."""
    class_index = {name: index for index, name in enumerate(class_names)}
    in_classes = [path for path in relative_paths if "/" in path and path.split("/", 1)[0] in class_index]
    if not in_classes:
        raise UserError("no image files inside class folders: expected root/<class_name>/<image file>")
    ordered = sorted(
        in_classes,
        key=lambda path: (class_index[path.split("/", 1)[0]], posixpath.dirname(path), posixpath.basename(path)),
    )
    labels = np.array([class_index[path.split("/", 1)[0]] for path in ordered], dtype=np.int64)
    return ordered, labels


def _csv_order(relative_paths: list[str], labels_csv: str) -> tuple[list[str], np.ndarray]:
    """The CSV's files sorted by path, with their labels; every listed file must exist under root."""
    csv_fs, csv_path = resolve(labels_csv, what="labels CSV")
    with csv_fs.open(csv_path, "rb") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise UserError(f"labels CSV {labels_csv} needs columns path,label; found {reader.fieldnames}")
        label_by_path: dict[str, int] = {}
        for line, record in enumerate(reader, start=2):
            where = f"labels CSV {labels_csv} line {line}"
            path, label_text = (record["path"] or "").strip().lstrip("/"), (record["label"] or "").strip()
            if not label_text.isdigit():
                raise UserError(f"{where}: label {label_text!r} is not a non-negative integer")
            if path in label_by_path:
                raise UserError(f"{where}: {path} is listed twice")
            label_by_path[path] = int(label_text)
    if not label_by_path:
        raise UserError(f"labels CSV {labels_csv} lists no images")
    missing = sorted(set(label_by_path) - set(relative_paths))
    if missing:
        raise UserError(
            f"{len(missing)} image(s) in labels CSV {labels_csv} not found under the image folder, e.g. {missing[0]}"
        )
    ordered = sorted(label_by_path)
    return ordered, np.array([label_by_path[path] for path in ordered], dtype=np.int64)


def _attach_ids(
    batch: dict[str, np.ndarray], *, rows_by_path: Mapping[str, tuple[int, int, str]]
) -> dict[str, np.ndarray]:
    """Ray step: image_id, label and location from each row's path (read order is not stable, paths are)."""
    rows = [rows_by_path[str(path)] for path in batch["path"]]
    return {
        "bytes": batch["bytes"],
        "image_id": np.array([image_id for image_id, _, _ in rows], dtype=np.int64),
        "label": np.array([label for _, label, _ in rows], dtype=np.int64),
        "location": np.array([location for _, _, location in rows], dtype=object),
    }
