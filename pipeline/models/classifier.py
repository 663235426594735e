"""Classifiers that take images in the certified space ([0,1], C×H×W) and return logits.

Certification adds noise in the classifier's *input* space, so resizing and normalization belong to
the model, not to the data loader: `NormalizedClassifier` carries them. The resize uses the
interpolation the network was trained with (timm's data config, or a Hugging Face image processor
config): docs/denoised-smoothing.md, and Carlini et al. resize to BEiT's 512 with bicubic, antialiased.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

Interpolation = Literal["bicubic", "bilinear", "nearest"]
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")
# PIL's resampling codes, as Hugging Face image processor configs store them ("resample").
PIL_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def resize_images(images: torch.Tensor, size: tuple[int, int], interpolation: Interpolation) -> torch.Tensor:
    """Resize a batch the way PIL (and so timm's and transformers' eval transforms) does.

    antialias=True is PyTorch's PIL-equivalent resampling: the filter widens when downsampling (no
    aliasing) and bicubic uses PIL's a = -0.5 kernel; F.interpolate(mode="bicubic", antialias=True) is
    also exactly Carlini et al.'s classifier resize.
    """
    if interpolation == "nearest":
        return F.interpolate(images, size=size, mode="nearest")
    return F.interpolate(images, size=size, mode=interpolation, antialias=True, align_corners=False)


class NormalizedClassifier(torch.nn.Module):
    """Resize to the network's input size with its interpolation, normalize with its mean/std, return logits."""

    def __init__(
        self,
        network: torch.nn.Module,
        input_size: tuple[int, int] | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: Interpolation = "bicubic",
    ):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {interpolation!r}; expected one of {', '.join(INTERPOLATIONS)}")
        self.network = network
        self.input_size = tuple(input_size) if input_size is not None else None
        self.interpolation = interpolation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            images = resize_images(images, self.input_size, self.interpolation)
        return self.network((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))

    def describe_resize(self, size: tuple[int, int]) -> str:
        """One report line: how a denoised image of `size` reaches the network."""
        if self.input_size is None or tuple(size) == self.input_size:
            return f"none (the classifier takes {size[0]}x{size[1]})"
        antialias = "" if self.interpolation == "nearest" else ", antialiased"
        return f"{self.interpolation}{antialias}, {size[0]}x{size[1]} -> {self.input_size[0]}x{self.input_size[1]}"


def load_timm_classifier(
    model_name: str,
    weights_path: str | Path | None,
    num_classes: int,
    in_chans: int = 3,
    interpolation: Interpolation | None = None,
) -> NormalizedClassifier:
    """A timm model with local weights (safetensors, or a torch file loaded with weights_only=True).

    Input size, interpolation and normalization come from timm's data config for the model, so a BEiT
    at 512 (bicubic) and a ResNet at 224 are both fed what they were trained on; `interpolation`
    overrides the config's.
    """
    import timm
    from timm.data import resolve_data_config

    try:
        network = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as error:
        raise UserError(f"unknown timm model {model_name!r}: {error}") from error
    if weights_path is not None:
        state = load_state_dict(weights_path)
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise UserError(
                f"classifier weights {weights_path} do not fit timm model {model_name!r} "
                f"with {num_classes} classes: {str(error).splitlines()[0]}"
            ) from error
    config = resolve_data_config({}, model=network)
    input_size = tuple(config["input_size"][1:])
    mean, std = tuple(config["mean"]), tuple(config["std"])
    if len(mean) != in_chans:
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    chosen = interpolation or _supported(config["interpolation"], f"timm's data config for {model_name}")
    return NormalizedClassifier(network.eval(), input_size, mean, std, chosen)


