"""Sources → Ray Datasets: ids, labels, pixels and errors, checked against independent computations.

Pixels are compared with torchvision's reference preprocessing (ImageNet) or with the arrays the test
files were encoded from (lossless PNG, CIFAR bytes); ids and labels with torchvision's ImageFolder.
"""

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import datasets, transforms

from pipeline.errors import UserError
from pipeline.data.cifar10 import cifar10_source
from pipeline.data.class_folder import class_folder_source
from pipeline.data.info import SourceInfo
from pipeline.data.parquet import parquet_image_source
from pipeline.data.decode import preprocess
from pipeline.data.selection import select_image_ids

CLASS_NAMES = ("zebra", "ant", "mole")  # created out of sorted order on purpose
IMAGE_SIZES = ((37, 29), (41, 53), (64, 64), (90, 33))  # (width, height): portrait, landscape, square
CORRUPT = "mole/img0.JPEG"


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for the whole test session: starting Ray costs ~10 s on 2 cores."""
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _random_pixels(rng: np.random.Generator, width: int, height: int, channels: int) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory) -> Path:
    """3 classes × 4 image files of odd sizes, one grayscale, one corrupt, one in a sub-folder, plus non-images."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for class_index, name in enumerate(CLASS_NAMES):
        folder = root / name
        folder.mkdir()
        for image_index, (width, height) in enumerate(IMAGE_SIZES):
            channels = 1 if (class_index, image_index) == (1, 2) else 3
            pixels = _random_pixels(rng, width, height, channels)
            suffix = ".JPEG" if image_index % 2 else ".png"
            Image.fromarray(pixels).save(folder / f"img{3 - image_index}{suffix}", format="PNG")
        (folder / "notes.txt").write_text("not an image")
    (root / CORRUPT).write_bytes(b"this is not an image file")
    (root / "ant" / "a_sub").mkdir()  # ImageFolder lists it after ant/*, plain sorting before
    Image.fromarray(_random_pixels(rng, 30, 31, 3)).save(root / "ant" / "a_sub" / "a.png")
    (root / "README.txt").write_text("not an image either")
    return root


def _reference_samples(root: Path) -> list[tuple[str, int]]:
    """(path, label) in torchvision ImageFolder order: what the reference scripts index with --skip."""
    return datasets.ImageFolder(str(root)).samples


def _reference_pixels(path: str, resize: int | None, crop: int | None) -> np.ndarray:
    steps = [transforms.Resize(resize)] if resize else []
    steps += [transforms.CenterCrop(crop)] if crop else []
    with Image.open(path) as image:
        tensor = transforms.Compose([*steps, transforms.ToTensor()])(image.convert("RGB"))
    return tensor.numpy()


def _by_id(rows: list[dict]) -> dict[int, dict]:
    ids = [int(row["image_id"]) for row in rows]
    assert len(ids) == len(set(ids)), "image ids must be unique"
    return {int(row["image_id"]): row for row in rows}


# ---------------------------------------------------------------- subset selection and preprocessing (no Ray)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, 200), min_size=1, max_size=60, unique=True),
    start=st.integers(0, 30),
    skip=st.integers(1, 12),
    num_images=st.one_of(st.none(), st.integers(1, 20)),
)
def test_selection_takes_every_skip_th_id_from_start(ids, start, skip, num_images):
    expected = [i for i in sorted(ids) if i >= start and (i - start) % skip == 0][:num_images]
    if not expected:
        with pytest.raises(UserError, match="no images selected"):
            select_image_ids(np.array(ids), start=start, skip=skip, num_images=num_images)
    else:
        chosen = select_image_ids(np.array(ids), start=start, skip=skip, num_images=num_images)
        assert chosen.tolist() == expected


@pytest.mark.parametrize("options", [{"skip": 0}, {"start": -1}, {"num_images": 0}])
def test_selection_rejects_bad_options(options):
    kwargs = {"start": 0, "skip": 1, "num_images": None} | options
    with pytest.raises(UserError):
        select_image_ids(np.arange(5), **kwargs)


