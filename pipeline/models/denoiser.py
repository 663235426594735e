"""One-shot diffusion denoiser (method.md §2): a DDPM UNet used as a single-step x̂₀ estimator.

Gaussian noise of std sigma on an image in [0, 1] is noise of std 2·sigma in the model's [-1, 1]
space; scaling by sqrt(ᾱ_t*) turns the noisy image into (approximately) a forward-diffusion sample at
the step t* whose noise level matches, so one network call predicts the clean image.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from pipeline.errors import UserError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class OneShotDenoiser(torch.nn.Module):
    """Wraps a diffusers `UNet2DModel` with its ᾱ schedule; maps noisy [0,1] images to clean ones."""

    def __init__(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.in_channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        self.sample_size = (size, size) if isinstance(size, int) else tuple(size)

    def timestep_for_sigma(self, sigma: float) -> int:
        """t* = the first t with sqrt(ᾱ_t) <= 1/sqrt(1 + (2·sigma)²) (method.md §2 step 2)."""
        if sigma <= 0:
            raise UserError(f"sigma must be positive, got {sigma}")
        target = 1.0 / math.sqrt(1.0 + (2.0 * sigma) ** 2)
        below = torch.nonzero(self.alphas_cumprod.sqrt() <= target)
        if below.numel() == 0:
            raise UserError(
                f"sigma={sigma} is noisier than the last step of this denoiser's schedule; use a smaller sigma"
            )
        return int(below[0, 0])

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Denoise images x + δ given in image space ([0,1] plus noise) at per-sample steps t*."""
        height, width = noisy.shape[-2:]
        model_input = 2.0 * noisy - 1.0
        if (height, width) != self.sample_size:
            model_input = F.interpolate(model_input, size=self.sample_size, mode="bilinear", antialias=True,
                                        align_corners=False)
        alpha_bar = self.alphas_cumprod[timesteps].to(model_input.dtype).view(-1, 1, 1, 1)
        sqrt_alpha_bar = alpha_bar.sqrt()
        sqrt_one_minus = (1.0 - alpha_bar).sqrt()
        x_t = sqrt_alpha_bar * model_input
        output = self.unet(x_t, timesteps).sample[:, : self.in_channels]
        if self.prediction_type == "epsilon":
            x0 = (x_t - sqrt_one_minus * output) / sqrt_alpha_bar
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_alpha_bar * x_t - sqrt_one_minus * output
        else:
            x0 = output
        x0 = x0.clamp(-1.0, 1.0)
        if (height, width) != self.sample_size:
            x0 = F.interpolate(x0, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return (x0 + 1.0) / 2.0


def denoiser_from_parts(unet: UNet2DModel, scheduler: DDPMScheduler) -> OneShotDenoiser:
    """Build the wrapper from a UNet and its scheduler (the scheduler supplies ᾱ and the output type)."""
    return OneShotDenoiser(unet, scheduler.alphas_cumprod.clone(), scheduler.config.prediction_type)


def _component_dirs(path: Path) -> tuple[Path, Path]:
    """Accept both a flat save (UNet + scheduler in one dir) and a pipeline layout (unet/, scheduler/)."""
    if (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
    else:
        unet_dir = path
    scheduler_dir = path / "scheduler" if (path / "scheduler" / "scheduler_config.json").is_file() else path
    return unet_dir, scheduler_dir


def load_denoiser(path: str | Path) -> OneShotDenoiser:
    """Load a diffusers-format denoiser directory; any problem becomes one clear UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"denoiser directory not found: {path} (expected a diffusers UNet2DModel save_pretrained dir)")
    unet_dir, scheduler_dir = _component_dirs(path)
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"no UNet config.json in {path} (expected UNet2DModel.save_pretrained output)")
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise UserError(f"no scheduler_config.json in {path} (save the DDPMScheduler next to the UNet)")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)
        scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        # diffusers appends advice on flags this tool does not have (ignore_mismatched_sizes); drop it.
        first_line = first_line.split(" If you want to instead overwrite")[0]
        if "expected shape" in first_line:  # config.json and weights from different architectures
            first_line = "weights do not fit config.json: " + first_line.split("because ", 1)[-1]
        raise UserError(f"could not load denoiser from {path}: {first_line}") from error
    in_channels, out_channels = int(unet.config.in_channels), int(unet.config.out_channels)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"denoiser {path} has {in_channels} input and {out_channels} output channels; expected "
                        f"{in_channels} (epsilon/x0/v) or {2 * in_channels} (with learned variance)")
    check_finite(unet, f"denoiser {path}")
    return denoiser_from_parts(unet.eval(), scheduler)


def check_finite(module: torch.nn.Module, what: str) -> None:
    """NaN or Inf weights would silently give garbage counts, so refuse them up front."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what}: weight {name} contains NaN or Inf")
