"""The fused denoise-classify step: t* rule, noise addressing, and batch-size-independent counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.errors import UserError
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.models.denoiser import OneShotDenoiser, denoiser_from_parts
from pipeline.models.digits import new_digits_unet
from pipeline.sampling.noise import NOISE_CHUNK, Phase, chunk_lengths, chunk_noise, chunk_seed


class MeanThreshold(torch.nn.Module):
    """A classifier with a known answer: class = bucket of the mean pixel value (10 buckets)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3))
        centres = torch.linspace(0.05, 0.95, 10)
        return -(mean[:, None] - centres[None, :]).abs()


class Identity(torch.nn.Module):
    def forward(self, x, t):
        class Out:
            sample = x * 0  # ε̂ = 0 → x̂₀ = x_t / sqrt(ᾱ)

        return Out()


@pytest.fixture(scope="module")
def tiny_denoiser() -> OneShotDenoiser:
    torch.manual_seed(0)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    return denoiser_from_parts(new_digits_unet().eval(), scheduler)


def test_timestep_is_first_step_below_the_noise_level(tiny_denoiser):
    sqrt_alpha_bar = tiny_denoiser.alphas_cumprod.sqrt().numpy()
    for sigma in (0.1, 0.25, 0.5, 1.0):
        t = tiny_denoiser.timestep_for_sigma(sigma)
        target = 1 / math.sqrt(1 + (2 * sigma) ** 2)
        assert sqrt_alpha_bar[t] <= target
        assert t == 0 or sqrt_alpha_bar[t - 1] > target


def test_sigma_beyond_schedule_is_a_user_error(tiny_denoiser):
    with pytest.raises(UserError, match="noisier than the last step"):
        tiny_denoiser.timestep_for_sigma(1000.0)