@pytest.mark.parametrize("size", [(300, 250), (250, 300), (224, 224), (511, 263), (37, 29), (257, 256)])
@pytest.mark.parametrize("gray", [False, True])
def test_preprocess_equals_torchvision_resize_crop_to_tensor(tmp_path, size, gray):
    pixels = _random_pixels(np.random.default_rng(sum(size)), *size, 1 if gray else 3)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    with Image.open(path) as image:
        ours = preprocess(image, mode="RGB", resize=256, crop=224, location=str(path))
    assert ours.dtype == np.float32 and ours.shape == (3, 224, 224)
    np.testing.assert_array_equal(ours, _reference_pixels(str(path), 256, 224))


@pytest.mark.parametrize("size", [(300, 250), (250, 300), (224, 224), (511, 263), (37, 29)])
def test_tensor_bicubic_preprocess_equals_the_multiscale_codes_transform(tmp_path, size):
    """resize224-crop224: ToTensor, then Resize(224, bicubic) of the float tensor as torchvision 0.13 ran it
    (no antialias, no clamp), then CenterCrop(224)."""
    from pipeline.data.decode import PREPROCESSING

    chosen = PREPROCESSING["resize224-crop224"]
    path = tmp_path / "image.png"
    Image.fromarray(_random_pixels(np.random.default_rng(sum(size)), *size, 3)).save(path)
    reference = transforms.Compose([
        transforms.ToTensor(),
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC, antialias=False),
        transforms.CenterCrop(224),
    ])
    with Image.open(path) as image:
        ours = preprocess(image, mode="RGB", resize=chosen.resize, crop=chosen.crop, location=str(path),
                          resample=chosen.resample)
        expected = reference(image.convert("RGB")).numpy()
    assert ours.dtype == np.float32 and ours.shape == (3, 224, 224)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    if size != (224, 224):  # the other preset resamples differently: the comparison can fail
        bilinear = preprocess(Image.open(path), mode="RGB", resize=224, crop=224, location=str(path))
        assert np.abs(bilinear - expected).max() > 1e-2


def test_preprocess_grayscale_mode_and_crop_larger_than_image():
    pixels = _random_pixels(np.random.default_rng(1), 10, 12, 3)
    gray = preprocess(Image.fromarray(pixels), mode="L", resize=None, crop=None, location="x")
    expected = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.float32)[None] / 255
    np.testing.assert_array_equal(gray, expected)
    with pytest.raises(UserError, match="smaller than crop=16"):
        preprocess(Image.fromarray(pixels), mode="RGB", resize=None, crop=16, location="x")


# ---------------------------------------------------------------- class folders


def test_class_folder_full_tree_matches_reference_scripts(ray_session, class_tree):
    source = class_folder_source(str(class_tree), on_bad_image="skip")
    dataset, info = source.read(), source.info
    reference = _reference_samples(class_tree)
    rows = _by_id(dataset.take_all())

    assert info.num_classes == 3 and info.class_names == ("ant", "mole", "zebra")
    assert info.image_shape == (3, 224, 224) and info.num_images == len(reference) == 13
    corrupt_id = [path for path, _ in reference].index(str(class_tree / CORRUPT))
    assert sorted(rows) == [i for i in range(len(reference)) if i != corrupt_id]
    for image_id, row in rows.items():
        path, label = reference[image_id]
        assert row["label"] == label and info.locations[image_id] == path
        assert row["image"].dtype == np.float32 and row["image"].shape == (3, 224, 224)
        np.testing.assert_array_equal(row["image"], _reference_pixels(path, 256, 224))
    assert info.skipped_paths(rows) == [str(class_tree / CORRUPT)]


def test_class_folder_subset_keeps_ids_and_reads_only_selected(ray_session, class_tree):
    reference = _reference_samples(class_tree)
    corrupt_id = [path for path, _ in reference].index(str(class_tree / CORRUPT))
    # skip=2 from start=2 passes over the corrupt image (an odd id): with on_bad_image="fail" the
    # run succeeds only if unselected files are never decoded.
    assert corrupt_id == 5
    source = class_folder_source(str(class_tree), resize=20, crop=16, start=2, skip=2, num_images=4)
    dataset, info = source.read(), source.info
    rows = _by_id(dataset.take_all())

    assert sorted(rows) == sorted(info.locations) == [2, 4, 6, 8]
    for image_id, row in rows.items():
        path, label = reference[image_id]
        assert row["label"] == label
        np.testing.assert_array_equal(row["image"], _reference_pixels(path, 20, 16))


