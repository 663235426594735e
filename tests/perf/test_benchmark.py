"""The benchmark job and the pieces it measures: correctness only, never timings.

Models here are randomly initialised digits architectures (no cache, no training): counts need to
be deterministic and comparable, not accurate. The reference loop is checked against the fused step
with a hand-made classifier whose class distribution under noise is spread over several classes,
so that a wrong sigma or timestep in either path would show.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from pipeline.app.cli import run_main
from pipeline.perf.flops import flops_per_sample, peak_bf16_flops
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.perf.tuning import compile_predict
from pipeline.sampling.noise import Phase
from pipeline.perf.reference_loop import reference_counts

REPO = Path(__file__).resolve().parents[2]


class MeanIntensityClassifier(torch.nn.Module):
    """Class = the nearest of 10 evenly spaced levels to the image's mean intensity: a smooth,
    hand-checkable function, so the class distribution under noise is spread and stable."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.register_buffer("levels", torch.linspace(low, high, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.float().mean(dim=(1, 2, 3))
        return -(mean[:, None] - self.levels[None, :]) ** 2


@pytest.fixture(scope="module")
def denoiser():
    from pipeline.models.denoiser import denoiser_from_parts
    from pipeline.models.digits import new_digits_scheduler, new_digits_unet

    torch.manual_seed(0)
    return denoiser_from_parts(new_digits_unet().eval(), new_digits_scheduler())


def spread_classifier(denoiser, image: np.ndarray, sigma: float) -> MeanIntensityClassifier:
    """Levels from the 40 % to the 100 % quantile of the denoised mean intensity at this sigma: class 0
    collects about 40 % of the votes (a clear top class), the rest spread over the others."""
    noise = torch.randn((256, *image.shape), generator=torch.Generator().manual_seed(1))
    noisy = torch.as_tensor(image)[None] + sigma * noise
    step = torch.full((256,), denoiser.timestep_for_sigma(sigma))
    with torch.inference_mode():
        means = denoiser(noisy, step).mean(dim=(1, 2, 3))
    low, high = torch.quantile(means, torch.tensor([0.4, 1.0]))
    return MeanIntensityClassifier(float(low), float(high))


def test_benchmark_quick_writes_json_and_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "benchmark.py"), "--quick", "--skip-ray", "--threads", "1",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert {"machine", "settings", "fused_vs_reference", "early_exit", "flops", "ray", "adaptive"} <= set(report)
    assert len(report["machine"]["load_average_1_5_15_min"]) == 3
    versus = report["fused_vs_reference"]
    assert versus["samples"] == 2 * 3 * (16 + 64)  # --quick: 2 images × 3 digits scales × (n_select + n)
    assert versus["fused_speedup"] == pytest.approx(versus["reference_s"] / versus["fused_s"])  # one repeat
    assert versus["fused_top_class_agreement"] >= 0.0 and "tuned_speedup" not in versus  # no --compile
    early = report["early_exit"]
    assert early["same_certificates"] is True
    assert early["forward_passes_early_exit"] <= early["forward_passes_all_scales"]
    assert report["flops"]["flops_per_sample"] > 0 and report["flops"]["mfu"] is None  # CPU: no MFU
    assert report["ray"] == {"skipped": True}
    adaptive = report["adaptive"]
    for run in ("fixed", "adaptive"):  # --quick: 2 images, n_max 256; never more than every scale in full
        summary = adaptive[run]
        assert 0 < summary["forward_passes"] <= 2 * 3 * (16 + 256)
        by_scale = summary["forward_passes_per_image_by_scale"]
        assert len(by_scale) == 3 and sum(by_scale) == pytest.approx(summary["forward_passes"] / 2)
        # 1,000 ImageNet images at Carlini et al.'s 1.5 s per 32 forward passes on an A100
        assert summary["projected_a100_gpu_hours"] == pytest.approx(sum(by_scale) * 1000 * 1.5 / 32 / 3600)
    assert adaptive["fixed"]["forward_passes_per_image_by_scale"][0] == 16 + 256  # every image samples σ_1 in full
    assert set(adaptive["fixed"]["certified_accuracy"]) == {"0", "0.25", "0.5", "0.75", "1"}
    for run in (adaptive["adaptive"], *adaptive["target_radius"].values()):  # what limits each row
        assert run["fewest_forward_passes"]["forward_passes"] >= 2 * 16  # at least the selection samples
    table = (tmp_path / "benchmark.md").read_text()
    assert "fewest forward passes any valid sequential test" in table
    # the general mode is held to fixed n at the radii the report lists, not at every reported radius
    assert adaptive["general_mode_radii"] == ["0", "0.25", "0.5", "0.75"]
    assert "general adaptive: certified images at r=0.75 " in table
    assert "general adaptive: certified images at r=1 " not in table
    assert table.startswith("| measurement | measured | target |") and table in result.stdout


