"""A picklable description of the (denoiser, classifier) pair, loaded once inside each Ray actor.

Shipping paths rather than modules keeps task payloads small and lets every actor load on its own
device; the driver validates the spec once (`check`) before any actor starts. Model locations may be
fsspec URLs (s3://, gs://): on a cluster the models sit in a bucket every node can read, while the
loaders (diffusers, timm, torch.jit) read local files, so remote ones are copied to a scratch folder.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline.errors import UserError
from pipeline.models.classifier import (
    Interpolation,
    NormalizedClassifier,
    load_hf_classifier,
    load_timm_classifier,
    load_torchscript_classifier,
)
from pipeline.models.denoiser import DenoiserFit, OneShotDenoiser, check_finite, load_denoiser
from pipeline.models.precision import Precision

ClassifierKind = Literal["digits", "timm", "torchscript", "hf"]


@dataclass(frozen=True)
class ModelSpec:
    """denoiser: diffusers dir; classifier: digits cache dir | timm model name | TorchScript path |
    Hugging Face transformers save_pretrained dir (kind "hf").

    denoiser_fit: how inputs of another size reach the UNet (pipeline.models.denoiser); classifier_interpolation:
    the classifier's resize, None for the model's own config (timm / image processor); precision: the
    arithmetic the actors run both networks in (pipeline.models.precision; None: the kernel's default).
    """

    denoiser: str
    classifier_kind: ClassifierKind
    classifier: str
    num_classes: int
    in_chans: int = 3
    classifier_weights: str | None = None
    denoiser_fit: DenoiserFit = "pad"
    classifier_interpolation: Interpolation | None = None
    precision: Precision | None = None

    def load(self) -> tuple[OneShotDenoiser, torch.nn.Module]:
        with tempfile.TemporaryDirectory(prefix="mdds-models-") as scratch:  # loaded into memory, then removed
            denoiser = load_denoiser(local_copy(self.denoiser, scratch), self.denoiser_fit)
            if denoiser.in_channels != self.in_chans:
                # A UNet trained on other data (RGB for the gray digits) loads fine and would only fail mid-run.
                raise UserError(f"denoiser {self.denoiser} takes {denoiser.in_channels}-channel images but the "
                                f"data has {self.in_chans}: a checkpoint of the wrong architecture")
            if self.classifier_kind == "digits":
                from pipeline.models.digits import load_digits_classifier

                classifier = load_digits_classifier(self.classifier)
            elif self.classifier_kind == "timm":
                weights = local_copy(self.classifier_weights, scratch) if self.classifier_weights else None
                classifier = load_timm_classifier(self.classifier, weights, self.num_classes, self.in_chans,
                                                  self.classifier_interpolation)
            elif self.classifier_kind == "hf":
                classifier = load_hf_classifier(local_copy(self.classifier, scratch), self.in_chans,
                                                self.classifier_interpolation)
            else:
                classifier = load_torchscript_classifier(local_copy(self.classifier, scratch))
        check_finite(classifier, f"classifier {self.classifier}")
        return denoiser, classifier

    def check(self, image_shape: tuple[int, int, int]) -> tuple[str, ...]:
        """Load both models once (in the driver), check the image size against the denoiser fit and the
        classifier's output width; returns the report lines saying how images reach both models.

        A bad path, unreadable weights or an image size the fit cannot handle then fail as one line
        before any actor starts, and a TorchScript classifier with more logits than the preset's classes
        cannot spill its argmax into another image's counts.
        """
        denoiser, classifier = self.load()
        denoiser.check_size(image_shape[1:])
        with torch.inference_mode():
            logits = classifier(torch.full((1, *image_shape), 0.5))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise UserError(f"classifier {self.classifier} returns logits of shape {tuple(logits.shape)} for one "
                            f"{'x'.join(map(str, image_shape))} image; expected (1, {self.num_classes})")
        arithmetic = {"bf16": ("precision: bf16 autocast (denoiser and classifier)",),
                      "fp32": ("precision: fp32",), None: ()}[self.precision]
        return (*model_notes(denoiser, classifier, image_shape[1:]), *arithmetic)


def model_notes(denoiser: OneShotDenoiser, classifier: torch.nn.Module, size: tuple[int, int]) -> tuple[str, ...]:
    """Report lines: the denoiser fit and the classifier's resize for images of `size`, which decide
    whether the numbers can be compared with a published setup (docs/imagenet-cifar.md)."""
    if isinstance(classifier, NormalizedClassifier):
        resize = classifier.describe_resize(size)
    else:
        resize = "inside the TorchScript classifier"
    lines = (f"denoiser fit: {denoiser.describe_fit(size)}", f"classifier interpolation: {resize}")
    return lines if denoiser.provenance is None else (f"denoiser {denoiser.provenance}", *lines)


def local_copy(location: str, scratch: str) -> str:
    """A local path for a model file or folder: local paths as given, fsspec URLs copied into `scratch`."""
    if "://" not in location:
        return location
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    try:
        fs, path = fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as error:  # unknown scheme, or its backend (s3fs, gcsfs) not installed
        raise UserError(f"cannot open {location}: {error}") from error
    if isinstance(fs, LocalFileSystem):
        return path
    if not fs.exists(path):
        raise UserError(f"model location {location} does not exist")
    target = Path(scratch) / str(len(list(Path(scratch).iterdir()))) / posixpath.basename(path.rstrip("/"))
    target.parent.mkdir()
    fs.get(path, str(target), recursive=fs.isdir(path))
    return str(target)
