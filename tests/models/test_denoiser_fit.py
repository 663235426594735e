"""Denoiser fit (docs/denoised-smoothing.md) and the whole denoise-classify path against the published one.

The white-noise test looks at what the UNet is actually given: a stand-in UNet records the moments of
its input. The parity test rebuilds the published multi-scale path here, from its description (the
original guided-diffusion UNet of tests/models/test_guided_diffusion.py behind a reflection-pad/center-crop
wrapper, x_t = sqrt(ᾱ_t*)·x', ε → x̂₀, clip, (x̂₀+1)/2, the classifier's bicubic resize), and feeds it
the very noise tensors the kernel draws.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from pipeline.errors import UserError
from pipeline.models.denoiser import OneShotDenoiser
from pipeline.models.guided_diffusion import GuidedDiffusionConfig, convert_guided_diffusion, save_converted
from pipeline.models.spec import ModelSpec
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.sampling.noise import Phase, chunk_lengths, chunk_noise
from tests.models.test_guided_diffusion import RefUNet, original_alphas_cumprod, random_reference, save_reference

MODEL_SIZE = 32  # the UNet's size; inputs are 24×24 (pad: 4 on every side; native: 24 = 12·2)
INPUT_SIZE = 24
SIGMA = 0.5




def tiny_unet_config(in_channels: int = 1) -> UNet2DModel:
    """A 2-level UNet (total downsampling 2) whose config the stand-ins borrow."""
    return UNet2DModel(sample_size=MODEL_SIZE, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=(8, 16), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


class MomentRecordingUNet(nn.Module):
    """Stands in for the UNet: accumulates per-pixel sums of its input, its square and its products with
    the right and lower neighbour; predicts ε = 0."""

    def __init__(self):
        super().__init__()
        self.config = tiny_unet_config().config
        self.count = 0
        self.sums: dict[str, torch.Tensor] = {}

    def _add(self, name: str, values: torch.Tensor) -> None:
        total = values.double().sum(dim=0)
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> SimpleNamespace:
        self.count += len(x)
        self._add("x", x)
        self._add("xx", x * x)
        self._add("right", x[..., :, :-1] * x[..., :, 1:])
        self._add("down", x[..., :-1, :] * x[..., 1:, :])
        return SimpleNamespace(sample=torch.zeros_like(x))

    def std(self) -> torch.Tensor:
        mean = self.sums["x"] / self.count
        return (self.sums["xx"] / self.count - mean**2).sqrt()

    def neighbour_correlations(self) -> torch.Tensor:
        mean, std = self.sums["x"] / self.count, self.std()
        right = (self.sums["right"] / self.count - mean[..., :, :-1] * mean[..., :, 1:]) / (
            std[..., :, :-1] * std[..., :, 1:])
        down = (self.sums["down"] / self.count - mean[..., :-1, :] * mean[..., 1:, :]) / (
            std[..., :-1, :] * std[..., 1:, :])
        return torch.cat([right.flatten(), down.flatten()])


def unet_input_moments(fit: str, samples: int = 20_000) -> tuple[MomentRecordingUNet, float]:
    """Feed x + δ (x = 0.5, δ of std SIGMA) through the denoiser; returns the recorder and 2σ·sqrt(ᾱ_t*)."""
    recorder = MomentRecordingUNet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    denoiser = OneShotDenoiser(recorder, scheduler.alphas_cumprod, "epsilon", fit=fit)
    t = denoiser.timestep_for_sigma(SIGMA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(samples // 2000):
            noisy = 0.5 + SIGMA * torch.randn(2000, 1, INPUT_SIZE, INPUT_SIZE, generator=generator)
            denoiser(noisy, torch.full((2000,), t))
    return recorder, 2 * SIGMA * math.sqrt(float(scheduler.alphas_cumprod[t]))


def reaches_the_unet_white(recorder: MomentRecordingUNet, expected_std: float) -> bool:
    """Every pixel's std within 3 % of 2σ·sqrt(ᾱ_t*) and no neighbour correlation (|ρ| <= 0.05; the
    estimates' standard errors at 20,000 samples are 0.5 % and 0.007)."""
    std_ok = ((recorder.std() / expected_std - 1).abs() <= 0.03).all()
    uncorrelated = (recorder.neighbour_correlations().abs() <= 0.05).all()
    return bool(std_ok and uncorrelated)