@pytest.mark.parametrize("arguments", [
    ["--preset", "imagenet"],
    ["--skip-throughput", "--adaptive-first-image", "400", "--adaptive-images", "51"],
], ids=["other preset", "adaptive images past the test set"])
def test_benchmark_rejects_bad_settings_before_any_section(arguments: list[str], tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_job", REPO / "jobs" / "benchmark.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *arguments, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(job.main)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and not (tmp_path / "benchmark.json").exists()
    if "--adaptive-first-image" in arguments:
        assert "450 digits test images" in error


def test_reference_loop_counts_follow_the_same_distribution(denoiser) -> None:
    """Same models, independent noise streams: the class distributions of the reference loop and
    the fused step at each scale are statistically indistinguishable (chi-square test) and agree
    on the top class; a sigma off by 2× (the [0,1] vs [-1,1] slip) is detected by the same test."""
    from pipeline.data.digits import load_digits_split

    image = load_digits_split().test_images[:1]
    sigmas = (0.5, 0.25)
    for scale, sigma in enumerate(sigmas):
        classifier = spread_classifier(denoiser, image[0], sigma)
        fused = FusedDenoiseClassify(denoiser, classifier, 10, device="cpu", batch_size=512)
        fused_counts = fused.count(image, [0], [sigma], {Phase.ESTIMATE: 1500}, seed=0)[Phase.ESTIMATE][0, 0]
        reference = reference_counts(denoiser, classifier, image, [sigma], 1, 1500, 512, 10, "cpu", seed=1)
        reference_counts_ = reference[Phase.ESTIMATE][0, 0]
        assert reference[Phase.SELECT].sum() == 1 and reference_counts_.sum() == 1500
        table = np.array([fused_counts, reference_counts_])
        table = table[:, table.sum(axis=0) > 0]
        assert chi2_contingency(table).pvalue > 1e-3, table
        assert fused_counts.argmax() == reference_counts_.argmax()
        doubled = reference_counts(denoiser, classifier, image, [2 * sigma], 1, 1500, 512, 10, "cpu", seed=1)
        wrong = np.array([fused_counts, doubled[Phase.ESTIMATE][0, 0]])
        assert chi2_contingency(wrong[:, wrong.sum(axis=0) > 0]).pvalue < 1e-6


def test_fused_counts_do_not_depend_on_batch_size(denoiser) -> None:
    from pipeline.models.digits import new_digits_classifier

    torch.manual_seed(1)
    classifier = new_digits_classifier().eval()
    images = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    samples = {Phase.SELECT: 10, Phase.ESTIMATE: 100}
    counts = [FusedDenoiseClassify(denoiser, classifier, 10, device="cpu", batch_size=size).count(
        images, [4, 5], [0.5, 0.25], samples, seed=2) for size in (1, 100, 1000)]
    for other in counts[1:]:
        for phase in samples:
            np.testing.assert_array_equal(other[phase], counts[0][phase])


def test_compiled_predict_pads_to_one_shape_and_keeps_counts(denoiser, monkeypatch) -> None:
    """The static-shape wrapper, with an identity in place of torch.compile (no tracing)."""
    from pipeline.models.digits import new_digits_classifier

    torch.manual_seed(1)
    classifier = new_digits_classifier().eval()
    images = np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32)
    samples = {Phase.SELECT: 10, Phase.ESTIMATE: 150}
    expected = FusedDenoiseClassify(denoiser, classifier, 10, device="cpu", batch_size=100).count(
        images, [0, 1], [0.5], samples, seed=0)
    shapes = []
    original = FusedDenoiseClassify.predict

    def recording_predict(self, noisy, timesteps):
        shapes.append(len(noisy))
        return original(self, noisy, timesteps)

    monkeypatch.setattr(FusedDenoiseClassify, "predict", recording_predict)
    wrapped = FusedDenoiseClassify(denoiser, classifier, 10, device="cpu", batch_size=100)
    compile_predict(wrapped, compiler=lambda function, **options: function)
    counts = wrapped.count(images, [0, 1], [0.5], samples, seed=0)
    assert set(shapes) == {100 + 63}  # batch_size + NOISE_CHUNK - 1, whatever each batch held
    for phase in samples:
        np.testing.assert_array_equal(counts[phase], expected[phase])


