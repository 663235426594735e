"""The ImageNet and CIFAR-10 jobs end to end on tiny models of the real architectures (issue 6).

Everything is built here with random weights: an OpenAI guided-diffusion UNet checkpoint (the
original layout, 32 base channels) converted by jobs/convert_guided_diffusion.py, timm's tiny ViT
`test_vit` (BEiT's family) with ImageNet's 1000 classes saved as safetensors, a diffusers
UNet2DModel + DDPMScheduler, a TorchScript classifier, a class-folder tree of odd-sized JPEGs and a
cifar-10-batches-py folder. The jobs run as subprocesses (the real entry points), joined to the
session's Ray instance through RAY_ADDRESS as `ray job submit` runs them, sparing Ray's start-up.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy.stats import norm
from torch import nn
from torchvision import transforms

from pipeline.store.counts import counts_to_arrays, read_counts
from pipeline.errors import UserError
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.models.precision import resolve_precision
from pipeline.models.spec import ModelSpec
from pipeline.sampling.noise import Phase
from pipeline.store.results import RESULTS_SCHEMA
from tests.conftest import REPO_ROOT
from tests.models.test_classifiers import save_tiny_vit
from tests.models.test_guided_diffusion import random_reference, save_reference

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")]

CLASS_FOLDERS = ("n03", "n01", "n02")  # created out of sorted order: labels follow the sorted names
JPEG_SIZES = ((301, 257), (260, 333))  # (width, height), neither 256 nor 224 on any side
JOB_BATCH = 64  # samples per forward of the jobs below; the direct checks use it too (bf16 votes depend on it)
SMALL_RUN = ["--num-images", "4", "--skip", "1", "--n", "16", "--n-select", "8", "--batch-size", str(JOB_BATCH)]
CIFAR_LABELS = [3, 1, 3, 0, 3, 2]
FAVOURED_CLASS = 3
JOB_PRECISION = resolve_precision("auto", gpu=False)  # what the CPU jobs run in: the direct checks mirror it


def run_job(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def succeeded(result: subprocess.CompletedProcess) -> bool:
    """True on exit code 0; otherwise print the job's stderr tail so the failure explains itself."""
    if result.returncode != 0:
        print(result.stderr[-4000:])
    return result.returncode == 0


@pytest.fixture(scope="module")
def job_env(ray_session) -> dict[str, str]:
    """Subprocess environment that joins the session's Ray (with its auth mode) on one thread."""
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, OMP_NUM_THREADS="1")
    env.pop("MDDS_INJECT_ACTOR_FAILURE", None)
    return env


def make_imagenet_tree(root: Path) -> Path:
    """root/<class>/*.JPEG: 3 class folders × 2 random JPEGs of odd sizes."""
    rng = np.random.default_rng(0)
    for name in CLASS_FOLDERS:
        (root / name).mkdir(parents=True)
        for index, (width, height) in enumerate(JPEG_SIZES):
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"ILSVRC2012_val_{index}.JPEG", quality=90)
    return root


