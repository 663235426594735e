"""Classifier kinds in one table: how each loads, which flags it refuses, and which --classifier string names it.

A kind is registered once with `register_classifier` (timm's model registry style: a dict filled by a
decorator), so guessing a kind, checking the flags that do not fit it and loading it all read the same
entry, and a new kind is one function here instead of a branch in every caller. The loaders themselves
live in pipeline/models/classifier.py (and models/digits.py); the entries adapt a ModelSpec to them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.errors import UserError
from pipeline.models.classifier import (
    load_hf_classifier,
    load_python_classifier,
    load_timm_classifier,
    load_torchscript_classifier,
)

if TYPE_CHECKING:
    from pipeline.models.spec import ModelSpec

LocalCopy = Callable[[str], str]
"""A model location (local path or fsspec URL) → a local path the loader can read (pipeline.models.spec.local_copy)."""
ClassifierLoader = Callable[["ModelSpec", LocalCopy], torch.nn.Module]
"""(spec, local_copy) → a module from [0,1] images (N, C, H, W) to logits (N, num_classes)."""

HF_PREFIX = "hf:"
PY_PREFIX = "py:"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".jit")


@dataclass(frozen=True)
class ClassifierKind:
    """One registered kind. `no_weights` / `no_interpolation`: why --classifier-weights /
    --classifier-interpolation do not apply to it ({location} is filled in), None where they do."""

    load: ClassifierLoader
    no_weights: str | None = None
    no_interpolation: str | None = None


CLASSIFIER_KINDS: dict[str, ClassifierKind] = {}


def register_classifier(kind: str, *, no_weights: str | None = None,
                        no_interpolation: str | None = None) -> Callable[[ClassifierLoader], ClassifierLoader]:
    """Decorator: register `loader` as the classifier kind `kind` (a name registered twice is a mistake)."""

    def register(loader: ClassifierLoader) -> ClassifierLoader:
        if kind in CLASSIFIER_KINDS:
            raise ValueError(f"classifier kind {kind!r} is already registered")
        CLASSIFIER_KINDS[kind] = ClassifierKind(loader, no_weights, no_interpolation)
        return loader

    return register


def guess_classifier_kind(classifier: str, has_weights: bool) -> tuple[str, str]:
    """(kind, location) that a --classifier string names: py:package.module:function (a user's factory),
    hf:DIR or a directory with config.json (Hugging Face), a .pt/.ts/.jit file without weights
    (TorchScript), else a timm model name. The digits classifier is never named: it is the digits
    preset's default."""
    if classifier.startswith(PY_PREFIX):
        return "py", classifier[len(PY_PREFIX):]
    if classifier.startswith(HF_PREFIX):
        return "hf", classifier[len(HF_PREFIX):]
    if posixpath.splitext(classifier)[1] in TORCHSCRIPT_SUFFIXES and not has_weights:
        return "torchscript", classifier
    if _is_hf_directory(classifier):
        return "hf", classifier
    return "timm", classifier


def _is_hf_directory(location: str) -> bool:
    """A folder (local or fsspec URL) holding a transformers config.json, as save_pretrained writes it."""
    import fsspec

    if "://" not in location and not Path(location).is_dir():
        return False  # a timm model name, not a path
    fs, path = fsspec.core.url_to_fs(location)
    return fs.isfile(path.rstrip("/") + "/config.json")


def check_classifier_options(kind: str, location: str, has_weights: bool, has_interpolation: bool) -> None:
    """UserError for an unknown kind, or for a flag the kind has no use for (it would be silently ignored)."""
    if kind not in CLASSIFIER_KINDS:
        raise UserError(f"unknown classifier kind {kind!r}; registered kinds: {', '.join(sorted(CLASSIFIER_KINDS))}")
    entry = CLASSIFIER_KINDS[kind]
    if has_weights and entry.no_weights is not None:
        raise UserError(f"--classifier-weights: {entry.no_weights.format(location=location)}")
    if has_interpolation and entry.no_interpolation is not None:
        raise UserError(f"--classifier-interpolation: {entry.no_interpolation.format(location=location)}")


def load_classifier(spec: ModelSpec, local_copy: LocalCopy) -> torch.nn.Module:
    """The classifier `spec` describes, loaded by its kind's registered loader."""
    return CLASSIFIER_KINDS[spec.classifier_kind].load(spec, local_copy)


@register_classifier("digits", no_weights="the digits classifier is trained on first use",
                     no_interpolation="the digits classifier runs at the data's size (no resize)")
def _digits(spec: ModelSpec, local_copy: LocalCopy) -> torch.nn.Module:
    from pipeline.models.digits import load_digits_classifier

    return load_digits_classifier(spec.classifier)


@register_classifier("timm")
def _timm(spec: ModelSpec, local_copy: LocalCopy) -> torch.nn.Module:
    weights = local_copy(spec.classifier_weights) if spec.classifier_weights else None
    return load_timm_classifier(spec.classifier, weights, spec.num_classes, spec.in_chans,
                                spec.classifier_interpolation)


@register_classifier("torchscript", no_weights="the TorchScript classifier {location} carries its own weights",
                     no_interpolation="a TorchScript classifier does its own resizing")
def _torchscript(spec: ModelSpec, local_copy: LocalCopy) -> torch.nn.Module:
    return load_torchscript_classifier(local_copy(spec.classifier))


@register_classifier("hf", no_weights="the Hugging Face classifier {location} carries its own weights")
def _hf(spec: ModelSpec, local_copy: LocalCopy) -> torch.nn.Module:
    return load_hf_classifier(local_copy(spec.classifier), spec.in_chans, spec.classifier_interpolation)


@register_classifier("py", no_weights="the factory py:{location} builds its classifier with its own weights",
                     no_interpolation="a py: factory's classifier does its own resizing")
def _python(spec: ModelSpec, local_copy: LocalCopy) -> torch.nn.Module:
    return load_python_classifier(spec.classifier)
