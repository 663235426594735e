"""One-shot diffusion denoiser (docs/denoised-smoothing.md): a DDPM UNet used as a single-step x̂₀ estimator.

Gaussian noise of std sigma on an image in [0, 1] is noise of std 2·sigma in the model's [-1, 1]
space; scaling by sqrt(ᾱ_t*) turns the noisy image into (approximately) a forward-diffusion sample at
the step t* whose noise level matches, so one network call predicts the clean image. That holds only
if the UNet sees that noise *white* (docs/denoised-smoothing.md, "The noise must reach the UNet white"), which decides how an input whose size is not the
UNet's is brought to it (`fit`):
- ``pad`` (default): reflection-pad the [-1, 1] input to the UNet's size, run it, center-crop x̂₀ back
  (the published multi-scale code's CropWrapper). Every UNet input pixel is a copy of one input pixel.
- ``native``: run the fully convolutional UNet at the input's own size (Carlini et al. run the 256×256
  ImageNet model at 224); the size must be a multiple of the UNet's total downsampling.
- ``resize``: bilinear resize to the UNet's size and back. Interpolation lowers and correlates the
  noise, so t* no longer matches what the UNet sees: an explicit opt-in only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

if TYPE_CHECKING:  # diffusers costs seconds to import; the jobs' --help and flag errors do not need it
    from diffusers import DDPMScheduler, UNet2DModel

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DenoiserFit = Literal["pad", "native", "resize"]
DENOISER_FITS: tuple[str, ...] = ("pad", "native", "resize")
# What diffusers' configs cannot say: the network was trained on rescaled timesteps (see load_denoiser).
TIMESTEP_SCALE_FILE = "timestep_scale.json"
# Written by the fine-tuning export (pipeline/finetune/weights.py): which base model and run made this one.
FINETUNE_RECORD_FILE = "finetune.json"


class OneShotDenoiser(torch.nn.Module):
    """Wraps a diffusers `UNet2DModel` with its ᾱ schedule; maps noisy [0,1] images to clean ones.

    `timestep_scale`: the network is called with t·timestep_scale instead of t. improved-diffusion's
    models (rescale_timesteps) were trained on t·1000/T, so with their own T-step schedule t* is chosen
    on all T steps, as the published code does, and the network still sees what it was trained on.
    """

    def __init__(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 fit: DenoiserFit = "pad", timestep_scale: float = 1.0):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if fit not in DENOISER_FITS:
            raise UserError(f"unknown denoiser fit {fit!r}; expected one of {', '.join(DENOISER_FITS)}")
        if not timestep_scale > 0:
            raise UserError(f"timestep scale must be positive, got {timestep_scale}")
        self.unet = unet
        self.prediction_type = prediction_type
        self.fit = fit
        self.timestep_scale = float(timestep_scale)
        self.register_buffer("alphas_cumprod", alphas_cumprod.to(torch.float64), persistent=False)
        self.in_channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        self.sample_size = (size, size) if isinstance(size, int) else tuple(size)
        # UNet2DModel halves the resolution after every level but the last.
        self.downsampling = 2 ** (len(unet.config.block_out_channels) - 1)
        self.provenance: str | None = None  # "fine-tuned from BASE by run NAME (...)", for the report header

    def timestep_for_sigma(self, sigma: float) -> int:
        """t* = the first t with sqrt(ᾱ_t) <= 1/sqrt(1 + (2·sigma)²) (docs/denoised-smoothing.md, step 3)."""
        if sigma <= 0:
            raise UserError(f"sigma must be positive, got {sigma}")
        target = 1.0 / math.sqrt(1.0 + (2.0 * sigma) ** 2)
        below = torch.nonzero(self.alphas_cumprod.sqrt() <= target)
        if below.numel() == 0:
            raise UserError(
                f"sigma={sigma} is noisier than the last step of this denoiser's schedule; use a smaller sigma"
            )
        return int(below[0, 0])

    def check_size(self, size: tuple[int, int]) -> None:
        """UserError if `fit` cannot bring images of `size` (H, W) to this UNet; the driver calls it first."""
        height, width = size
        model_height, model_width = self.sample_size
        model = f"{model_height}x{model_width}"
        if self.fit == "pad" and (height > model_height or width > model_width):
            raise UserError(f"--denoiser-fit pad: {height}x{width} images are larger than the denoiser's {model}; "
                            f"use --denoiser-fit native (the UNet at {height}x{width}) or resize")
        if self.fit == "pad" and (model_height - height >= height or model_width - width >= width):
            raise UserError(f"--denoiser-fit pad: reflection padding {height}x{width} images to {model} would "
                            "mirror more than the image; use --denoiser-fit native or resize")
        if self.fit == "native" and (height % self.downsampling or width % self.downsampling):
            raise UserError(f"--denoiser-fit native: {height}x{width} is not a multiple of the UNet's total "
                            f"downsampling {self.downsampling}; use --denoiser-fit pad or resize")

    def describe_fit(self, size: tuple[int, int]) -> str:
        """One report line: how images of `size` reach the UNet."""
        height, width = size
        model = f"{self.sample_size[0]}x{self.sample_size[1]}"
        if tuple(size) == self.sample_size:
            return f"{self.fit} (the UNet's own size, {model}: nothing to fit)"
        return {
            "pad": f"pad (reflection-pad {height}x{width} to {model}, center-crop x0 back)",
            "native": f"native (the {model} UNet run at {height}x{width})",
            "resize": f"resize (bilinear {height}x{width} -> {model} and back; changes the noise statistics)",
        }[self.fit]

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1]-space images (N, C, H, W) → what the UNet is given, per `fit`."""
        size = tuple(images.shape[-2:])
        if size == self.sample_size or self.fit == "native":
            return images
        if self.fit == "resize":
            return F.interpolate(images, size=self.sample_size, mode="bilinear", antialias=True, align_corners=False)
        (top, bottom), (left, right) = self._padding(size)
        return F.pad(images, (left, right, top, bottom), mode="reflect")

    def from_model(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The inverse geometry of `to_model`: UNet-sized images back to `size`."""
        if tuple(images.shape[-2:]) == tuple(size):
            return images
        if self.fit == "resize":
            return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        (top, _), (left, _) = self._padding(size)
        return images[..., top:top + size[0], left:left + size[1]]

    def _padding(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(top, bottom), (left, right) padding that centers `size` in the UNet's size (odd extra: bottom/right)."""
        extra = [model - own for model, own in zip(self.sample_size, size)]
        return (extra[0] // 2, extra[0] - extra[0] // 2), (extra[1] // 2, extra[1] - extra[1] // 2)

    def network(self, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's ε / x₀ / v output at steps `timesteps` (the first C channels: learned-σ models add C more)."""
        steps = timesteps * self.timestep_scale if self.timestep_scale != 1.0 else timesteps
        return self.unet(x_t, steps).sample[:, : self.in_channels]

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Denoise images x + δ given in image space ([0,1] plus noise) at per-sample steps t*."""
        size = tuple(noisy.shape[-2:])
        self.check_size(size)
        alpha_bar = self.alphas_cumprod[timesteps].to(noisy.dtype).view(-1, 1, 1, 1)
        sqrt_alpha_bar = alpha_bar.sqrt()
        sqrt_one_minus = (1.0 - alpha_bar).sqrt()
        x_t = self.to_model(sqrt_alpha_bar * (2.0 * noisy - 1.0))
        output = self.network(x_t, timesteps)
        if self.prediction_type == "epsilon":
            x0 = (x_t - sqrt_one_minus * output) / sqrt_alpha_bar
        elif self.prediction_type == "v_prediction":
            x0 = sqrt_alpha_bar * x_t - sqrt_one_minus * output
        else:
            x0 = output
        return (self.from_model(x0.clamp(-1.0, 1.0), size) + 1.0) / 2.0


def denoiser_from_parts(unet: UNet2DModel, scheduler: DDPMScheduler, fit: DenoiserFit = "pad",
                        timestep_scale: float = 1.0) -> OneShotDenoiser:
    """Build the wrapper from a UNet and its scheduler (the scheduler supplies ᾱ and the output type)."""
    return OneShotDenoiser(unet, scheduler.alphas_cumprod.clone(), scheduler.config.prediction_type, fit,
                           timestep_scale)


def write_timestep_scale(directory: str | Path, scale: float) -> Path | None:
    """Record a network trained on t·scale next to the scheduler config (nothing to write for scale 1).

    diffusers' UNet2DModel and DDPMScheduler have no field for it, and a missing scale would make the
    network see 4× the step it expects (improved-diffusion's 4,000-step models), silently.
    """
    if scale == 1.0:
        return None
    path = Path(directory) / TIMESTEP_SCALE_FILE
    path.write_text(json.dumps({"timestep_scale": scale, "meaning": "the network is called with t * timestep_scale "
                                "(improved-diffusion rescale_timesteps: 1000 / diffusion_steps)"}, indent=2))
    return path


def read_timestep_scale(directory: Path) -> float:
    """The scale `write_timestep_scale` recorded in `directory`, else 1 (the network sees t itself)."""
    path = directory / TIMESTEP_SCALE_FILE
    if not path.is_file():
        return 1.0
    try:
        scale = json.loads(path.read_text())["timestep_scale"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a timestep scale record: {error}") from None
    if not isinstance(scale, int | float) or not scale > 0:
        raise UserError(f"{path}: timestep_scale must be a positive number, got {scale!r}")
    return float(scale)


def _component_dirs(path: Path) -> tuple[Path, Path]:
    """Accept both a flat save (UNet + scheduler in one dir) and a pipeline layout (unet/, scheduler/)."""
    if (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
    else:
        unet_dir = path
    scheduler_dir = path / "scheduler" if (path / "scheduler" / "scheduler_config.json").is_file() else path
    return unet_dir, scheduler_dir


def load_denoiser(path: str | Path, fit: DenoiserFit = "pad") -> OneShotDenoiser:
    """Load a diffusers-format denoiser directory (with its timestep scale, if recorded); any problem
    becomes one clear UserError. `fit`: how inputs of another size reach the UNet (module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"denoiser directory not found: {path} (expected a diffusers UNet2DModel save_pretrained dir)")
    unet_dir, scheduler_dir = _component_dirs(path)
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"no UNet config.json in {path} (expected UNet2DModel.save_pretrained output)")
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise UserError(f"no scheduler_config.json in {path} (save the DDPMScheduler next to the UNet)")
    from diffusers import DDPMScheduler, UNet2DModel

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
    denoiser = denoiser_from_parts(unet.eval(), scheduler, fit, read_timestep_scale(scheduler_dir))
    denoiser.provenance = read_provenance(path)
    return denoiser


def read_provenance(directory: Path) -> str | None:
    """One line naming the base checkpoint and the fine-tuning run of an exported denoiser, None for a
    denoiser that was not fine-tuned here: a report must say which model its certificates are about."""
    path = directory / FINETUNE_RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return (f"fine-tuned from {record['base_denoiser']} by run {record['run']} ({record['step']} steps, "
                f"{record['trainable']}; checkpoints in {record['storage_path']})")
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{path} is not a fine-tuning record: {error}") from None


def check_finite(module: torch.nn.Module, what: str) -> None:
    """NaN or Inf weights would silently give garbage counts, so refuse them up front."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{what}: weight {name} contains NaN or Inf")
