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
from pipeline.models.classifier import load_timm_classifier, load_torchscript_classifier
from pipeline.models.denoiser import OneShotDenoiser, check_finite, load_denoiser

ClassifierKind = Literal["digits", "timm", "torchscript"]


@dataclass(frozen=True)
class ModelSpec:
    """denoiser: diffusers dir; classifier: digits cache dir | timm model name | TorchScript path."""

    denoiser: str
    classifier_kind: ClassifierKind
    classifier: str
    num_classes: int
    in_chans: int = 3
    classifier_weights: str | None = None

    def load(self) -> tuple[OneShotDenoiser, torch.nn.Module]:
        with tempfile.TemporaryDirectory(prefix="mdds-models-") as scratch:  # loaded into memory, then removed
            denoiser = load_denoiser(local_copy(self.denoiser, scratch))
            if denoiser.in_channels != self.in_chans:
                # A UNet trained on other data (RGB for the gray digits) loads fine and would only fail mid-run.
                raise UserError(f"denoiser {self.denoiser} takes {denoiser.in_channels}-channel images but the "
                                f"data has {self.in_chans}: a checkpoint of the wrong architecture")
            if self.classifier_kind == "digits":
                from pipeline.models.digits import load_digits_classifier

                classifier = load_digits_classifier(self.classifier)
            elif self.classifier_kind == "timm":
                weights = local_copy(self.classifier_weights, scratch) if self.classifier_weights else None
                classifier = load_timm_classifier(self.classifier, weights, self.num_classes, self.in_chans)
            else:
                classifier = load_torchscript_classifier(local_copy(self.classifier, scratch))
        check_finite(classifier, f"classifier {self.classifier}")
        return denoiser, classifier

    def check(self, image_shape: tuple[int, int, int]) -> None:
        """Load both models once (in the driver) and check the classifier's output width.

        A bad path or unreadable weights then fail as one line before any actor starts, and a
        TorchScript classifier with more logits than the preset's classes cannot spill its argmax
        into another image's counts.
        """
        _, classifier = self.load()
        with torch.inference_mode():
            logits = classifier(torch.full((1, *image_shape), 0.5))
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise UserError(f"classifier {self.classifier} returns logits of shape {tuple(logits.shape)} for one "
                            f"{'x'.join(map(str, image_shape))} image; expected (1, {self.num_classes})")


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