def make_diffusers_denoiser(folder: Path) -> Path:
    """A tiny CIFAR-10-shaped DDPM: UNet2DModel (3 channels, 32×32) and DDPMScheduler in one folder."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


class FavoursOneClass(nn.Module):
    """A small conv net on [0,1] images whose bias makes one class win on every input."""

    def __init__(self, num_classes: int, favoured: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[favoured] = 100.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def save_torchscript(path: Path, num_classes: int) -> Path:
    torch.manual_seed(0)
    torch.jit.trace(FavoursOneClass(num_classes, FAVOURED_CLASS).eval(), torch.rand(2, 3, 32, 32)).save(str(path))
    return path


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet") / "val")


@pytest.fixture(scope="module")
def guided_denoiser(tmp_path_factory, job_env) -> Path:
    """A guided-diffusion-layout checkpoint (learned sigma, scale-shift, resblock up/down, attention at 16)
    converted to a diffusers directory by the real converter job."""
    folder = tmp_path_factory.mktemp("guided")
    checkpoint = save_reference(
        random_reference(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,),
                         num_head_channels=16),
        folder / "tiny_diffusion_uncond.pt",
    )
    flags = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "16", "--num_head_channels", "16", "--learn_sigma", "True",
             "--use_scale_shift_norm", "True", "--resblock_updown", "True", "--diffusion_steps", "1000",
             "--noise_schedule", "linear"]
    result = run_job("convert_guided_diffusion.py", str(checkpoint), str(folder / "denoiser"), *flags, env=job_env)
    assert succeeded(result)
    return folder / "denoiser"


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "test_vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=1000).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    """The python-pickle layout: test_batch {b'data': uint8 (N, 3072), b'labels'} and batches.meta."""
    folder = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.default_rng(1).integers(0, 256, size=(len(CIFAR_LABELS), 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": data, b"labels": CIFAR_LABELS, b"batch_label": b"testing batch 1 of 1"}, handle)
    names = [name.encode() for name in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                         "ship", "truck")]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": len(CIFAR_LABELS)}, handle)
    return folder


@pytest.fixture(scope="module")
def diffusers_denoiser(tmp_path_factory) -> Path:
    return make_diffusers_denoiser(tmp_path_factory.mktemp("ddpm"))


def check_results(out: Path, image_ids: list[int], labels: list[int]):
    """results.parquet has the contract's schema and one row per selected image; returns it."""
    results = pq.read_table(out / "results.parquet")
    assert results.schema == RESULTS_SCHEMA
    table = results.sort_by("image_id").to_pydict()
    assert table["image_id"] == image_ids
    assert table["label"] == labels
    assert table["correct"] == [p == y for p, y in zip(table["prediction"], table["label"], strict=True)]
    assert (out / "report.md").is_file() and (out / "certified_accuracy.png").is_file()
    return table


def test_imagenet_job_with_converted_guided_diffusion_and_timm(
    job_env, imagenet_tree, guided_denoiser, timm_weights, tmp_path
):
    out = tmp_path / "out"
    # --denoiser-fit resize keeps the 32x32 UNet at 32 (cheap on a CPU); pad and native are checked
    # against the published path in tests/models/test_denoiser_fit.py.
    result = run_job("certify.py", "--preset", "imagenet", "--data", str(imagenet_tree),
                     "--denoiser", str(guided_denoiser), "--classifier", "test_vit",
                     "--classifier-weights", str(timm_weights), "--denoiser-fit", "resize", *SMALL_RUN,
                     "--out", str(out), env=job_env)
    assert succeeded(result)
    # image ids follow ImageFolder order: sorted class folders (n01, n02, n03), then file names
    check_results(out, image_ids=[0, 1, 2, 3], labels=[0, 0, 1, 1])
    report = (out / "report.md").read_text()
    for line in ("- preprocessing: resize256-crop224 (pil-bilinear; Cohen et al., Carlini et al.)",
                 "- denoiser fit: resize (bilinear 224x224 -> 32x32 and back; changes the noise statistics)",
                 "- classifier interpolation: bicubic, antialiased, 224x224 -> 160x160"):
        assert line in report.splitlines(), report

    # The first scale's counts equal a direct computation on torchvision's reference preprocessing
    # (Resize 256, CenterCrop 224) of the files that ids 0 and 2 name, with the same models and seed.
    counts = counts_to_arrays(read_counts(out / "counts"))
    assert counts.select_counts.shape[-1] == 1000 and counts.sigmas[0] == 1.0
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    images = torch.stack([reference(Image.open(imagenet_tree / folder / "ILSVRC2012_val_0.JPEG").convert("RGB"))
                          for folder in ("n01", "n02")])
    spec = ModelSpec(str(guided_denoiser), "timm", "test_vit", 1000, classifier_weights=str(timm_weights),
                     denoiser_fit="resize")
    fused = FusedDenoiseClassify(*spec.load(), num_classes=1000, device="cpu", batch_size=JOB_BATCH,
                                 precision=JOB_PRECISION)
    expected = fused.count(images, [0, 2], [1.0], {Phase.SELECT: 8, Phase.ESTIMATE: 16}, seed=0)
    np.testing.assert_array_equal(counts.select_counts[[0, 2], 0], expected[Phase.SELECT][:, 0])
    np.testing.assert_array_equal(counts.estimate_counts[[0, 2], 0], expected[Phase.ESTIMATE][:, 0])