@pytest.mark.parametrize("fit, unet_size", [("pad", MODEL_SIZE), ("native", INPUT_SIZE)])
def test_pad_and_native_give_the_unet_white_noise_of_the_matched_level(fit: str, unet_size: int) -> None:
    recorder, expected_std = unet_input_moments(fit)
    assert recorder.sums["x"].shape == (1, unet_size, unet_size)
    assert reaches_the_unet_white(recorder, expected_std)


def test_resize_lowers_and_correlates_the_noise() -> None:
    recorder, expected_std = unet_input_moments("resize")
    assert recorder.sums["x"].shape == (1, MODEL_SIZE, MODEL_SIZE)
    assert not reaches_the_unet_white(recorder, expected_std)
    assert recorder.std().min() < 0.9 * expected_std and recorder.neighbour_correlations().max() > 0.2


def test_pad_returns_the_input_geometry_with_the_unet_output_cropped() -> None:
    """ε̂ = 0 gives x̂₀ = x': the padded, denoised image cropped back is the input itself (inside [0, 1])."""
    denoiser = OneShotDenoiser(MomentRecordingUNet(), DDPMScheduler().alphas_cumprod, fit="pad")
    images = torch.rand(3, 1, 21, INPUT_SIZE)  # an odd difference: the extra row is padded at the bottom
    t = torch.full((3,), denoiser.timestep_for_sigma(SIGMA))
    torch.testing.assert_close(denoiser(images, t), images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fit, size, message", [
    ("pad", (40, 40), "larger than the denoiser's 32x32; use --denoiser-fit native"),
    ("pad", (12, 32), "would mirror more than the image"),
    ("native", (25, 24), "not a multiple of the UNet's total downsampling 2"),
])
def test_sizes_a_fit_cannot_handle_are_user_errors(fit: str, size: tuple[int, int], message: str) -> None:
    denoiser = OneShotDenoiser(MomentRecordingUNet(), DDPMScheduler().alphas_cumprod, fit=fit)
    with pytest.raises(UserError, match=message):
        denoiser(torch.rand(1, 1, *size), torch.tensor([10]))


def test_unknown_fit_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown denoiser fit 'crop'"):
        OneShotDenoiser(MomentRecordingUNet(), DDPMScheduler().alphas_cumprod, fit="crop")


# ---------------------------------------------------------------------------------------------
# The whole path against the published one.
# ---------------------------------------------------------------------------------------------

GUIDED_LAYOUT = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,), num_head_channels=16)
GUIDED_FLAGS = GuidedDiffusionConfig(image_size=MODEL_SIZE, channel_mult=(1, 2), num_head_channels=16,
                                     attention_resolutions=(16,), resblock_updown=True, learn_sigma=True)