def test_class_folder_resamples_as_asked(ray_session, class_tree):
    """The resample choice reaches the Ray decode step (the multi-scale code's bicubic float resize)."""
    reference = _reference_samples(class_tree)
    source = class_folder_source(str(class_tree), resize=20, crop=16, num_images=2, resample="tensor-bicubic")
    rows = _by_id(source.read().take_all())
    for image_id, row in rows.items():
        with Image.open(reference[image_id][0]) as image:
            expected = preprocess(image, mode="RGB", resize=20, crop=16, location="", resample="tensor-bicubic")
        np.testing.assert_array_equal(row["image"], expected)
        assert np.abs(row["image"] - _reference_pixels(reference[image_id][0], 20, 16)).max() > 1e-3
    with pytest.raises(UserError, match="resample must be one of"):
        class_folder_source(str(class_tree), resample="lanczos")


def test_class_folder_file_url_and_keep_size(ray_session, tmp_path):
    rng = np.random.default_rng(5)
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        for index in range(2):
            Image.fromarray(_random_pixels(rng, 7, 5, 3)).save(tmp_path / name / f"{index}.png")
    source = class_folder_source(tmp_path.as_uri(), resize=None, crop=None, skip=3)
    dataset, info = source.read(), source.info
    rows = _by_id(dataset.take_all())

    assert info.image_shape is None and sorted(rows) == [0, 3]
    assert info.locations == {0: str(tmp_path / "a" / "0.png"), 3: str(tmp_path / "b" / "1.png")}
    assert [rows[i]["label"] for i in (0, 3)] == [0, 1]
    expected = np.asarray(Image.open(tmp_path / "b" / "1.png"), dtype=np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(rows[3]["image"], expected)


def test_class_folder_through_a_non_local_fsspec_filesystem(ray_session, class_tree):
    """dir:// is an fsspec filesystem that is not the local one, like s3:// or gs://: listing, Ray's
    pyarrow wrapper, the filesystem shipped to workers and the path → id mapping all take that route."""
    reference = _reference_samples(class_tree)
    source = class_folder_source(
        f"dir://{class_tree.name}", storage_options={"path": str(class_tree.parent), "target_protocol": "file"},
        resize=20, crop=16, skip=4,
    )
    dataset, info = source.read(), source.info
    rows = _by_id(dataset.take_all())

    assert sorted(rows) == [0, 4, 8, 12]
    assert info.locations[4] == f"dir://{Path(reference[4][0]).relative_to(class_tree.parent)}"
    for image_id, row in rows.items():
        path, label = reference[image_id]
        assert row["label"] == label
        np.testing.assert_array_equal(row["image"], _reference_pixels(path, 20, 16))


def test_class_folder_corrupt_file_fails_naming_it(ray_session, class_tree):
    corrupt_id = [path for path, _ in _reference_samples(class_tree)].index(str(class_tree / CORRUPT))
    source = class_folder_source(str(class_tree), resize=20, crop=16, start=corrupt_id, num_images=1)
    dataset = source.read()
    with pytest.raises(UserError, match=f"cannot decode image .*{CORRUPT}"):
        dataset.take_all()


def test_class_folder_labels_csv(ray_session, class_tree, tmp_path):
    listed = {"zebra/img3.png": 7, "ant/a_sub/a.png": 2, "mole/img2.JPEG": 0, "ant/img1.png": 5}
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "".join(f"{path},{label}\n" for path, label in listed.items()))
    source = class_folder_source(str(class_tree), labels_csv=str(csv_path), resize=None, crop=16)
    dataset, info = source.read(), source.info
    rows = _by_id(dataset.take_all())

    ordered = sorted(listed)
    assert info.num_classes == 8 and info.class_names is None
    assert sorted(rows) == [0, 1, 2, 3]
    for image_id, path in enumerate(ordered):
        assert rows[image_id]["label"] == listed[path]
        np.testing.assert_array_equal(rows[image_id]["image"], _reference_pixels(str(class_tree / path), None, 16))