def _supported(interpolation: object, where: str) -> Interpolation:
    """The model's own interpolation, if torch has it; otherwise the user must choose one."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"{where} asks for interpolation {interpolation!r}, which torch's resize lacks; "
                        f"pass --classifier-interpolation ({', '.join(INTERPOLATIONS)})")
    return interpolation


class HuggingFaceLogits(torch.nn.Module):
    """A transformers image classifier as a module from normalized pixels to logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load_hf_classifier(
    directory: str | Path, in_chans: int = 3, interpolation: Interpolation | None = None
) -> NormalizedClassifier:
    """A Hugging Face transformers image classifier from a local `save_pretrained` directory, offline.

    Size, normalization and interpolation come from its image processor config
    (preprocessor_config.json), which is how the model was fed in training; `interpolation` overrides
    it (e.g. bicubic, as Carlini et al. feed their CIFAR-10 ViT). Weights load as safetensors, or with
    torch.load(weights_only=True).
    """
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserError(f"no config.json in {directory}: expected a transformers save_pretrained directory")
    try:
        from transformers import AutoModelForImageClassification
        from transformers.utils import logging as transformers_logging
    except ImportError:
        raise UserError("Hugging Face classifiers need transformers: pip install -e '.[hf]'") from None
    transformers_logging.disable_progress_bar()  # one bar per actor would clutter the job's output
    size, mean, std, config_interpolation = _processor_settings(directory / "preprocessor_config.json", in_chans)
    try:
        model = AutoModelForImageClassification.from_pretrained(directory, local_files_only=True, weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"could not load Hugging Face classifier from {directory}: {first_line}") from error
    chosen = interpolation or _supported(config_interpolation, f"{directory / 'preprocessor_config.json'}")
    return NormalizedClassifier(HuggingFaceLogits(model.eval()), size, mean, std, chosen)


def _processor_settings(
    path: Path, in_chans: int
) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...], str]:
    """(input size, mean, std, interpolation) from an image processor config with a fixed output size."""
    if not path.is_file():
        raise UserError(f"no {path.name} in {path.parent}: save the model's image processor next to it "
                        "(AutoImageProcessor.save_pretrained) so its input size and normalization are known")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not JSON: {error}") from None
    size = config.get("size")
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if not isinstance(size, dict) or not {"height", "width"} <= set(size):
        raise UserError(f"{path}: size {size!r} is not a fixed height and width; only processors that resize "
                        "to a fixed size (ViT, BEiT, DeiT) are supported")
    if config.get("do_normalize", True):
        mean, std = tuple(config["image_mean"]), tuple(config["image_std"])
    else:
        mean, std = (0.0,) * in_chans, (1.0,) * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"{path}: image_mean/image_std have {len(mean)} values but the images {in_chans} channels")
    resample = config.get("resample", 2)  # transformers' default for ViT/BEiT processors: PIL bilinear
    interpolation = PIL_RESAMPLE.get(resample, f"PIL resample code {resample}")
    return (int(size["height"]), int(size["width"])), mean, std, interpolation


def load_torchscript_classifier(path: str | Path) -> torch.nn.Module:
    """A TorchScript classifier that already takes [0,1] images in the certified space."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript classifier not found: {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as error:
        raise UserError(f"not a TorchScript file: {path} ({str(error).splitlines()[0]})") from error


def load_python_classifier(reference: str) -> torch.nn.Module:
    """The module a user's factory returns: `reference` is "package.module:function", imported by name
    (on a cluster, on every node: installed, or on PYTHONPATH) and called with no arguments.

    The factory's module must map [0,1] images (N, C, H, W) to logits (N, num_classes), resizing and
    normalizing inside itself like a TorchScript classifier; it is put in eval mode.
    """
    module_name, _, function_name = reference.partition(":")
    where = f"classifier py:{reference}"
    if not (all(part.isidentifier() for part in module_name.split(".")) and function_name.isidentifier()):
        raise UserError(f"{where}: expected py:package.module:function (a factory called with no arguments "
                        "that returns a torch.nn.Module)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"{where}: cannot import {module_name} ({error}); install it or put its folder on "
                        "PYTHONPATH") from error
    if not hasattr(module, function_name):
        raise UserError(f"{where}: module {module_name} has no attribute {function_name}")
    factory = getattr(module, function_name)
    if not callable(factory):
        raise UserError(f"{where}: {module_name}.{function_name} is not callable (type {type(factory).__name__})")
    classifier = factory()
    if not isinstance(classifier, torch.nn.Module):
        raise UserError(f"{where}: {module_name}.{function_name}() returned a {type(classifier).__name__} object, "
                        "not a torch.nn.Module")
    return classifier.eval()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights safely: safetensors, or torch.load(weights_only=True); unwrap common containers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise many types for corrupt files
        raise UserError(f"could not read weights {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error
    for key in ("state_dict", "model_ema", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    return state
