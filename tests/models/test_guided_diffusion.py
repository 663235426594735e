"""Tests for the guided-diffusion → diffusers converter.

The acceptance check builds the ORIGINAL architecture here (written from its published description:
OpenAI guided-diffusion / improved-diffusion ``UNetModel``, keyed exactly like its state dicts), saves
random weights as a ``.pt``, converts them and compares the two networks' outputs.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from pipeline.errors import UserError
from pipeline.models.denoiser import denoiser_from_parts, load_denoiser
from pipeline.models.guided_diffusion import (
    UNET_ARCHITECTURES,
    GuidedDiffusionConfig,
    convert_guided_diffusion,
    make_scheduler,
    network_timestep_scale,
    save_converted,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4




# ---------------------------------------------------------------------------------------------
# Reference: the original UNet, from its description (not from the diffusers code under test).
# ---------------------------------------------------------------------------------------------


def sinusoid(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Original timestep embedding: [cos(t·f_i), sin(t·f_i)] with f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RefResBlock(nn.Module):
    """GroupNorm32-SiLU-conv, timestep injection (added, or FiLM scale/shift), GroupNorm-SiLU-dropout-conv, skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool, resample: str = ""):
        super().__init__()
        self.scale_shift = scale_shift
        self.resample = resample  # "", "up" (nearest ×2) or "down" (2×2 average), applied to both paths
        self.in_layers = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self._resample(self.in_layers[:2](x))
        x = self._resample(x)
        h = self.in_layers[2](h)
        film = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = film.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + film)
        return self.skip_connection(x) + h


class RefAttention(nn.Module):
    """Self-attention over pixels with a 1×1-conv qkv; legacy order splits heads before q/k/v."""

    def __init__(self, channels: int, num_heads: int, legacy_order: bool):
        super().__init__()
        self.num_heads = num_heads
        self.legacy_order = legacy_order
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        flat = x.reshape(batch, channels, height * width)
        qkv = self.qkv(self.norm(flat))
        head_dim = channels // self.num_heads
        if self.legacy_order:  # rows: head 0 [q k v], head 1 [q k v], ...
            q, k, v = qkv.reshape(batch * self.num_heads, 3 * head_dim, -1).split(head_dim, dim=1)
        else:  # rows: [q of all heads], [k of all heads], [v of all heads]
            q, k, v = (part.reshape(batch * self.num_heads, head_dim, -1) for part in qkv.chunk(3, dim=1))
        weights = torch.softmax(torch.einsum("bdt,bds->bts", q, k) / math.sqrt(head_dim), dim=-1)
        attended = torch.einsum("bts,bds->bdt", weights, v).reshape(batch, channels, -1)
        return (flat + self.proj_out(attended)).reshape(batch, channels, height, width)


class RefDownsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class RefUpsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class RefStep(nn.Sequential):
    """One entry of input_blocks / output_blocks: children numbered 0, 1, 2 like the original."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x) if isinstance(layer, nn.Conv2d) else layer(x, emb)
        return x


class RefUNet(nn.Module):
    """input_blocks (conv, then per level: res blocks [+attention], resampler), middle_block, output_blocks, out."""

    def __init__(
        self,
        *,
        in_channels: int = 3,
        model_channels: int = 32,
        out_channels: int = 6,
        num_res_blocks: int = 1,
        channel_mult: tuple[int, ...] = (1, 2),
        attention_ds: tuple[int, ...] = (2,),
        num_heads: int = 1,
        num_head_channels: int = -1,
        legacy_order: bool = True,
        scale_shift: bool = True,
        resblock_updown: bool = True,
    ):
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels

        def attention(channels: int) -> RefAttention:
            heads = num_heads if num_head_channels == -1 else channels // num_head_channels
            return RefAttention(channels, heads, legacy_order)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        ch = model_channels
        skip_channels = [ch]
        self.input_blocks = nn.ModuleList([RefStep(nn.Conv2d(in_channels, ch, 3, padding=1))])
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [RefResBlock(ch, emb, mult * model_channels, scale_shift)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(RefStep(*layers))
                skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                down = RefResBlock(ch, emb, ch, scale_shift, "down") if resblock_updown else RefDownsample(ch)
                self.input_blocks.append(RefStep(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = RefStep(
            RefResBlock(ch, emb, ch, scale_shift), attention(ch), RefResBlock(ch, emb, ch, scale_shift)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [RefResBlock(ch + skip_channels.pop(), emb, mult * model_channels, scale_shift)]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(attention(ch))
                if level > 0 and i == num_res_blocks:
                    layers.append(RefResBlock(ch, emb, ch, scale_shift, "up") if resblock_updown else RefUpsample(ch))
                    ds //= 2
                self.output_blocks.append(RefStep(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(sinusoid(timesteps, self.model_channels))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def random_reference(seed: int = 0, **arch) -> RefUNet:
    """Reference UNet with every tensor random (the original zero-inits some; zeros would hide mistakes)."""
    torch.manual_seed(seed)
    model = RefUNet(**arch)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
            elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear):
                module.weight.copy_(torch.randn_like(module.weight) / math.sqrt(module.weight[0].numel()))
                module.bias.copy_(0.2 * torch.randn_like(module.bias))
    return model.eval()


def save_reference(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def max_abs_difference(reference: RefUNet, unet: UNet2DModel, image_size: int, in_channels: int = 3) -> float:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, in_channels, image_size, image_size, generator=generator)
    timesteps = torch.tensor([0, 17, 500, 999])
    with torch.no_grad():
        expected = reference(x, timesteps)
        actual = unet(x, timesteps).sample
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


# (reference architecture, converter flags) pairs: 32 base channels, images of 16 (8 for one level).
CASES = {
    "imagenet-like: resblock up/down, scale-shift, num_head_channels, 6 outputs": (
        dict(num_res_blocks=2, channel_mult=(1, 2), attention_ds=(2,), num_head_channels=16),
        GuidedDiffusionConfig(image_size=16, num_head_channels=16, attention_resolutions=(8,), resblock_updown=True),
    ),
    "improved-like: conv up/down, num_heads": (
        dict(num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,), num_heads=2, resblock_updown=False),
        GuidedDiffusionConfig(image_size=16, num_heads=2, resblock_updown=False, learn_sigma=True),
    ),
    "3 levels, new attention order, no scale-shift, 3 outputs": (
        dict(num_res_blocks=1, channel_mult=(1, 1, 2), attention_ds=(1, 4), num_head_channels=16,
             legacy_order=False, scale_shift=False, out_channels=3),
        GuidedDiffusionConfig(image_size=16, num_head_channels=16, use_new_attention_order=True,
                              use_scale_shift_norm=False, learn_sigma=False, channel_mult=(1, 1, 2)),
    ),
    "one level, 1 input channel, no attention outside the middle": (
        dict(in_channels=1, out_channels=2, num_res_blocks=2, channel_mult=(1,), attention_ds=(), num_heads=4),
        GuidedDiffusionConfig(image_size=8, num_heads=4),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_unet_matches_the_original_architecture(tmp_path: Path, case: str) -> None:
    arch, config = CASES[case]
    reference = random_reference(**arch)
    unet = convert_guided_diffusion(save_reference(reference, tmp_path / "model.pt"), config).unet
    in_channels = arch.get("in_channels", 3)
    assert max_abs_difference(reference, unet, config.image_size, in_channels) <= TOLERANCE


def test_saved_directory_reloads_with_diffusers(tmp_path: Path) -> None:
    arch, config = CASES["imagenet-like: resblock up/down, scale-shift, num_head_channels, 6 outputs"]
    reference = random_reference(seed=3, **arch)
    converted = convert_guided_diffusion(save_reference(reference, tmp_path / "model.pt"), config)
    written = save_converted(converted, tmp_path / "out")
    expected_files = {"config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"}
    assert {Path(path).name for path in written} == expected_files
    assert all(Path(path).is_file() for path in written)

    reloaded = UNet2DModel.from_pretrained(tmp_path / "out").eval()
    reloaded_scheduler = DDPMScheduler.from_pretrained(tmp_path / "out")
    assert max_abs_difference(reference, reloaded, 16) <= TOLERANCE
    assert reloaded.config.out_channels == 6
    assert reloaded_scheduler.config.variance_type == "learned_range"
    assert reloaded_scheduler.config.prediction_type == "epsilon"
    assert reloaded_scheduler.config.num_train_timesteps == 1000


def test_the_comparison_detects_a_wrong_head_split(tmp_path: Path) -> None:
    """Converting a legacy-order checkpoint as new-order must change the output: the check can fail."""
    arch, config = CASES["imagenet-like: resblock up/down, scale-shift, num_head_channels, 6 outputs"]
    reference = random_reference(**arch)
    path = save_reference(reference, tmp_path / "model.pt")
    wrong = convert_guided_diffusion(path, replace(config, use_new_attention_order=True)).unet
    assert max_abs_difference(reference, wrong, 16) > 1e-3
    fewer_heads = convert_guided_diffusion(path, replace(config, num_head_channels=32)).unet
    assert max_abs_difference(reference, fewer_heads, 16) > 1e-3


# ---------------------------------------------------------------------------------------------
# Schedules: guided-diffusion's formulas, computed independently here.
# ---------------------------------------------------------------------------------------------


def original_alphas_cumprod(schedule: str, steps: int) -> np.ndarray:
    if schedule == "linear":
        betas = np.linspace(0.0001 * 1000 / steps, 0.02 * 1000 / steps, steps)
    else:
        f = [math.cos((i / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(steps + 1)]
        betas = np.minimum(1 - np.array(f[1:]) / np.array(f[:-1]), 0.999)
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("schedule, steps", [("linear", 1000), ("linear", 4000), ("cosine", 1000), ("cosine", 4000)])
def test_scheduler_reproduces_the_original_schedule(schedule: str, steps: int) -> None:
    scheduler = make_scheduler(GuidedDiffusionConfig(noise_schedule=schedule, diffusion_steps=steps), learn_sigma=True)
    assert scheduler.config.num_train_timesteps == steps
    expected = original_alphas_cumprod(schedule, steps)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), expected, rtol=2e-5, atol=1e-7)
    assert scheduler.config.variance_type == "learned_range"


def test_rescaled_models_keep_their_whole_schedule_and_a_timestep_scale() -> None:
    """improved-diffusion feeds the network t·1000/T: all T steps stay (t* is searched on them) and the
    network's input is scaled instead; guided-diffusion's ImageNet model sees t itself."""
    config = UNET_ARCHITECTURES["cifar10-improved"]
    assert make_scheduler(config, learn_sigma=True).config.num_train_timesteps == 4000
    assert network_timestep_scale(config) == 0.25
    assert network_timestep_scale(replace(config, diffusion_steps=1500)) == pytest.approx(1000 / 1500)
    assert network_timestep_scale(UNET_ARCHITECTURES["imagenet256-uncond"]) == 1.0


def published_timestep(sqrt_alphas_cumprod: np.ndarray, sigma: float) -> int:
    """t* as the published code searches it (Carlini et al.: the first t >= 1 with sqrt(1-ᾱ)/sqrt(ᾱ) >= 2σ)."""
    t = 0
    noise_level = 0.0
    while noise_level < 2 * sigma:
        t += 1
        noise_level = math.sqrt(1 - sqrt_alphas_cumprod[t] ** 2) / sqrt_alphas_cumprod[t]
    return t


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_for_sigma_on_the_4000_step_cosine_schedule(sigma: float) -> None:
    """t*(σ) of the converted CIFAR-10 schedule equals a direct float64 computation on improved-diffusion's
    cosine schedule, and the published search loop (which uses sqrt(1-ᾱ)/sqrt(ᾱ) instead)."""
    scheduler = make_scheduler(UNET_ARCHITECTURES["cifar10-improved"], learn_sigma=True)
    denoiser = denoiser_from_parts(UNet2DModel(**TINY_DIFFUSERS_UNET), scheduler)
    sqrt_alphas_cumprod = np.sqrt(original_alphas_cumprod("cosine", 4000))
    direct = int(np.flatnonzero(sqrt_alphas_cumprod <= 1 / math.sqrt(1 + (2 * sigma) ** 2))[0])
    assert denoiser.timestep_for_sigma(sigma) == direct == published_timestep(sqrt_alphas_cumprod, sigma)


TINY_DIFFUSERS_UNET = dict(sample_size=32, block_out_channels=(32, 64), norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
# cifar10_uncond_50M_500K.pt's layout (32x32, num_res_blocks 3, channel_mult 1,2,2,2, attention at 16 and 8,
# 4 heads, conv up/down, learned sigma) at 32 instead of 128 base channels.
CIFAR10_LAYOUT = dict(model_channels=32, num_res_blocks=3, channel_mult=(1, 2, 2, 2), attention_ds=(2, 4),
                      num_heads=4, resblock_updown=False)


def published_one_shot(reference: RefUNet, alphas_cumprod: np.ndarray, noisy: torch.Tensor, t: int) -> torch.Tensor:
    """improved-diffusion's one-shot x̂₀ (rescale_timesteps, learned sigma), from its description: the network
    sees t·1000/T, ε is its first 3 channels, x̂₀ = x_t/sqrt(ᾱ) - sqrt(1/ᾱ - 1)·ε, clipped; back to [0, 1]."""
    alpha_bar = float(alphas_cumprod[t])
    x_t = math.sqrt(alpha_bar) * (2 * noisy - 1)
    steps = torch.full((len(noisy),), t * 1000.0 / len(alphas_cumprod))
    epsilon = reference(x_t, steps)[:, :3]
    x0 = x_t / math.sqrt(alpha_bar) - math.sqrt(1 / alpha_bar - 1) * epsilon
    return (x0.clamp(-1, 1) + 1) / 2


def test_converted_cifar10_checkpoint_denoises_like_improved_diffusion(tmp_path: Path) -> None:
    """The converter's CIFAR-10 path end to end: the improved-diffusion layout with random weights is
    converted with the cifar10-improved preset, saved, reloaded, and its one-shot x̂₀ at t*(σ) on the
    4,000-step schedule matches the original network fed t·1000/4000 (fp32, 1e-4)."""
    reference = random_reference(seed=5, **CIFAR10_LAYOUT)
    config = replace(UNET_ARCHITECTURES["cifar10-improved"], num_channels=32)
    written = save_converted(convert_guided_diffusion(save_reference(reference, tmp_path / "model.pt"), config),
                             tmp_path / "out")
    assert str(tmp_path / "out" / "timestep_scale.json") in written
    denoiser = load_denoiser(tmp_path / "out")
    alphas_cumprod = original_alphas_cumprod("cosine", 4000)
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        for sigma in (0.25, 0.5, 1.0):
            noisy = images + sigma * torch.randn(images.shape, generator=generator)
            t = denoiser.timestep_for_sigma(sigma)
            expected = published_one_shot(reference, alphas_cumprod, noisy, t)
            actual = denoiser(noisy, torch.full((4,), t))
            assert (actual - expected).abs().max().item() <= TOLERANCE

        (tmp_path / "out" / "timestep_scale.json").unlink()  # the network would see t instead of t/4
        unscaled = load_denoiser(tmp_path / "out")(noisy, torch.full((4,), t))
    assert (unscaled - expected).abs().max().item() > 1e-3


def test_linear_schedule_without_variance_learning_uses_fixed_variance() -> None:
    scheduler = make_scheduler(GuidedDiffusionConfig(), learn_sigma=False)
    assert scheduler.config.variance_type == "fixed_large"
    assert scheduler.betas[0].item() == pytest.approx(1e-4) and scheduler.betas[-1].item() == pytest.approx(0.02)


# ---------------------------------------------------------------------------------------------
# Presets at full size (meta tensors: shapes only, no memory) and bad input.
# ---------------------------------------------------------------------------------------------


PRESET_ARCHITECTURES = {
    "imagenet256-uncond": dict(model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                               attention_ds=(8, 16, 32), num_head_channels=64, resblock_updown=True),
    "cifar10-improved": dict(model_channels=128, num_res_blocks=3, channel_mult=(1, 2, 2, 2),
                             attention_ds=(2, 4), num_heads=4, resblock_updown=False),
}


@pytest.mark.parametrize("preset", list(UNET_ARCHITECTURES))
def test_presets_fit_full_size_checkpoints(preset: str) -> None:
    with torch.device("meta"):
        reference = RefUNet(**PRESET_ARCHITECTURES[preset])
    converted = convert_guided_diffusion(reference.state_dict(), UNET_ARCHITECTURES[preset])
    unet, scheduler = converted.unet, converted.scheduler
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in reference.parameters())
    assert unet.config.out_channels == 6 and unet.config.sample_size == UNET_ARCHITECTURES[preset].image_size
    assert unet.config.attention_head_dim == 64
    assert scheduler.config.variance_type == "learned_range"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GuidedDiffusionConfig]:
    arch, config = CASES["imagenet-like: resblock up/down, scale-shift, num_head_channels, 6 outputs"]
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_reference(random_reference(**arch), path), config


def test_missing_and_corrupt_files_are_user_errors(tmp_path: Path) -> None:
    config = GuidedDiffusionConfig(image_size=16)
    with pytest.raises(UserError, match="not found"):
        convert_guided_diffusion(tmp_path / "absent.pt", config)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match="cannot read"):
        convert_guided_diffusion(corrupt, config)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:700])
    with pytest.raises(UserError, match="cannot read"):
        convert_guided_diffusion(truncated, config)
    not_tensors = tmp_path / "list.pt"
    torch.save([torch.ones(2)], not_tensors)
    with pytest.raises(UserError, match="not a state dict"):
        convert_guided_diffusion(not_tensors, config)
    other_model = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), other_model)
    with pytest.raises(UserError, match="time_embed"):
        convert_guided_diffusion(other_model, config)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(num_res_blocks=3), "--num-res-blocks is 3 but the checkpoint has 2"),
        (dict(num_channels=64), "--num-channels"),
        (dict(channel_mult=(1, 2, 2)), "--channel-mult"),
        (dict(image_size=32), "--channel-mult is 1,2,2,2 .*default"),
        (dict(attention_resolutions=(16,)), "--attention-resolutions"),
        (dict(learn_sigma=False), "--learn-sigma"),
        (dict(use_scale_shift_norm=False), "--use-scale-shift-norm"),
        (dict(resblock_updown=False), "--resblock-updown"),
        (dict(num_head_channels=24), "does not divide"),
        (dict(image_size=None), "--image-size is required"),
        (dict(noise_schedule="sqrt"), "linear or cosine"),
    ],
)
def test_wrong_architecture_flags_are_user_errors(tiny_checkpoint, override: dict, message: str) -> None:
    path, config = tiny_checkpoint
    with pytest.raises(UserError, match=message):
        convert_guided_diffusion(path, replace(config, **override))


def test_state_dict_that_does_not_fit_is_a_user_error(tiny_checkpoint) -> None:
    path, config = tiny_checkpoint
    state = torch.load(path, weights_only=True)
    with pytest.raises(UserError, match="does not use"):
        convert_guided_diffusion({**state, "input_blocks.1.0.extra.weight": torch.ones(3)}, config)
    with pytest.raises(UserError, match="shape"):
        convert_guided_diffusion({**state, "middle_block.1.qkv.bias": torch.ones(5)}, config)
    with pytest.raises(UserError, match="class-conditional"):
        convert_guided_diffusion({**state, "label_emb.weight": torch.ones(10, 128)}, config)
    without = {key: value for key, value in state.items() if key != "output_blocks.1.0.skip_connection.bias"}
    with pytest.raises(UserError, match="no tensor output_blocks.1.0.skip_connection.bias"):
        convert_guided_diffusion(without, config)


def test_num_heads_with_unequal_head_widths_is_refused(tmp_path: Path) -> None:
    """num_heads=2 over 32- and 64-channel attention gives head widths 16 and 32: not one attention_head_dim."""
    reference = random_reference(num_res_blocks=1, channel_mult=(1, 2), attention_ds=(1,), num_heads=2)
    with pytest.raises(UserError, match="single attention_head_dim"):
        convert_guided_diffusion(reference.state_dict(), GuidedDiffusionConfig(image_size=16, num_heads=2))


# ---------------------------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------------------------


def load_job():
    job_path = REPO_ROOT / "jobs" / "convert_guided_diffusion.py"
    spec = importlib.util.spec_from_file_location("convert_guided_diffusion", job_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_converts_and_refuses_a_non_empty_directory(tiny_checkpoint, tmp_path: Path, capsys) -> None:
    path, _ = tiny_checkpoint
    job = load_job()
    out_dir = tmp_path / "converted"
    flags = ["--image-size", "16", "--num_head_channels", "16", "--attention-resolutions", "8", "--learn_sigma", "True"]
    assert job.main([str(path), str(out_dir), *flags]) == 0
    printed = capsys.readouterr().out
    assert "diffusion_pytorch_model.safetensors" in printed and "scheduler_config.json" in printed
    assert UNet2DModel.load_config(out_dir)["attention_head_dim"] == 16

    assert job.main([str(path), str(out_dir), *flags]) == 2
    error = capsys.readouterr().err
    assert "not empty" in error and error.count("\n") == 1
    assert job.main([str(path), str(out_dir), *flags, "--overwrite"]) == 0


def test_job_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    job = load_job()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert job.main([str(corrupt), str(tmp_path / "out"), "--preset", "cifar10-improved"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot read") and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_job_help_names_presets_and_sources(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_job().main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "imagenet256-uncond" in text and "cifar10-improved" in text and "openai/guided-diffusion" in text