def test_class_folder_errors(class_tree, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        class_folder_source(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="no image files"):
        class_folder_source(str(tmp_path / "empty"))
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(UserError, match="not a directory"):
        class_folder_source(str(tmp_path / "file.png"))
    with pytest.raises(UserError, match="no images selected"):
        class_folder_source(str(class_tree), start=13)
    with pytest.raises(UserError, match="on_bad_image"):
        class_folder_source(str(class_tree), on_bad_image="ignore")
    with pytest.raises(UserError, match="mode"):
        class_folder_source(str(class_tree), mode="CMYK")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("file,class\nant/img1.png,1\n")
    with pytest.raises(UserError, match="needs columns path,label"):
        class_folder_source(str(class_tree), labels_csv=str(bad_csv))
    bad_csv.write_text("path,label\nant/nothere.png,1\n")
    with pytest.raises(UserError, match="not found under the image folder, e.g. ant/nothere.png"):
        class_folder_source(str(class_tree), labels_csv=str(bad_csv))
    bad_csv.write_text("path,label\nant/img1.png,one\n")
    with pytest.raises(UserError, match="line 2: label 'one' is not a non-negative integer"):
        class_folder_source(str(class_tree), labels_csv=str(bad_csv))


# ---------------------------------------------------------------- Parquet


def test_parquet_row_positions_across_files_and_row_groups(ray_session, tmp_path):
    rng = np.random.default_rng(2)
    pixels = [_random_pixels(rng, 6, 5, 3) for _ in range(10)]
    labels = [int(label) for label in rng.integers(0, 4, size=10)]
    folder = tmp_path / "parquet"
    folder.mkdir()
    # File names sort in the opposite order of writing; ids follow sorted names, then row order.
    for name, rows in (("b.parquet", range(6, 10)), ("a.parquet", range(0, 6))):
        table = pa.table({"image": [_png_bytes(pixels[i]) for i in rows], "label": [labels[i] for i in rows]})
        pq.write_table(table, folder / name, row_group_size=3)
    source = parquet_image_source(folder.as_uri(), skip=3)
    dataset, info = source.read(), source.info
    rows = _by_id(dataset.take_all())

    assert sorted(rows) == sorted(info.locations) == [0, 3, 6, 9]
    assert info.num_classes == max(labels) + 1 and info.image_shape is None
    assert info.locations[3].endswith("a.parquet row group 1 row 0")
    for image_id, row in rows.items():
        assert row["label"] == labels[image_id]
        np.testing.assert_array_equal(row["image"], pixels[image_id].transpose(2, 0, 1) / np.float32(255))


def test_parquet_id_column_struct_images_grayscale_and_bad_row(ray_session, tmp_path):
    rng = np.random.default_rng(3)
    image_ids = [40, 10, 30, 20, 50]
    pixels = {image_id: _random_pixels(rng, 4, 4, 1) for image_id in image_ids}
    encoded = {image_id: _png_bytes(pixels[image_id]) for image_id in image_ids}
    encoded[30] = b"garbage"
    table = pa.table({
        "img": [{"bytes": encoded[i], "path": f"{i}.png"} for i in image_ids],
        "target": [i // 10 for i in image_ids],
        "image_id": image_ids,
    })
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=2)
    source = parquet_image_source(
        str(tmp_path / "hf.parquet"), image_column="img", label_column="target", mode="L",
        crop=4, start=10, skip=10, num_images=3, on_bad_image="skip",
    )
    dataset, info = source.read(), source.info
    rows = _by_id(dataset.take_all())

    assert sorted(info.locations) == [10, 20, 30] and info.image_shape == (1, 4, 4)
    assert sorted(rows) == [10, 20]
    for image_id, row in rows.items():
        assert row["label"] == image_id // 10
        np.testing.assert_array_equal(row["image"], pixels[image_id][None] / np.float32(255))
    assert info.skipped_paths(rows) == [f"{tmp_path / 'hf.parquet'} row group 1 row 0"]


def test_parquet_errors(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), tmp_path / "one.parquet")
    with pytest.raises(UserError, match="no label column 'y'"):
        parquet_image_source(str(tmp_path / "one.parquet"), label_column="y")
    with pytest.raises(UserError, match="no id column 'idx'"):
        parquet_image_source(str(tmp_path / "one.parquet"), id_column="idx")
    pq.write_table(pa.table({"image": [1], "label": [1]}), tmp_path / "ints.parquet")
    with pytest.raises(UserError, match="encoded image bytes"):
        parquet_image_source(str(tmp_path / "ints.parquet"))
    pq.write_table(pa.table({"image": [b"x", b"y"], "label": [0, 1], "image_id": [3, 3]}), tmp_path / "dup.parquet")
    with pytest.raises(UserError, match="duplicate image ids"):
        parquet_image_source(str(tmp_path / "dup.parquet"))
    pq.write_table(pa.table({"image": [b"x"], "label": [-1]}), tmp_path / "neg.parquet")
    with pytest.raises(UserError, match="negative"):
        parquet_image_source(str(tmp_path / "neg.parquet"))
    (tmp_path / "two").mkdir()
    pq.write_table(pa.table({"image": [b"x"], "label": [0]}), tmp_path / "two" / "a.parquet")
    pq.write_table(pa.table({"image": [b"x"], "class": [0]}), tmp_path / "two" / "b.parquet")
    with pytest.raises(UserError, match=r"b.parquet lacks column\(s\) \['label'\]"):
        parquet_image_source(str(tmp_path / "two"))
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(UserError, match="no .parquet files"):
        parquet_image_source(str(tmp_path / "nofiles"))


