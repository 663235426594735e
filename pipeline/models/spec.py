"""Where the actors get their (denoiser, classifier) pair: a `ModelSpec` naming models mdds can load, or
a `ModelFactory` calling a user's own code; both are picklable and loaded once inside each Ray actor.

Shipping a description rather than modules keeps task payloads small and lets every actor load on its
own device; the driver validates it once (`check`) before any actor starts. Model locations may be
fsspec URLs (s3://, gs://): on a cluster the models sit in a bucket every node can read, while the
loaders (diffusers, timm, torch.jit) read local files, so remote ones are copied to a scratch folder.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from pipeline.errors import UserError
from pipeline.models.classifier import Interpolation, NormalizedClassifier
from pipeline.models.denoiser import DenoiserFit, OneShotDenoiser, check_finite, denoiser_from_parts, load_denoiser
from pipeline.models.precision import Precision
from pipeline.models.registry import check_classifier_options, load_classifier

PRECISIONS: tuple[Precision | None, ...] = ("bf16", "fp32", None)


class ModelSource(Protocol):
    """What the actors and the driver need of a model description: `load` the pair (in each actor),
    `check` it once against the images (in the driver, before any actor starts), the classifier's
    number of classes, and the arithmetic (None: the kernel's default)."""

    @property
    def num_classes(self) -> int: ...

    @property
    def precision(self) -> Precision | None: ...

    def load(self) -> tuple[OneShotDenoiser, torch.nn.Module]: ...

    def check(self, image_shape: tuple[int, int, int]) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class ModelSpec:
    """denoiser: diffusers dir; classifier, by `classifier_kind` (a kind of pipeline.models.registry):
    digits cache dir | timm model name | TorchScript path | Hugging Face transformers save_pretrained dir
    ("hf") | "package.module:function" of a user's factory ("py").

    denoiser_fit: how inputs of another size reach the UNet (pipeline.models.denoiser); classifier_interpolation:
    the classifier's resize, None for the model's own config (timm / image processor); precision: the
    arithmetic the actors run both networks in (pipeline.models.precision; None: the kernel's default).
    A flag the kind has no use for (weights for a Hugging Face directory, an interpolation for a
    TorchScript file) is refused on construction rather than silently ignored.
    """

    denoiser: str
    classifier_kind: str
    classifier: str
    num_classes: int
    in_chans: int = 3
    classifier_weights: str | None = None
    denoiser_fit: DenoiserFit = "pad"
    classifier_interpolation: Interpolation | None = None
    precision: Precision | None = None

    def __post_init__(self) -> None:
        check_classifier_options(self.classifier_kind, self.classifier, self.classifier_weights is not None,
                                 self.classifier_interpolation is not None)

    def load(self) -> tuple[OneShotDenoiser, torch.nn.Module]:
        with tempfile.TemporaryDirectory(prefix="mdds-models-") as scratch:  # loaded into memory, then removed
            denoiser = load_denoiser(local_copy(self.denoiser, scratch), self.denoiser_fit)
            if denoiser.in_channels != self.in_chans:
                # A UNet trained on other data (RGB for the gray digits) loads fine and would only fail mid-run.
                raise UserError(f"denoiser {self.denoiser} takes {denoiser.in_channels}-channel images but the "
                                f"data has {self.in_chans}: a checkpoint of the wrong architecture")
            classifier = load_classifier(self, partial(local_copy, scratch=scratch))
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
        return check_models(denoiser, classifier, image_shape, self.num_classes, f"classifier {self.classifier}",
                            self.precision)


@dataclass(frozen=True)
class ModelFactory:
    """Models mdds cannot load by name: `factory()` builds (denoiser, classifier) inside each actor.

    `factory` must be picklable (a module-level function, or anything cloudpickle ships, as Ray does)
    and return a denoiser in any form `as_denoiser` accepts (fit "pad" unless it is a OneShotDenoiser
    already) and a torch.nn.Module mapping [0,1] images (N, C, H, W) to logits (N, num_classes),
    resizing and normalizing inside itself. Both are put in eval mode.
    """

    factory: Callable[[], tuple[object, torch.nn.Module]]
    num_classes: int
    precision: Precision | None = None

    def __post_init__(self) -> None:
        if not callable(self.factory):
            raise TypeError(f"factory must be callable, got a {type(self.factory).__name__}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be bf16, fp32 or None, got {self.precision!r}")

    @property
    def _name(self) -> str:
        """The factory as the error messages name it."""
        return f"factory {getattr(self.factory, '__qualname__', type(self.factory).__name__)}"

    def load(self) -> tuple[OneShotDenoiser, torch.nn.Module]:
        built = self.factory()
        if not (isinstance(built, tuple) and len(built) == 2):
            raise TypeError(f"{self._name} must return a (denoiser, classifier) pair, got a {type(built).__name__}")
        denoiser, classifier = as_denoiser(built[0]), built[1]
        if not isinstance(classifier, torch.nn.Module):
            raise TypeError(f"{self._name} returned a classifier of type {type(classifier).__name__}, "
                            "not a torch.nn.Module")
        check_finite(classifier, f"classifier of {self._name}")
        return denoiser, classifier.eval()

    def check(self, image_shape: tuple[int, int, int]) -> tuple[str, ...]:
        """Build the models once (in the driver) and check them against the images, as ModelSpec.check
        does, plus the denoiser's channels (a ModelSpec checks those on load)."""
        denoiser, classifier = self.load()
        if denoiser.in_channels != image_shape[0]:
            raise UserError(f"the denoiser of {self._name} takes {denoiser.in_channels}-channel images but the "
                            f"data has {image_shape[0]}")
        return check_models(denoiser, classifier, image_shape, self.num_classes, f"classifier of {self._name}",
                            self.precision)


def check_models(denoiser: OneShotDenoiser, classifier: torch.nn.Module, image_shape: tuple[int, int, int],
                 num_classes: int, what: str, precision: Precision | None) -> tuple[str, ...]:
    """UserError if the denoiser's fit cannot take `image_shape` images or the classifier (`what`, for
    the message) does not return (1, num_classes) logits for one; else the models' report lines."""
    denoiser.check_size(image_shape[1:])
    with torch.inference_mode():
        logits = classifier(torch.full((1, *image_shape), 0.5))
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise UserError(f"{what} returns logits of shape {tuple(logits.shape)} for one "
                        f"{'x'.join(map(str, image_shape))} image; expected (1, {num_classes})")
    arithmetic = {"bf16": ("precision: bf16 autocast (denoiser and classifier)",),
                  "fp32": ("precision: fp32",), None: ()}[precision]
    return (*model_notes(denoiser, classifier, image_shape[1:]), *arithmetic)


def model_notes(denoiser: OneShotDenoiser, classifier: torch.nn.Module, size: tuple[int, int]) -> tuple[str, ...]:
    """Report lines: the denoiser fit and the classifier's resize for images of `size`, which decide
    whether the numbers can be compared with a published setup (docs/imagenet-cifar.md)."""
    if isinstance(classifier, NormalizedClassifier):
        resize = classifier.describe_resize(size)
    elif isinstance(classifier, torch.jit.ScriptModule):
        resize = "inside the TorchScript classifier"
    else:
        resize = "inside the classifier module"
    lines = (f"denoiser fit: {denoiser.describe_fit(size)}", f"classifier interpolation: {resize}")
    return lines if denoiser.provenance is None else (f"denoiser {denoiser.provenance}", *lines)


def as_denoiser(denoiser: object, fit: DenoiserFit = "pad") -> OneShotDenoiser:
    """A OneShotDenoiser, in eval mode, from what a Python user has: one already (kept with its own fit),
    a diffusers UNet2DModel + scheduler directory (local path or fsspec URL), or a (UNet2DModel,
    scheduler) pair (the scheduler supplies the noise schedule ᾱ and the prediction type)."""
    if isinstance(denoiser, OneShotDenoiser):
        return denoiser.eval()
    if isinstance(denoiser, str | os.PathLike):
        with tempfile.TemporaryDirectory(prefix="mdds-models-") as scratch:  # loaded into memory, then removed
            return load_denoiser(local_copy(os.fspath(denoiser), scratch), fit).eval()
    if isinstance(denoiser, tuple) and len(denoiser) == 2 and _is_unet_and_scheduler(*denoiser):
        unet, scheduler = denoiser
        check_finite(unet, "denoiser UNet")
        return denoiser_from_parts(unet, scheduler, fit).eval()
    raise TypeError(f"denoiser must be a OneShotDenoiser, a diffusers directory (path or URL) or a "
                    f"(UNet2DModel, scheduler) pair, got a {type(denoiser).__name__}")


def _is_unet_and_scheduler(unet: object, scheduler: object) -> bool:
    """diffusers is imported only here: whoever passes a pair has imported it already."""
    from diffusers import UNet2DModel

    return isinstance(unet, UNet2DModel) and hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "config")


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


@contextmanager
def output_folder(location: str) -> Iterator[str]:
    """A local folder whose files end up at `location` (a local path or an fsspec URL): the writers
    (diffusers' save_pretrained, safetensors) write local files. A local location is the folder itself,
    created; for a URL it is a scratch folder uploaded to it when the block ends without an error, so a
    failed write uploads nothing. Files already at `location` that the block does not write are kept."""
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.data.filesystems import open_location

    fs, path = open_location(location)
    if isinstance(fs, LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mdds-upload-") as scratch:
        yield scratch
        fs.makedirs(path, exist_ok=True)
        fs.put(scratch + "/", path.rstrip("/") + "/", recursive=True)
