"""The Ray Train worker function: DDP fine-tuning of the denoiser with the §6 objective.

Each worker loads the base denoiser and the frozen classifier, wraps the trainable UNet (full or
LoRA) in DDP, and trains on its own shard of the "train" dataset (rows {"image_id", "label",
"image"}). Every epoch it reports the loss terms and a smoothed-accuracy probe, with a checkpoint
(weights, optimizer state, progress) that a resumed run continues from, optimizer state included.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.finetune.loss import METRIC_NAMES, LossSettings, cascade_finetune_loss
from pipeline.finetune.weights import load_checkpoint, save_checkpoint, trainable_unet
from pipeline.models.denoiser import OneShotDenoiser, load_denoiser

ClassifierKind = Literal["digits", "torchscript"]


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a worker needs besides data; stored as JSON in every checkpoint.

    `batch_size` is per worker, so the effective batch is num_workers × batch_size.
    """

    denoiser_dir: str
    classifier_dir: str
    classifier_kind: ClassifierKind
    num_classes: int
    loss: LossSettings = field(default_factory=LossSettings)
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-4
    grad_clip: float = 1.0
    lora_rank: int = 0
    seed: int = 0
    probe_samples: int = 16
    train_rows: int = 0

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "FinetuneSettings":
        loss = dict(record["loss"], sigmas=tuple(record["loss"]["sigmas"]))
        return cls(**dict(record, loss=LossSettings(**loss)))


@dataclass(frozen=True)
class ProbeSet:
    """A few held-out images (N, C, H, W) in [0, 1] whose smoothed accuracy is tracked every epoch."""

    images: np.ndarray
    labels: np.ndarray