# ---------------------------------------------------------------- CIFAR-10


def _write_cifar(folder: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {}
    for name, size in [("test_batch", 7)] + [(f"data_batch_{i}", 2) for i in range(1, 6)]:
        data = rng.integers(0, 256, size=(size, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, size=size)]
        with open(folder / name, "wb") as handle:
            # protocol 2 (the official files') for the test batch, the current default for the others
            protocol = 2 if name == "test_batch" else pickle.DEFAULT_PROTOCOL
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, handle, protocol=protocol)
        batches[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, handle)
    return batches


def test_cifar10_test_and_train_splits(ray_session, tmp_path):
    batches = _write_cifar(tmp_path / "cifar-10-batches-py", np.random.default_rng(4))
    source = cifar10_source(str(tmp_path), skip=2)  # the folder holding cifar-10-batches-py
    dataset, info = source.read(), source.info
    source = cifar10_source(str(tmp_path / "cifar-10-batches-py"), split="train", start=3, num_images=2)
    train, train_info = source.read(), source.info
    rows, train_rows = _by_id(dataset.take_all()), _by_id(train.take_all())

    assert info.num_classes == 10 and info.class_names == tuple(f"class{i}" for i in range(10))
    assert info.image_shape == (3, 32, 32) and sorted(rows) == [0, 2, 4, 6]
    data, labels = batches["test_batch"]
    for image_id, row in rows.items():
        assert row["label"] == labels[image_id] and row["image"].dtype == np.float32
        np.testing.assert_array_equal(row["image"], data[image_id].reshape(3, 32, 32) / np.float32(255))
    # train ids run through data_batch_1..5: 3 → data_batch_2[1], 4 → data_batch_3[0]
    assert sorted(train_rows) == [3, 4] and train_info.locations[4].endswith("data_batch_3[0]")
    for image_id, (name, index) in {3: ("data_batch_2", 1), 4: ("data_batch_3", 0)}.items():
        data, labels = batches[name]
        assert train_rows[image_id]["label"] == labels[index]
        np.testing.assert_array_equal(train_rows[image_id]["image"], data[index].reshape(3, 32, 32) / np.float32(255))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pickle ran code",))


def test_cifar10_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        cifar10_source(str(tmp_path / "missing"))
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(UserError, match="expected test_batch"):
        cifar10_source(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": _RunsCode(), b"labels": [0]}, handle)
    with pytest.raises(UserError, match=r"refusing to load (posix|nt|os)\.system"):
        cifar10_source(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(UserError, match=r"uint8 \(N, 3072\)"):
        cifar10_source(str(tmp_path))
    with pytest.raises(UserError, match="split"):
        cifar10_source(str(tmp_path), split="val")


def test_source_info_skipped_paths_in_id_order():
    info = SourceInfo(num_classes=2, class_names=None, image_shape=None, locations={5: "e", 1: "a", 3: "c"})
    assert info.num_images == 3
    assert info.skipped_paths(np.array([3, 9])) == ["a", "e"]