def test_cifar10_job_with_diffusers_unet_and_torchscript_classifier(
    job_env, cifar_dir, diffusers_denoiser, tmp_path
):
    classifier = save_torchscript(tmp_path / "classifier.pt", num_classes=10)
    out = tmp_path / "out"
    result = run_job("certify.py", "--preset", "cifar10", "--data", str(cifar_dir.parent),
                     "--denoiser", str(diffusers_denoiser), "--classifier", str(classifier), *SMALL_RUN,
                     "--out", str(out), env=job_env)
    assert succeeded(result)
    table = check_results(out, image_ids=[0, 1, 2, 3], labels=CIFAR_LABELS[:4])
    report = (out / "report.md").read_text().splitlines()
    for line in ("- preprocessing: none (32x32 as stored)",
                 "- denoiser fit: pad (the UNet's own size, 32x32: nothing to fit)",
                 "- classifier interpolation: inside the TorchScript classifier"):
        assert line in report
    # Every noisy sample is classified FAVOURED_CLASS, so stage 1 (sigma = 1) certifies it with the
    # one-sided Clopper-Pearson bound for n of n successes, a^(1/n), at the union level a = alpha/5:
    # three scales were asked for, so 2K - 1 = 5 intervals (docs/statistics.md), fixed before any count is
    # seen, even though early exit never samples sigma 0.5 and 0.25 here.
    assert table["prediction"] == [FAVOURED_CLASS] * 4 and table["sigma"] == [1.0] * 4
    lower_bound = (0.001 / 5) ** (1 / 16)
    np.testing.assert_allclose(table["radius"], [norm.ppf(lower_bound)] * 4, rtol=1e-9)
    counts = counts_to_arrays(read_counts(out / "counts"))
    assert counts.estimate_counts.shape == (4, 1, 10)
    assert (counts.estimate_counts[:, 0, FAVOURED_CLASS] == 16).all()


def test_cifar10_job_with_converted_improved_diffusion_and_a_hugging_face_vit(
    job_env, cifar_dir, tmp_path_factory, tmp_path
):
    """CIFAR-10 as both papers run it, in miniature: an improved-diffusion-layout checkpoint (cosine,
    4,000 steps, rescaled timesteps, learned sigma) converted by the converter job, and a transformers
    ViT at 64x64 (the data are 32x32: resized bicubic, as Carlini et al.) given as hf:DIR. The actors'
    counts equal a direct computation with the same models: both read timestep_scale.json and the
    image processor config the same way."""
    folder = tmp_path_factory.mktemp("improved")
    checkpoint = save_reference(
        random_reference(model_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_ds=(2,), num_heads=4,
                         resblock_updown=False),
        folder / "cifar10_uncond_tiny.pt",
    )
    flags = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1,2",
             "--attention_resolutions", "16", "--num_heads", "4", "--learn_sigma", "True",
             "--resblock_updown", "False", "--diffusion_steps", "4000", "--noise_schedule", "cosine",
             "--rescale_timesteps", "True"]
    assert succeeded(run_job("convert_guided_diffusion.py", str(checkpoint), str(folder / "denoiser"), *flags,
                             env=job_env))
    assert (folder / "denoiser" / "timestep_scale.json").is_file()
    vit = save_tiny_vit(folder / "vit", size=64)
    out = tmp_path / "out"
    result = run_job("certify.py", "--preset", "cifar10", "--data", str(cifar_dir), "--denoiser",
                     str(folder / "denoiser"), "--classifier", f"hf:{vit}", "--classifier-interpolation", "bicubic",
                     *SMALL_RUN, "--out", str(out), env=job_env)
    assert succeeded(result)
    check_results(out, image_ids=[0, 1, 2, 3], labels=CIFAR_LABELS[:4])
    assert "- classifier interpolation: bicubic, antialiased, 32x32 -> 64x64" in (out / "report.md").read_text()

    counts = counts_to_arrays(read_counts(out / "counts"))
    spec = ModelSpec(str(folder / "denoiser"), "hf", str(vit), 10, classifier_interpolation="bicubic")
    fused = FusedDenoiseClassify(*spec.load(), num_classes=10, device="cpu", batch_size=JOB_BATCH,
                                 precision=JOB_PRECISION)
    assert fused.denoiser.timestep_scale == 0.25 and fused.denoiser.timestep_for_sigma(1.0) > 1000
    images = torch.from_numpy(load_cifar_rows(cifar_dir)[:2].reshape(2, 3, 32, 32).astype(np.float32) / np.float32(255))
    expected = fused.count(images, [0, 1], [1.0], {Phase.SELECT: 8, Phase.ESTIMATE: 16}, seed=0)
    np.testing.assert_array_equal(counts.select_counts[:2, 0], expected[Phase.SELECT][:, 0])
    np.testing.assert_array_equal(counts.estimate_counts[:2, 0], expected[Phase.ESTIMATE][:, 0])