def test_zero_epsilon_model_inverts_the_scaling_exactly():
    """With ε̂ = 0 the one-shot estimate is x' itself: denoise(x) = x (inside [0,1])."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = new_digits_unet()
    denoiser = OneShotDenoiser(unet, scheduler.alphas_cumprod, "epsilon")
    denoiser.unet = Identity()
    x = torch.rand(4, 1, 16, 16)
    t = torch.full((4,), denoiser.timestep_for_sigma(0.5))
    torch.testing.assert_close(denoiser(x, t), x, atol=1e-6, rtol=0)


def test_chunk_noise_depends_only_on_its_address():
    device = torch.device("cpu")
    a = chunk_noise((1, 4, 4), 7, 0, 3, 0.5, Phase.ESTIMATE, 2, device)
    b = chunk_noise((1, 4, 4), 7, 0, 3, 0.5, Phase.ESTIMATE, 2, device)
    assert torch.equal(a, b)
    for other in [(1, 3, 0.5, Phase.ESTIMATE, 2), (0, 4, 0.5, Phase.ESTIMATE, 2), (0, 3, 0.25, Phase.ESTIMATE, 2),
                  (0, 3, 0.5, Phase.SELECT, 2), (0, 3, 0.5, Phase.ESTIMATE, 3)]:
        assert not torch.equal(a, chunk_noise((1, 4, 4), 7, *other, device))
    assert chunk_seed(0, 1, 0.5, Phase.SELECT, 0) == chunk_seed(0, 1, 0.50, Phase.SELECT, 0)


def test_chunk_lengths_cover_the_samples():
    assert chunk_lengths(0) == []
    assert chunk_lengths(NOISE_CHUNK) == [NOISE_CHUNK]
    assert sum(chunk_lengths(1000)) == 1000 and max(chunk_lengths(1000)) == NOISE_CHUNK


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_counts_do_not_depend_on_batch_size_or_subset(tiny_denoiser, precision):
    """fp32 votes do not depend on the batch size; bf16 votes only on the batch size, never on which
    other samples share the forward (so bf16 compares packings at one batch size)."""
    images = torch.rand(5, 1, 16, 16).numpy()
    ids = [10, 11, 12, 13, 14]
    samples = {Phase.SELECT: 30, Phase.ESTIMATE: 150}
    small = FusedDenoiseClassify(tiny_denoiser, MeanThreshold(), 10, "cpu", batch_size=50, precision=precision)
    big = small if precision == "bf16" else FusedDenoiseClassify(tiny_denoiser, MeanThreshold(), 10, "cpu",
                                                                 batch_size=4096, precision=precision)
    full = big.count(images, ids, [1.0, 0.25], samples, seed=3)
    part = small.count(images[2:4], ids[2:4], [1.0, 0.25], samples, seed=3)
    for phase, n in samples.items():
        assert full[phase].shape == (5, 2, 10)
        assert (full[phase].sum(-1) == n).all()
        np.testing.assert_array_equal(full[phase][2:4], part[phase])
    one_scale = small.count(images, ids, [0.25], samples, seed=3)
    np.testing.assert_array_equal(one_scale[Phase.ESTIMATE][:, 0], full[Phase.ESTIMATE][:, 1])
    other_seed = big.count(images, ids, [1.0, 0.25], samples, seed=4)
    assert not np.array_equal(other_seed[Phase.ESTIMATE], full[Phase.ESTIMATE])


@pytest.mark.parametrize("precision, padded", [("bf16", True), ("fp32", False)])
def test_bf16_forwards_all_have_the_batch_size_and_padding_casts_no_vote(tiny_denoiser, precision, padded):
    """Reduced-precision kernels depend on the input's shape, so bf16 pads the last forward of a call
    to `batch_size` rows and drops the padding's votes; fp32 (row-independent) runs it short."""
    rows = []
    classifier = MeanThreshold()
    hook = classifier.register_forward_pre_hook(lambda _, inputs: rows.append(len(inputs[0])))
    fused = FusedDenoiseClassify(tiny_denoiser, classifier, 10, "cpu", batch_size=100, precision=precision)
    counts = fused.count(torch.rand(3, 1, 16, 16).numpy(), [0, 1, 2], [0.5], {Phase.ESTIMATE: 70}, seed=0)
    hook.remove()
    assert rows == ([100, 100, 100] if padded else [100, 100, 10])  # 210 samples cut at 100, chunks split
    assert (counts[Phase.ESTIMATE].sum(-1) == 70).all()


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), (None, torch.float32)])
def test_precision_is_the_arithmetic_both_networks_run_in(tiny_denoiser, precision, dtype):
    """bf16 reaches the UNet's convolutions and the classifier; None is exact fp32 on CPU."""
    seen = []
    classifier = torch.nn.Sequential(torch.nn.Conv2d(1, 10, 16), torch.nn.Flatten())
    fused = FusedDenoiseClassify(tiny_denoiser, classifier, 10, "cpu", batch_size=64, precision=precision)
    hooks = [module.register_forward_hook(lambda _, __, output: seen.append(output.dtype))
             for module in (fused.denoiser.unet.conv_in, classifier[0])]
    fused.count(torch.rand(1, 1, 16, 16).numpy(), [0], [0.5], {Phase.ESTIMATE: 64}, seed=0)
    for hook in hooks:
        hook.remove()
    assert seen == [dtype, dtype]


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_with_native_bf16(monkeypatch):
    from pipeline.models import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert [precision.resolve_precision(p, gpu=False) for p in ("auto", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]
    assert precision.resolve_precision("auto", gpu=True) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto", gpu=False) == "bf16"
    with pytest.raises(UserError, match="unknown precision"):
        precision.resolve_precision("fp16", gpu=False)


def test_counts_match_a_per_sample_loop(tiny_denoiser):
    """Independent recomputation: draw each chunk's noise, denoise and classify one sample at a time."""
    images = torch.rand(2, 1, 16, 16)
    fused = FusedDenoiseClassify(tiny_denoiser, MeanThreshold(), 10, "cpu", batch_size=64)
    counts = fused.count(images.numpy(), [0, 1], [0.5], {Phase.ESTIMATE: 70}, seed=1)[Phase.ESTIMATE]
    expected = np.zeros((2, 10), dtype=np.int64)
    t = torch.tensor([tiny_denoiser.timestep_for_sigma(0.5)])
    with torch.inference_mode():
        for row in range(2):
            for chunk, length in enumerate(chunk_lengths(70)):
                noise = chunk_noise((1, 16, 16), length, 1, row, 0.5, Phase.ESTIMATE, chunk, torch.device("cpu"))
                for sample in noise:
                    x = images[row:row + 1] + 0.5 * sample[None]
                    expected[row, int(MeanThreshold()(tiny_denoiser(x, t)).argmax())] += 1
    np.testing.assert_array_equal(counts[:, 0], expected)


def test_wrong_image_shapes_are_user_errors(tiny_denoiser):
    fused = FusedDenoiseClassify(tiny_denoiser, MeanThreshold(), 10, "cpu")
    with pytest.raises(UserError, match="channels"):
        fused.count(np.zeros((1, 3, 16, 16), np.float32), [0], [0.5], {Phase.ESTIMATE: 4}, 0)
    with pytest.raises(UserError, match=r"\(N, C, H, W\)"):
        fused.count(np.zeros((16, 16), np.float32), [0], [0.5], {Phase.ESTIMATE: 4}, 0)
