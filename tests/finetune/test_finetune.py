"""The fine-tuning objective against hand computations, checkpoints and export on a tiny UNet and
classifier, and the job's refusals. The Ray Train job end to end (two CPU workers, checkpoints, resume with
optimizer state, export) runs in tests/jobs/test_object_storage_jobs.py with its models and checkpoints on
the S3-protocol server, and loses a worker node in tests/distributed/test_node_loss.py."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.finetune.loss import (
    LossSettings,
    anti_consistency_loss,
    cascade_finetune_loss,
    diffusion_loss,
    recoverable_loss,
    recoverable_mask,
)
from pipeline.finetune.weights import (
    LORA_TARGETS,
    WEIGHTS_FILE,
    LoraSettings,
    export_denoiser,
    save_checkpoint,
    trainable_unet,
)
from pipeline.models.denoiser import denoiser_from_parts, load_denoiser

JOB = "finetune_diffusion.py"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, add_attention=False,
    )


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


class TinyClassifier(torch.nn.Module):
    """Takes [0,1] images (N, 1, 16, 16), returns 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.avg_pool2d(F.relu(self.conv(images)), 4).flatten(1))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny diffusers denoiser directory and a TorchScript classifier file."""
    root = tmp_path_factory.mktemp("tiny-models")
    tiny_unet().save_pretrained(root / "denoiser", safe_serialization=True)
    tiny_scheduler().save_pretrained(root / "denoiser")
    torch.manual_seed(1)
    torch.jit.script(TinyClassifier().eval()).save(str(root / "classifier.pt"))
    return root / "denoiser", root / "classifier.pt"


def one_hot_logits(predictions: list[list[int]], num_classes: int) -> torch.Tensor:
    """Logits (M, B, C) whose argmax is predictions[m][b]."""
    return 5.0 * F.one_hot(torch.tensor(predictions), num_classes).float()


# ---------------------------------------------------------------- loss terms by hand


def test_recoverable_mask_is_majority_vote_equals_label_with_ties_recoverable():
    predictions = [[1, 1, 2, 0], [1, 2, 2, 0], [2, 3, 1, 0]]  # M=3 rows, B=4 columns
    labels = torch.tensor([1, 1, 1, 3])
    # image 0: votes 1,1,2 -> 1 wins; image 1: 1,2,3 three-way tie incl. 1; image 2: 2,2,1 -> 2 wins;
    # image 3: 0,0,0 while the label is 3
    mask = recoverable_mask(one_hot_logits(predictions, 4), labels)
    assert mask.tolist() == [True, True, False, False]
    two = recoverable_mask(one_hot_logits([[0, 1], [2, 1]], 3), torch.tensor([2, 0]))
    assert two.tolist() == [True, False]  # (0, 2) ties with the label 2 in it; (1, 1) against label 0


def test_cross_entropy_term_equals_hand_computation_on_recoverable_inputs_only():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 2])
    mask = torch.tensor([True, False, True, True, False])
    values = logits.numpy()
    hand = []
    for b in np.flatnonzero(mask.numpy()):
        per_m = [-(values[m, b, labels[b]] - np.log(np.exp(values[m, b]).sum())) for m in range(2)]
        hand.append(np.mean(per_m))
    assert recoverable_loss(logits, labels, mask, "ce").item() == pytest.approx(np.mean(hand), rel=1e-12)

    probabilities = np.exp(values) / np.exp(values).sum(-1, keepdims=True)
    brier = [
        np.mean([((probabilities[m, b] - np.eye(4)[labels[b]]) ** 2).sum() for m in range(2)])
        for b in np.flatnonzero(mask.numpy())
    ]
    assert recoverable_loss(logits, labels, mask, "brier").item() == pytest.approx(np.mean(brier), rel=1e-12)


def test_anti_consistency_is_mean_pairwise_agreement_on_non_recoverable_inputs():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([False, True, False, True])
    p = torch.softmax(logits, -1).numpy()
    hand = np.mean([
        np.mean([p[i, b] @ p[j, b] for i, j in itertools.combinations(range(3), 2)]) for b in (0, 2)
    ])
    assert anti_consistency_loss(logits, mask).item() == pytest.approx(hand, rel=1e-12)


def test_anti_consistency_gradient_pushes_denoisings_apart():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, dtype=torch.bool)
    loss = anti_consistency_loss(logits, mask)
    loss.backward()
    p = torch.softmax(logits.detach(), -1)
    for b in range(3):  # d<p1,p2>/dz1 = J(p1)^T p2 with J = diag(p) - p p^T, averaged over 3 inputs
        jacobian = torch.diag(p[0, b]) - torch.outer(p[0, b], p[0, b])
        assert torch.allclose(logits.grad[0, b], jacobian @ p[1, b] / 3, atol=1e-12)
    stepped = logits.detach() - 0.5 * logits.grad
    assert anti_consistency_loss(stepped, mask) < loss.detach()  # descent lowers the agreement
    # and the agreement of the most-agreed-on class drops for every input
    agreement_before = (p[0] * p[1]).sum(-1)
    q = torch.softmax(stepped, -1)
    assert torch.all((q[0] * q[1]).sum(-1) < agreement_before)


def test_terms_on_empty_subsets_are_zero_and_keep_the_graph():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    all_recoverable = torch.ones(3, dtype=torch.bool)
    anti = anti_consistency_loss(logits, all_recoverable)
    recoverable = recoverable_loss(logits, labels, ~all_recoverable)
    assert anti.item() == 0.0 and recoverable.item() == 0.0
    (anti + recoverable).backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_diffusion_loss_is_ddpm_epsilon_mse_with_diffusers_add_noise():
    unet, scheduler = tiny_unet(), tiny_scheduler()
    denoiser = denoiser_from_parts(unet, scheduler)
    clean = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(denoiser, clean, 300, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)  # same draws, in the same order, by hand
    timesteps = torch.randint(0, 301, (6,), generator=generator)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = scheduler.add_noise(2 * clean - 1, noise, timesteps)
    with torch.no_grad():
        expected = F.mse_loss(unet(noisy, timesteps).sample, noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("fit, padding", [("pad", 2), ("native", 0)])
def test_diffusion_loss_reaches_the_unet_with_the_denoisers_fit(fit: str, padding: int):
    """12x12 images and a 16x16 UNet: L_diff trains on what certification feeds the UNet (reflection-padded
    images for pad, the images at their own size for native), not on a resized copy."""
    unet, scheduler = tiny_unet(), tiny_scheduler()
    denoiser = denoiser_from_parts(unet, scheduler, fit=fit)
    clean = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    loss = diffusion_loss(denoiser, clean, 300, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    timesteps = torch.randint(0, 301, (6,), generator=generator)
    x0 = F.pad(2 * clean - 1, (padding,) * 4, mode="reflect") if padding else 2 * clean - 1
    noise = torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        expected = F.mse_loss(unet(scheduler.add_noise(x0, noise, timesteps), timesteps).sample, noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_resume_keeps_the_runs_denoiser_fit_and_refuses_another(tmp_path):
    from pipeline.app import finetune as driver

    parser = driver.build_parser("fine-tune")
    flags, record = driver.resolve_flags(parser.parse_args(["--out", str(tmp_path), "--denoiser-fit", "native"]),
                                         tmp_path)
    assert flags["denoiser_fit"] == "native" and record is None
    (tmp_path / driver.RUN_RECORD).write_text(json.dumps({"preset": "digits", "flags": flags}))
    resumed, _ = driver.resolve_flags(parser.parse_args(["--out", str(tmp_path), "--resume", "--epochs", "12"]),
                                      tmp_path)
    assert resumed == {**flags, "epochs": 12}
    changed = parser.parse_args(["--out", str(tmp_path), "--resume", "--denoiser-fit", "pad"])
    with pytest.raises(UserError, match="--denoiser-fit pad differs from the run's native"):
        driver.resolve_flags(changed, tmp_path)
    other_preset = parser.parse_args(["--out", str(tmp_path), "--resume", "--preset", "cifar10"])
    with pytest.raises(UserError, match="is preset digits, not cifar10"):
        driver.resolve_flags(other_preset, tmp_path)


def test_classification_terms_train_the_denoiser_only():
    unet = tiny_unet()
    denoiser = denoiser_from_parts(unet, tiny_scheduler())
    classifier = TinyClassifier().requires_grad_(False)
    classifier_before = {k: v.clone() for k, v in classifier.state_dict().items()}
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    settings = LossSettings(sigmas=(0.5, 0.25), num_denoisings=3, lambda_cls=2.0, eta_anti=0.5)
    terms = cascade_finetune_loss(denoiser, classifier, images, labels, settings, torch.Generator().manual_seed(1))
    assert terms.total.item() == pytest.approx(
        terms.diffusion.item() + 2.0 * (terms.recoverable.item() + 0.5 * terms.anti.item()), rel=1e-6)
    assert 0.0 <= terms.fraction_recoverable.item() <= 1.0
    (terms.recoverable + terms.anti).backward()  # no L_diff: any UNet gradient came through f(D(.))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.grad is None for p in classifier.parameters())
    assert all(torch.equal(v, classifier_before[k]) for k, v in classifier.state_dict().items())


def test_settings_refuse_single_denoising():
    with pytest.raises(UserError, match="at least 2"):
        LossSettings(num_denoisings=1)


# ---------------------------------------------------------------- weights: LoRA merge and export


def test_lora_checkpoint_exports_a_merged_denoiser_with_the_same_outputs(tiny_models, tmp_path):
    denoiser_dir, _ = tiny_models
    model = trainable_unet(load_denoiser(denoiser_dir).unet, LoraSettings(rank=2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for parameter in trainable:
            parameter.normal_(0, 0.1)  # as if trained: B = 0 at init would make the test vacuous
    optimizer = torch.optim.AdamW(trainable)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    settings = {"model_spec": {"denoiser": str(denoiser_dir)}, "lora": asdict(LoraSettings(rank=2))}
    save_checkpoint(checkpoint, model, optimizer, {"settings": settings, "epoch": 1, "step": 3, "history": []})
    assert all("lora_" in key for key in load_file(str(checkpoint / WEIGHTS_FILE)))

    run = {"name": "finetune-test", "storage_path": str(tmp_path / "storage")}
    exported = load_denoiser(export_denoiser(checkpoint, tmp_path / "export", run))
    assert exported.provenance == (f"fine-tuned from {denoiser_dir} by run finetune-test (3 steps, LoRA rank 2, "
                                   f"alpha 2 on {','.join(LORA_TARGETS)} (merged); checkpoints in {tmp_path / 'storage'})")
    reference = denoiser_from_parts(model, tiny_scheduler())
    noisy = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([10, 100, 200, 300])
    base = load_denoiser(denoiser_dir)
    with torch.no_grad():
        assert torch.allclose(exported(noisy, timesteps), reference(noisy, timesteps), atol=1e-5)
        assert not torch.allclose(exported(noisy, timesteps), base(noisy, timesteps), atol=1e-3)


# ---------------------------------------------------------------- the job, end to end


def latest_checkpoint(storage: Path) -> Path:
    checkpoints = [path.parent for path in storage.rglob("training.json")]
    return max(checkpoints, key=lambda path: json.loads((path / "training.json").read_text())["step"])


def rgb_denoiser(folder: Path) -> Path:
    """A 3-channel UNet: loads fine, but cannot denoise the gray digits."""
    UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4, add_attention=False).save_pretrained(folder)
    tiny_scheduler().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["objective", "missing data", "missing denoiser", "mismatched denoiser",
                                  "missing classifier weights"])
def test_job_bad_input_is_one_line_exit_2_before_out_is_touched(case, tmp_path, tiny_models, monkeypatch, capfd):
    """Refused in the driver, before Ray starts or --out is created (the job's __main__, in this process)."""
    denoiser, classifier = tiny_models
    from tests.jobs.test_bad_inputs import assert_user_error, run_job
    from tests.jobs.test_imagenet_job import make_imagenet_tree, make_diffusers_denoiser

    imagenet = ["--preset", "imagenet", "--data", str(make_imagenet_tree(tmp_path / "train")), "--denoiser-fit",
                "resize", "--denoiser", str(make_diffusers_denoiser(tmp_path / "ddpm")), "--classifier", "test_vit"]
    flags, expected = {
        "objective": (["--num-denoisings", "1"], "at least 2"),
        "missing data": (["--preset", "cifar10", "--denoiser", str(denoiser), "--classifier", "x.pt"],
                         "preset cifar10 needs --data"),
        "missing denoiser": (["--denoiser", str(tmp_path / "absent"), "--classifier", str(classifier)],
                             "denoiser directory not found"),
        "mismatched denoiser": (["--denoiser", str(rgb_denoiser(tmp_path / "rgb")), "--classifier", str(classifier)],
                                "takes 3-channel images"),
        "missing classifier weights": ([*imagenet, "--classifier-weights", str(tmp_path / "absent.safetensors")],
                                       f"weights file not found: {tmp_path / 'absent.safetensors'}"),
    }[case]
    code, err = run_job(JOB, ["--out", str(tmp_path / "o"), *flags], monkeypatch, capfd)
    assert_user_error(code, err, expected)
    assert not (tmp_path / "o").exists()
