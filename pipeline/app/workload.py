"""What to certify: a preset's images (readable as a Ray Dataset, any subset) plus the models, described for the actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.data.decode import PREPROCESSING
from pipeline.errors import UserError
from pipeline.models.classifier import Interpolation
from pipeline.models.denoiser import DenoiserFit
from pipeline.models.precision import Precision
from pipeline.models.registry import guess_classifier_kind
from pipeline.models.spec import ModelSpec, as_denoiser
from pipeline.app.presets import DatasetPreset
from pipeline.distributed.run import DatasetFor


@dataclass(frozen=True)
class Workload:
    dataset_for: DatasetFor  # (ids still to do, blocks) → ray.data.Dataset of {image_id, label, image}
    image_ids: np.ndarray
    model_spec: ModelSpec
    notes: tuple[str, ...]  # lines for the report header (models used, clean accuracy, ...)
    locations: dict[int, str] | None = None  # image_id → origin, to report skipped unreadable images


@dataclass(frozen=True)
class ModelOptions:
    denoiser: str | None = None
    classifier: str | None = None
    classifier_weights: str | None = None
    denoiser_fit: DenoiserFit = "pad"
    classifier_interpolation: Interpolation | None = None  # None: the classifier's own config
    precision: Precision | None = None  # the actors' arithmetic (certify resolves --precision); None: kernel default


@dataclass(frozen=True)
class DataOptions:
    data: str | None = None
    num_images: int | None = None
    skip: int = 1
    start: int = 0
    on_bad_image: str = "fail"
    preprocess: str | None = None  # image files only; None: the preset's default (DEFAULT_PREPROCESS)
    split: Literal["test", "train"] = "test"  # digits and CIFAR-10; fine-tuning reads "train"


# Cohen et al.'s and Carlini et al.'s ImageNet preprocessing (docs/imagenet-cifar.md).
DEFAULT_PREPROCESS = "resize256-crop224"


def build_workload(preset: DatasetPreset, data: DataOptions, models: ModelOptions) -> Workload:
    """Select the images and check (digits: train on first use) the models, all before Ray starts, so
    first-use training gets every core instead of sharing them with Ray's daemons and workers."""
    if data.skip < 1:
        raise UserError(f"--skip must be >= 1, got {data.skip}")
    if data.num_images is not None and data.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {data.num_images}")
    if data.preprocess is not None and preset.name != "imagenet":
        raise UserError(f"--preprocess applies to image files (preset imagenet); preset {preset.name} "
                        "certifies its images as stored")
    if data.preprocess is not None and data.preprocess not in PREPROCESSING:
        raise UserError(f"unknown --preprocess {data.preprocess!r}; choose one of {', '.join(PREPROCESSING)}")
    if preset.name == "digits":
        return _digits(preset, data, models)
    return _external(preset, data, models)


def _digits(preset: DatasetPreset, data: DataOptions, models: ModelOptions) -> Workload:
    import ray.data

    from pipeline.data.digits import load_digits_split
    from pipeline.models.digits import clean_accuracy, digits_classifier_dir, digits_denoiser_dir

    if models.denoiser:  # a bad --denoiser fails before the cached models are trained on first use
        as_denoiser(models.denoiser, models.denoiser_fit)  # a URL is copied locally to be loaded
    split = load_digits_split()
    images, labels = ((split.train_images, split.train_labels) if data.split == "train"
                      else (split.test_images, split.test_labels))
    ids = np.arange(len(images))[data.start::data.skip][: data.num_images]
    denoiser_dir = models.denoiser or str(digits_denoiser_dir())
    kind, classifier_location = (guess_classifier_kind(models.classifier, models.classifier_weights is not None)
                                 if models.classifier else ("digits", str(digits_classifier_dir())))
    spec = ModelSpec(denoiser_dir, kind, classifier_location, preset.num_classes, 1, models.classifier_weights,
                     models.denoiser_fit, models.classifier_interpolation, models.precision)
    image_shape = tuple(images.shape[1:])
    model_lines = spec.check(image_shape)  # fails fast, in the driver, on a bad --denoiser, fit or cache
    _, classifier = spec.load()

    def dataset_for(todo: np.ndarray, num_blocks: int) -> ray.data.Dataset:
        return ray.data.from_items([
            {"image_id": int(i), "label": int(labels[i]), "image": images[i]} for i in todo
        ], override_num_blocks=num_blocks)

    notes = (
        f"denoiser: {denoiser_dir}",
        f"classifier: {classifier_location} ({kind})",
        f"preprocessing: none ({image_shape[1]}x{image_shape[2]} as stored)",
        *model_lines,
        f"base classifier clean test accuracy: {100 * clean_accuracy(classifier):.1f}% "
        f"({len(split.test_images)} digits test images)",
    )
    return Workload(dataset_for, ids, spec, notes)