def load_cifar_rows(folder: Path) -> np.ndarray:
    with open(folder / "test_batch", "rb") as handle:
        return pickle.load(handle)[b"data"]


def test_missing_data_is_a_one_line_error_with_exit_code_2(job_env, timm_weights, tmp_path):
    result = run_job("certify_imagenet.py", "--denoiser", str(tmp_path), "--classifier", "test_vit",
                     "--classifier-weights", str(timm_weights), *SMALL_RUN, "--out", str(tmp_path / "out"), env=job_env)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: preset imagenet needs --data: an ImageNet-style"), (
        result.stderr[-4000:])


@pytest.mark.parametrize("missing", ["denoiser", "classifier weights"])
def test_missing_checkpoint_fails_in_the_driver_in_one_line(
    missing, ray_session, imagenet_tree, guided_denoiser, timm_weights, tmp_path, monkeypatch, capsys
):
    """Caught before any actor starts (an actor would fail with a Ray traceback instead), same exit path as
    the job's `__main__` (run_main), in-process to spare a subprocess."""
    from pipeline.app.cli import run_main

    absent = tmp_path / "absent"
    denoiser, weights = (absent, timm_weights) if missing == "denoiser" else (guided_denoiser, absent)
    monkeypatch.setattr(sys, "argv", [
        "certify_imagenet.py", "--data", str(imagenet_tree), "--denoiser", str(denoiser), "--classifier",
        "test_vit", "--classifier-weights", str(weights), *SMALL_RUN, "--out", str(tmp_path / "out"),
    ])
    with pytest.raises(SystemExit) as exit_info:
        run_main(load_imagenet_job().main)
    assert exit_info.value.code == 2
    expected = {"denoiser": f"error: denoiser directory not found: {absent}",
                "classifier weights": f"error: weights file not found: {absent}"}[missing]
    error = capsys.readouterr().err
    assert error.startswith(expected) and error.count("\n") == 1, error


