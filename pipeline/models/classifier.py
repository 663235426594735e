"""Classifiers that take images in the certified space ([0,1], C×H×W) and return logits.

Certification adds noise in the classifier's *input* space, so resizing and normalization belong to
the model, not to the data loader: `NormalizedClassifier` carries them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.errors import UserError


class NormalizedClassifier(torch.nn.Module):
    """Resize to the network's input size, normalize with its mean/std, return logits."""

    def __init__(
        self,
        network: torch.nn.Module,
        input_size: tuple[int, int] | None,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        self.network = network
        self.input_size = tuple(input_size) if input_size is not None else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)
        return self.network((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))


def load_timm_classifier(
    model_name: str,
    weights_path: str | Path | None,
    num_classes: int,
    in_chans: int = 3,
) -> NormalizedClassifier:
    """A timm model with local weights (safetensors, or a torch file loaded with weights_only=True).

    Input size and normalization come from timm's data config for the model, so a BEiT at 512 and a
    ResNet at 224 are both fed what they were trained on.
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
    return NormalizedClassifier(network.eval(), input_size, mean, std)


def load_torchscript_classifier(path: str | Path) -> torch.nn.Module:
    """A TorchScript classifier that already takes [0,1] images in the certified space."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"TorchScript classifier not found: {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as error:
        raise UserError(f"not a TorchScript file: {path} ({str(error).splitlines()[0]})") from error


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