class PublishedCropWrapper(nn.Module):
    """The published multi-scale code's wrapper: reflection-pad by (in - out)/2, run, center-crop to out."""

    def __init__(self, model: nn.Module, in_size: int, out_size: int):
        super().__init__()
        self.model = model
        self.padding = nn.ReflectionPad2d((in_size - out_size) // 2)
        self.out_size = out_size

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = self.model(self.padding(x), timesteps)
        top = int(round((out.shape[-1] - self.out_size) / 2.0))
        return out[..., top:top + self.out_size, top:top + self.out_size]


def published_denoise(reference: RefUNet, noisy: torch.Tensor, sigma: float) -> torch.Tensor:
    """The published one-shot step on x + δ (δ of std σ): t* = the first t with sqrt(ᾱ_t) <= sqrt(1/(1 + (2σ)²)),
    x_t = sqrt(ᾱ_t*)·(2(x + δ) - 1), ε = the first 3 channels, x̂₀ = x_t/sqrt(ᾱ) - sqrt(1/ᾱ - 1)·ε clipped."""
    sqrt_alphas_cumprod = np.sqrt(original_alphas_cumprod("linear", 1000))
    t = int(np.flatnonzero(sqrt_alphas_cumprod <= math.sqrt(1 / (1 + (2 * sigma) ** 2)))[0])
    alpha_bar = float(sqrt_alphas_cumprod[t] ** 2)
    x_t = (2 * noisy - 1) * math.sqrt(alpha_bar)
    epsilon = PublishedCropWrapper(reference, MODEL_SIZE, INPUT_SIZE)(x_t, torch.full((len(noisy),), t))[:, :3]
    x0 = (math.sqrt(1 / alpha_bar) * x_t - math.sqrt(1 / alpha_bar - 1) * epsilon).clamp(-1, 1)
    return (x0 + 1) / 2


def published_classify(network: nn.Module, denoised: torch.Tensor) -> torch.Tensor:
    """test_vit's eval transform as timm's data config gives it: bicubic (PIL-like, antialiased) to 160,
    mean = std = 0.5; the class is the argmax."""
    resized = F.interpolate(denoised, size=(160, 160), mode="bicubic", antialias=True, align_corners=False)
    return network((resized - 0.5) / 0.5)


@pytest.fixture(scope="module")
def guided_models(tmp_path_factory) -> tuple[RefUNet, nn.Module, Path, Path]:
    """The original-layout reference UNet and the directory the converter job's code writes from it, and a
    random 10-class timm test_vit with its safetensors file."""
    import timm
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("parity")
    reference = random_reference(seed=7, **GUIDED_LAYOUT)
    save_converted(convert_guided_diffusion(save_reference(reference, folder / "model.pt"), GUIDED_FLAGS),
                   folder / "denoiser")
    torch.manual_seed(0)
    network = timm.create_model("test_vit", pretrained=False, num_classes=10).eval()
    save_file(network.state_dict(), str(folder / "test_vit.safetensors"))
    return reference, network, folder / "denoiser", folder / "test_vit.safetensors"


def kernel_noise(image_id: int, sigma: float, total: int) -> torch.Tensor:
    """The noise tensors the kernel draws for every estimation sample of (image_id, sigma)."""
    return torch.cat([chunk_noise((3, INPUT_SIZE, INPUT_SIZE), length, 0, image_id, sigma, Phase.ESTIMATE, chunk,
                                  torch.device("cpu")) for chunk, length in enumerate(chunk_lengths(total))])


def test_denoise_classify_equals_the_published_path_on_the_same_noise(guided_models) -> None:
    reference, network, denoiser_dir, weights = guided_models
    spec = ModelSpec(str(denoiser_dir), "timm", "test_vit", 10, classifier_weights=str(weights))
    fused = FusedDenoiseClassify(*spec.load(), num_classes=10, device="cpu", batch_size=64)
    images = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE, generator=torch.Generator().manual_seed(3))
    sigmas, total = (0.5, 0.25), 24
    counts = fused.count(images, [0, 1], sigmas, {Phase.ESTIMATE: total}, seed=0)[Phase.ESTIMATE]
    with torch.no_grad():
        for row in range(2):
            for stage, sigma in enumerate(sigmas):
                noisy = images[row] + sigma * kernel_noise(row, sigma, total)
                timesteps = torch.full((total,), fused.denoiser.timestep_for_sigma(sigma))
                expected_denoised = published_denoise(reference, noisy, sigma)
                denoised = fused.denoiser(noisy, timesteps)
                assert (denoised - expected_denoised).abs().max().item() <= 1e-4
                expected = published_classify(network, expected_denoised).argmax(1)
                assert torch.equal(fused.predict(noisy, timesteps), expected)
                np.testing.assert_array_equal(counts[row, stage], np.bincount(expected.numpy(), minlength=10))


def test_the_parity_check_sees_a_resized_denoiser(guided_models) -> None:
    """The same comparison with --denoiser-fit resize differs: the parity test can fail."""
    reference, _, denoiser_dir, weights = guided_models
    spec = ModelSpec(str(denoiser_dir), "timm", "test_vit", 10, classifier_weights=str(weights), denoiser_fit="resize")
    denoiser, _ = spec.load()
    noisy = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE) + 0.5 * torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        difference = denoiser(noisy, torch.full((2,), denoiser.timestep_for_sigma(0.5))) - published_denoise(
            reference, noisy, 0.5)
    assert difference.abs().max().item() > 1e-2


def test_spec_check_refuses_a_size_the_fit_cannot_handle_and_names_the_fit(guided_models) -> None:
    """In the driver, before any actor starts; the returned lines go to the report header."""
    _, _, denoiser_dir, weights = guided_models
    spec = ModelSpec(str(denoiser_dir), "timm", "test_vit", 10, classifier_weights=str(weights))
    assert spec.check((3, INPUT_SIZE, INPUT_SIZE)) == (
        "denoiser fit: pad (reflection-pad 24x24 to 32x32, center-crop x0 back)",
        "classifier interpolation: bicubic, antialiased, 24x24 -> 160x160",
    )
    with pytest.raises(UserError, match="larger than the denoiser's 32x32"):
        spec.check((3, 64, 64))