def load_frozen_classifier(kind: ClassifierKind, path: str) -> torch.nn.Module:
    """The classifier f in eval mode with no trainable parameters: gradients pass through, never into it."""
    if kind == "digits":
        from pipeline.models.digits import load_digits_classifier

        classifier = load_digits_classifier(path)
    elif kind == "torchscript":
        from pipeline.models.classifier import load_torchscript_classifier

        classifier = load_torchscript_classifier(path)
    else:
        raise UserError(f"unknown classifier kind {kind!r}; expected 'digits' or 'torchscript'")
    for parameter in classifier.parameters():  # (TorchScript modules lack requires_grad_)
        parameter.requires_grad_(False)
    return classifier.eval()


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The noise of optimizer step `step` on worker `rank`: fixed by position, so a resumed run draws
    what the uninterrupted one would have, and workers never share noise."""
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63)
    return generator


def _autocast(device: torch.device):
    """bf16 on GPU for speed (no loss scaling needed); exact fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _sum_over_workers(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def probe_metrics(
    denoiser: OneShotDenoiser,
    classifier: torch.nn.Module,
    probe: ProbeSet,
    sigmas: tuple[float, ...],
    samples: int,
    seed: int,
    num_classes: int,
) -> dict[str, float]:
    """Smoothed accuracy (majority vote of `samples` denoisings) and the share of images whose wrong
    vote winner holds more than half the votes — the ones a certificate could claim wrongly.

    Workers split the probe images and sum their counts, so the numbers cover the whole probe set.
    The noise is fixed across epochs, so changes between epochs come from the model alone.
    """
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = next(denoiser.parameters()).device
    images = torch.as_tensor(probe.images[rank::world], device=device)
    labels = torch.as_tensor(probe.labels[rank::world], device=device)
    totals = torch.zeros(len(sigmas), 3, device=device)
    for index, sigma in enumerate(sigmas):
        generator = step_generator(seed, rank, -1 - index, device)
        noisy = images.repeat(samples, 1, 1, 1)
        noisy = noisy + sigma * torch.randn(noisy.shape, generator=generator, device=device)
        timesteps = torch.full((len(noisy),), denoiser.timestep_for_sigma(sigma), device=device)
        with _autocast(device):
            predictions = classifier(denoiser(noisy, timesteps)).argmax(dim=-1).view(samples, -1)
        votes = F.one_hot(predictions, num_classes).sum(dim=0)
        winner_wrong = votes.argmax(dim=1) != labels
        totals[index, 0] = (~winner_wrong).sum()
        totals[index, 1] = (winner_wrong & (2 * votes.max(dim=1).values > samples)).sum()
        totals[index, 2] = len(labels)
    totals = _sum_over_workers(totals)
    metrics = {}
    for index, sigma in enumerate(sigmas):
        count = max(float(totals[index, 2]), 1.0)
        metrics[f"probe_accuracy_sigma{sigma:g}"] = float(totals[index, 0]) / count
        metrics[f"probe_confident_wrong_sigma{sigma:g}"] = float(totals[index, 1]) / count
    return metrics


def _progress_bar(settings: FinetuneSettings, start_epoch: int, rank: int, world: int):
    """One bar over the remaining optimizer steps, shown by rank 0 through Ray's driver-side tqdm."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    steps_per_epoch = settings.train_rows // world // settings.batch_size
    return tqdm(total=steps_per_epoch * (settings.epochs - start_epoch), desc="fine-tuning denoiser")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; config = {"settings": FinetuneSettings, "probe": ProbeSet}."""
    settings: FinetuneSettings = config["settings"]
    probe: ProbeSet = config["probe"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    base = load_denoiser(settings.denoiser_dir)
    model = trainable_unet(base.unet, settings.lora_rank).to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_checkpoint(Path(directory), model, optimizer)
        progress = {key: restored[key] for key in progress}

    # The probe calls the bare model; training calls it through DDP (a plain reference swap, same weights).
    probe_denoiser = OneShotDenoiser(model, base.alphas_cumprod, base.prediction_type).to(device)
    denoiser = OneShotDenoiser(model, base.alphas_cumprod, base.prediction_type).to(device)
    denoiser.unet = ray.train.torch.prepare_model(model)
    classifier = load_frozen_classifier(settings.classifier_kind, settings.classifier_dir).to(device)
    shard = ray.train.get_dataset_shard("train")
    bar = _progress_bar(settings, progress["epoch"], rank, world)

    for epoch in range(progress["epoch"], settings.epochs):
        sums = torch.zeros(len(METRIC_NAMES), device=device)
        steps = torch.zeros((), device=device)
        batches = shard.iter_torch_batches(
            batch_size=settings.batch_size, drop_last=True, device=device,
            local_shuffle_buffer_size=4 * settings.batch_size, local_shuffle_seed=settings.seed + 7919 * epoch + rank,
        )
        for batch in batches:
            generator = step_generator(settings.seed, rank, progress["step"], device)
            with _autocast(device):
                terms = cascade_finetune_loss(
                    denoiser, classifier, batch["image"].float(), batch["label"].long(), settings.loss, generator
                )
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
            optimizer.step()
            sums += terms.detached()
            steps += 1
            progress["step"] += 1
            if bar is not None:
                bar.update(1)
        totals = _sum_over_workers(torch.cat([sums, steps.view(1)]))
        metrics: dict[str, float] = {"epoch": epoch + 1, "step": progress["step"]}
        metrics.update({name: float(value) / max(float(totals[-1]), 1.0) for name, value in zip(METRIC_NAMES, totals)})
        model.eval()
        metrics.update(probe_metrics(probe_denoiser, classifier, probe, settings.loss.sigmas,
                                     settings.probe_samples, settings.seed, settings.num_classes))
        model.train()
        progress["epoch"] = epoch + 1
        progress["history"].append(metrics)
        _report(metrics, model, optimizer, settings, progress, rank)
    if bar is not None:
        bar.close()


def _report(
    metrics: dict[str, float],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: FinetuneSettings,
    progress: dict[str, Any],
    rank: int,
) -> None:
    """Every worker reports (it is a barrier); rank 0 alone writes the checkpoint, since DDP keeps
    the replicas identical."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(directory), model, optimizer, {"settings": asdict(settings), **progress})
            checkpoint = ray.train.Checkpoint.from_directory(directory)
            print(_epoch_line(metrics, settings.epochs), flush=True)
        ray.train.report(metrics, checkpoint=checkpoint)


def _epoch_line(metrics: dict[str, float], epochs: int) -> str:
    probes = " ".join(
        f"σ={key.removeprefix('probe_accuracy_sigma')}: {value:.0%}"
        for key, value in metrics.items() if key.startswith("probe_accuracy_sigma")
    )
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}: loss {metrics['loss']:.4f} "
        f"(diff {metrics['loss_diffusion']:.4f}, rec {metrics['loss_recoverable']:.3f}, "
        f"anti {metrics['loss_anti']:.3f}, recoverable {metrics['fraction_recoverable']:.0%}); "
        f"probe smoothed accuracy {probes}"
    )