def _model_spec(preset: DatasetPreset, models: ModelOptions, in_chans: int) -> ModelSpec:
    if not models.denoiser:
        raise UserError(f"preset {preset.name} needs --denoiser DIR (a diffusers UNet2DModel + DDPMScheduler "
                        "directory; convert guided-diffusion .pt files with jobs/convert_guided_diffusion.py)")
    if not models.classifier:
        raise UserError(f"preset {preset.name} needs --classifier (a timm model name with --classifier-weights, "
                        "a Hugging Face transformers directory, a TorchScript .pt file, or "
                        "py:package.module:function)")
    kind, location = guess_classifier_kind(models.classifier, models.classifier_weights is not None)
    return ModelSpec(models.denoiser, kind, location, preset.num_classes, in_chans, models.classifier_weights,
                     models.denoiser_fit, models.classifier_interpolation, models.precision)


def _is_parquet(location: str) -> bool:
    """A .parquet file, or a directory whose top level holds .parquet files (not class folders)."""
    import fsspec

    if location.rstrip("/").endswith(".parquet"):
        return True
    fs, path = fsspec.core.url_to_fs(location)
    return fs.isdir(path) and any(name.endswith(".parquet") for name in fs.ls(path, detail=False))


def _external(preset: DatasetPreset, data: DataOptions, models: ModelOptions) -> Workload:
    from pipeline.data.cifar10 import cifar10_source
    from pipeline.data.class_folder import class_folder_source
    from pipeline.data.parquet import parquet_image_source

    if not data.data:
        expected = {
            "cifar10": "the cifar-10-batches-py directory (python version of CIFAR-10)",
            "imagenet": "an ImageNet-style class-folder tree (val/<wnid>/*.JPEG) or a Parquet of image bytes",
        }[preset.name]
        raise UserError(f"preset {preset.name} needs --data: {expected}")
    selection = dict(skip=data.skip, num_images=data.num_images, start=data.start)
    if preset.name == "cifar10":
        source = cifar10_source(data.data, split=data.split, **selection)
        preprocessing = "none (32x32 as stored)"
    else:
        chosen = PREPROCESSING[data.preprocess or DEFAULT_PREPROCESS]
        files = dict(resize=chosen.resize, crop=chosen.crop, resample=chosen.resample, on_bad_image=data.on_bad_image)
        read = parquet_image_source if _is_parquet(data.data) else class_folder_source
        source = read(data.data, **files, **selection)
        preprocessing = chosen.describe()
    info = source.info
    if info.num_classes > preset.num_classes:
        raise UserError(f"{data.data} has {info.num_classes} classes but preset {preset.name} expects "
                        f"{preset.num_classes}")
    spec = _model_spec(preset, models, in_chans=3)
    model_lines = spec.check(info.image_shape)  # fails fast, in the driver, on a bad model, fit or output width
    ids = np.array(sorted(info.locations), dtype=np.int64)
    notes = (f"data: {data.data} ({len(ids)} images)", f"preprocessing: {preprocessing}",
             f"denoiser: {models.denoiser}", f"classifier: {models.classifier} ({spec.classifier_kind})",
             *model_lines)
    return Workload(source.read, ids, spec, notes, dict(info.locations))