def test_flops_per_sample_counts_the_classifier_per_sample(denoiser) -> None:
    """Two linear classifiers differing by 10 output features differ by 2·256·10 FLOPs per sample."""

    def fused_with(outputs: int) -> FusedDenoiseClassify:
        classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, outputs))
        return FusedDenoiseClassify(denoiser, classifier, outputs, device="cpu")

    small, large = (flops_per_sample(fused_with(k), (1, 16, 16), 0.5, probe_batch=3) for k in (10, 20))
    assert large - small == pytest.approx(2 * 256 * 10)
    assert small > 2 * 256 * 10  # the UNet is counted too


def test_peak_table_and_override() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_bf16_flops("NVIDIA A10G") == 70e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Some Future GPU") is None
    assert peak_bf16_flops("NVIDIA L4", override_tflops=100.0) == 100e12


def test_finetune_memory_check_trains_only_the_adapters_on_its_cpu_path() -> None:
    """The ImageNet fine-tuning defaults' code path (LoRA, gradient checkpointing) on a tiny UNet; the
    memory figure itself needs a GPU (jobs/gpu_check.sh)."""
    from pipeline.perf.gpu_check import FinetuneMemorySettings, run_finetune_memory_check

    result = run_finetune_memory_check(FinetuneMemorySettings(tiny=True, batch_size=2, lora_rank=2, steps=2),
                                       torch.device("cpu"))
    assert result["peak_memory_gib"] is None and result["precision"] == "fp32"
    full = sum(p.numel() for p in gpu_check_tiny_unet().parameters())
    assert 0 < result["trainable_parameters"] < full / 10  # adapters only
    assert np.isfinite(result["loss"]) and result["seconds_per_step_after_first"] > 0


def gpu_check_tiny_unet() -> torch.nn.Module:
    from pipeline.perf.gpu_check import TINY_UNET, guided_denoiser

    return guided_denoiser(TINY_UNET, torch.device("cpu")).unet


def test_gpu_check_runs_its_cpu_path_with_a_tiny_unet() -> None:
    from pipeline.perf.gpu_check import GpuCheckSettings, run_gpu_check

    result = run_gpu_check(GpuCheckSettings(tiny=True, batch_size=64, timed_batches=1), torch.device("cpu"))
    assert result["samples"] >= 64 and result["samples_per_s"] > 0
    assert result["flops_per_sample"] > 0 and result["mfu"] is None
    assert result["achieved_flops_per_s"] == pytest.approx(result["flops_per_sample"] * result["samples_per_s"])