def load_imagenet_job():
    spec = importlib.util.spec_from_file_location("certify_imagenet", REPO_ROOT / "jobs" / "certify_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_explains_the_flags_and_defaults_are_the_papers(monkeypatch, capsys):
    job = load_imagenet_job()
    monkeypatch.setattr(sys, "argv", ["certify_imagenet.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        job.main()
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--denoiser", "--classifier", "--classifier-weights", "--out", "--num-images", "--skip",
                 "--sigmas", "--n-select", "--n ", "--alpha", "--num-actors", "--device", "--resume",
                 "--denoiser-fit pad|native|resize", "--preprocess resize256-crop224|resize224-crop224",
                 "--classifier-interpolation bicubic|bilinear|nearest"):
        assert flag in text
    assert "convert_guided_diffusion.py" in text and "ray job submit" in text and "s3://" in text
    assert "imagenet  --sigmas 1,0.5,0.25  --n-select 100  --n 10000  --alpha 0.001  --skip 100" in text
    assert "cifar10   --sigmas 1,0.5,0.25  --n-select 100  --n 100000  --alpha 0.001" in text

    # What a run without overrides actually uses (the issue: Carlini et al.'s / Jeong & Shin's settings).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from pipeline.app.args import build_parser, request_from_args

    for preset, n in (("imagenet", 10_000), ("cifar10", 100_000)):
        request = request_from_args(build_parser(preset, "").parse_args([]))
        assert request.config.sigmas == (1.0, 0.5, 0.25)
        assert (request.config.n_select, request.config.n, request.config.alpha) == (100, n, 0.001)
    imagenet = request_from_args(build_parser("imagenet", "").parse_args([]))
    assert imagenet.data.skip == 100
    # pad: the published multi-scale code's denoiser fit; preprocessing None: resize256-crop224 (Cohen, Carlini)
    assert imagenet.models.denoiser_fit == "pad" and imagenet.data.preprocess is None


def test_device_flag_decides_whether_actors_ask_for_a_gpu(monkeypatch):
    """An autoscaling cluster starts with no GPU worker: only --device cuda makes the actors ask for one."""
    from pipeline.app.args import build_parser, request_from_args

    def parse(*flags: str):
        return request_from_args(build_parser("imagenet", "").parse_args(list(flags)))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert parse("--device", "cpu").execution.use_gpu is False
    assert parse().execution.use_gpu is torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: this machine has no GPU"):
            parse("--device", "cuda")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a submitted job; nothing connects with --num-actors given
    execution = parse("--device", "cuda", "--num-actors", "8").execution
    assert execution.use_gpu is True and execution.num_actors == 8


def test_cpu_actor_default_leaves_a_core_for_file_reads(monkeypatch):
    """Without GPUs: one actor per core for the in-memory digits set, one fewer when Ray Data tasks read
    files (all cores held by actors starve the reads forever), and a clear error instead of that hang."""
    from pipeline.app.args import build_parser, request_from_args

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})

    def actors(preset: str, *flags: str) -> int:
        return request_from_args(build_parser(preset, "").parse_args(["--device", "cpu", *flags])).execution.num_actors

    assert actors("digits") == 4
    assert actors("imagenet") == actors("cifar10") == 3
    assert actors("imagenet", "--num-actors", "3") == 3
    with pytest.raises(UserError, match="--num-actors 4 on CPU would take all 4 cores"):
        actors("imagenet", "--num-actors", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert actors("digits") == actors("imagenet") == 1


def test_models_load_from_an_fsspec_url(diffusers_denoiser, tmp_path):
    """--denoiser / --classifier as bucket URLs (memory:// stands in for s3://) load the same models."""
    classifier = save_torchscript(tmp_path / "classifier.pt", num_classes=10)
    remote = fsspec.filesystem("memory")
    remote.put(str(diffusers_denoiser), "/bucket/models/ddpm", recursive=True)
    remote.put(str(classifier), "/bucket/models/classifier.pt")
    try:
        local = ModelSpec(str(diffusers_denoiser), "torchscript", str(classifier), 10).load()
        loaded = ModelSpec("memory://bucket/models/ddpm", "torchscript", "memory://bucket/models/classifier.pt",
                           10).load()
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            np.testing.assert_array_equal(loaded[0](images, torch.tensor([3, 300])).numpy(),
                                          local[0](images, torch.tensor([3, 300])).numpy())
            np.testing.assert_array_equal(loaded[1](images).numpy(), local[1](images).numpy())
        with pytest.raises(UserError, match="memory://bucket/absent does not exist"):
            ModelSpec("memory://bucket/absent", "torchscript", str(classifier), 10).load()
    finally:
        remote.rm("/bucket", recursive=True)


def test_a_classifier_with_the_wrong_number_of_logits_is_refused(diffusers_denoiser, tmp_path):
    """Predictions >= num_classes would be counted into another image's cells, so the driver refuses them."""
    wide = save_torchscript(tmp_path / "wide.pt", num_classes=12)
    with pytest.raises(UserError, match=r"logits of shape \(1, 12\).*expected \(1, 10\)"):
        ModelSpec(str(diffusers_denoiser), "torchscript", str(wide), 10).check((3, 32, 32))
    ModelSpec(str(diffusers_denoiser), "torchscript", str(save_torchscript(tmp_path / "ok.pt", 10)), 10).check(
        (3, 32, 32))
