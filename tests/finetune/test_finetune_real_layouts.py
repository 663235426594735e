"""Fine-tuning the real layouts in miniature (issue 17): the ImageNet preset on a guided-diffusion UNet
converted by the project's converter with LoRA and a timm ViT, the CIFAR-10 preset on a diffusers UNet
trained whole with a transformers ViT in bf16. Two CPU workers, a few steps each; the data come through
certification's readers, the export is certified end to end and its report names the fine-tuning run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.app import finetune as driver
from pipeline.finetune.weights import OPTIMIZER_FILE, WEIGHTS_FILE
from pipeline.models.denoiser import load_denoiser
from tests.finetune.test_finetune import latest_checkpoint
from tests.jobs.test_imagenet_job import (  # noqa: F401  (fixtures)
    guided_denoiser,
    job_env,
    make_diffusers_denoiser,
    make_imagenet_tree,
    run_job,
    succeeded,
    timm_weights,
)
from tests.models.test_classifiers import save_tiny_vit

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")]
FEW_STEPS = ["--num-workers", "2", "--batch-size", "1", "--probe-images", "2", "--probe-samples", "2",
             "--lr", "1e-2", "--epochs", "1"]


def optimizer_steps(checkpoint: Path) -> set[float]:
    return {float(s["step"]) for s in torch.load(checkpoint / OPTIMIZER_FILE, weights_only=True)["state"].values()}


def test_imagenet_preset_lora_on_converted_adm_checkpoints_checkpoints_mid_epoch_and_certifies(
    ray_session, job_env, guided_denoiser, timm_weights, tmp_path  # noqa: F811  (the imported fixtures)
):
    # 6 images: 2 held out for the probe, 4 trained on; --denoiser-fit resize keeps the 32x32 UNet at 32
    # (cheap on a CPU; the fits themselves are checked in tests/models/test_denoiser_fit.py)
    tree = make_imagenet_tree(tmp_path / "train")
    out, storage = tmp_path / "out", f"file://{tmp_path / 'storage'}"
    flags = ["--preset", "imagenet", "--data", str(tree), "--denoiser", str(guided_denoiser),
             "--classifier", "test_vit", "--classifier-weights", str(timm_weights), "--denoiser-fit", "resize",
             "--lora-rank", "2", "--checkpoint-every", "1", "--gradient-checkpointing", "on",
             "--storage-path", storage, "--out", str(out), *FEW_STEPS]
    parser = driver.build_parser("fine-tune")
    driver.finetune(parser.parse_args(flags))

    record = json.loads((out / driver.RUN_RECORD).read_text())
    assert record["storage_path"] == storage  # a URL, written through its fsspec filesystem
    settings = record["settings"]
    assert settings["train_rows"] == 4 and settings["model_spec"]["classifier_kind"] == "timm"
    assert settings["gradient_checkpointing"] and settings["precision"] == "fp32"  # no GPU: fp32
    progress = [json.loads(path.read_text()) for path in (tmp_path / "storage").rglob("training.json")]
    # 4 rows over 2 workers at batch 1: 2 steps per epoch, a checkpoint after step 1 (mid-epoch) and at the end
    assert sorted((p["step"], p["epoch"], p["epoch_step"]) for p in progress) == [(1, 0, 1), (2, 1, 0)]
    last = latest_checkpoint(tmp_path / "storage")
    assert all("lora_" in name for name in load_file(str(last / WEIGHTS_FILE)))  # adapters only
    assert optimizer_steps(last) == {2.0}

    # (a resume continuing this state is tested on the digits models, tests/finetune/test_finetune.py)
    assert [h["epoch"] for h in json.loads((out / driver.HISTORY_FILE).read_text())] == [0, 1]

    exported = load_denoiser(out / "denoiser")
    base = load_denoiser(guided_denoiser)
    noisy, timesteps = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([50, 400])
    with torch.no_grad():
        assert not torch.allclose(exported(noisy, timesteps), base(noisy, timesteps), atol=1e-5)  # LoRA merged in
    result = run_job("certify_imagenet.py", "--data", str(tree), "--denoiser", str(out / "denoiser"),
                     "--classifier", "test_vit", "--classifier-weights", str(timm_weights), "--denoiser-fit",
                     "resize", "--sigmas", "0.5", "--num-images", "2", "--skip", "1", "--n", "8", "--n-select", "4",
                     "--out", str(tmp_path / "certified"), env=job_env)
    assert succeeded(result)
    report = (tmp_path / "certified" / "report.md").read_text()
    assert f"fine-tuned from {guided_denoiser} by run {record['name']} (2 steps, LoRA rank 2" in report, report


def write_cifar_batches(folder: Path, per_batch: int) -> Path:
    """cifar-10-batches-py with the five training batches and the test batch, random pixels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": [int(v) for v in rng.integers(0, 10, per_batch)]}, handle)
    return folder


def test_cifar10_preset_full_fine_tuning_with_a_transformers_vit_in_bf16(ray_session, tmp_path):
    data = write_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=2)  # 10 training images
    denoiser = make_diffusers_denoiser(tmp_path / "ddpm")
    vit = save_tiny_vit(tmp_path / "vit", size=64)
    out = tmp_path / "out"
    driver.finetune(driver.build_parser("fine-tune").parse_args([
        "--preset", "cifar10", "--data", str(data), "--denoiser", str(denoiser), "--classifier", f"hf:{vit}",
        "--precision", "bf16", "--out", str(out), *FEW_STEPS, "--batch-size", "2"]))
    settings = json.loads((out / driver.RUN_RECORD).read_text())["settings"]
    assert settings["lora"]["rank"] == 0 and settings["precision"] == "bf16"
    assert settings["train_rows"] == 10  # the probe comes from the test batch
    last = latest_checkpoint(out / "ray_results")
    assert optimizer_steps(last) == {2.0}  # 10 rows / 2 workers / batch 2, last partial batch dropped
    trained = load_file(str(last / WEIGHTS_FILE))
    exported, base = load_denoiser(out / "denoiser"), load_denoiser(denoiser)
    assert set(trained) == set(base.unet.state_dict())  # the whole UNet
    moved = [name for name, tensor in exported.unet.state_dict().items()
             if not torch.equal(tensor, base.unet.state_dict()[name])]
    assert moved and all(torch.equal(exported.unet.state_dict()[name], trained[name]) for name in trained)
