"""The Ray Train worker function: DDP fine-tuning of the denoiser with the fine-tuning objective (docs/finetuning.md).

Each worker loads the base denoiser and the frozen classifier, wraps the trainable UNet (full or
LoRA) in DDP, and trains on its own shard of the "train" dataset (rows {"image_id", "label",
"image"}). Every epoch it reports the loss terms and a smoothed-accuracy probe, with a checkpoint
(weights, optimizer state, progress) that a resumed run continues from, optimizer state included.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.finetune.loss import METRIC_NAMES, LossSettings, cascade_finetune_loss
from pipeline.finetune.weights import LoraSettings, load_checkpoint, save_checkpoint, trainable_unet
from pipeline.models.denoiser import OneShotDenoiser
from pipeline.models.precision import Precision, autocast
from pipeline.models.spec import ModelSpec


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a worker needs besides data; stored as JSON in every checkpoint.

    `model_spec` is certification's own description of the models (same loaders, denoiser fit and
    classifier preprocessing), so the denoiser is trained on exactly the inputs it will certify.
    `batch_size` is per worker, so the effective batch is num_workers × batch_size. `checkpoint_every`:
    optimizer steps between checkpoints (0: at epoch ends only); an ImageNet epoch is long, so a
    preempted run would otherwise lose hours.
    """

    model_spec: ModelSpec
    loss: LossSettings = field(default_factory=LossSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-4
    grad_clip: float = 1.0
    seed: int = 0
    probe_samples: int = 16
    train_rows: int = 0
    checkpoint_every: int = 0
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False

    def steps_per_epoch(self, world: int) -> int:
        """Optimizer steps per epoch: Ray Train splits the rows equally, every worker drops its last
        partial batch, so every worker takes the same steps (each report is a barrier)."""
        return self.train_rows // world // self.batch_size


@dataclass(frozen=True)
class ProbeSet:
    """A few held-out images (N, C, H, W) in [0, 1] whose smoothed accuracy is tracked every epoch."""

    images: np.ndarray
    labels: np.ndarray


def frozen(classifier: torch.nn.Module) -> torch.nn.Module:
    """The classifier f in eval mode with no trainable parameters: gradients pass through, never into it."""
    for parameter in classifier.parameters():  # (TorchScript modules lack requires_grad_)
        parameter.requires_grad_(False)
    return classifier.eval()


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The noise of optimizer step `step` on worker `rank`: fixed by position, so a resumed run draws
    what the uninterrupted one would have, and workers never share noise."""
    generator = torch.Generator(device=device)
    generator.manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + step) % 2**63)
    return generator


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
    precision: Precision = "fp32",
) -> dict[str, float]:
    """Smoothed accuracy (majority vote of `samples` denoisings) and the share of images whose wrong
    vote winner holds more than half the votes — the ones a certificate could claim wrongly.

    Workers split the probe images and sum their counts, so the numbers cover the whole probe set.
    The noise is fixed across epochs, so changes between epochs come from the model alone.
    """
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = next(denoiser.parameters()).device
    images = torch.tensor(probe.images[rank::world], device=device)  # a copy: Ray hands out read-only arrays
    labels = torch.tensor(probe.labels[rank::world], device=device)
    totals = torch.zeros(len(sigmas), 3, device=device)
    for index, sigma in enumerate(sigmas):
        generator = step_generator(seed, rank, -1 - index, device)
        noisy = images.repeat(samples, 1, 1, 1)
        noisy = noisy + sigma * torch.randn(noisy.shape, generator=generator, device=device)
        timesteps = torch.full((len(noisy),), denoiser.timestep_for_sigma(sigma), device=device)
        with autocast(device, precision):
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


def _progress_bar(settings: FinetuneSettings, done_steps: int, rank: int, world: int):
    """One bar over the remaining optimizer steps, shown by rank 0 through Ray's driver-side tqdm."""
    if rank != 0:
        return None
    from ray.experimental.tqdm_ray import tqdm

    total = settings.steps_per_epoch(world) * settings.epochs
    return tqdm(total=max(total - done_steps, 0), desc="fine-tuning denoiser")


@dataclass
class _Worker:
    """One worker's training state. `denoiser` calls the UNet through DDP (training); `bare` calls the
    same module directly (the probe, which must not enter DDP's gradient bookkeeping). `progress`:
    completed epochs, optimizer steps, steps into the current epoch, per-epoch history."""

    settings: FinetuneSettings
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    denoiser: OneShotDenoiser
    bare: OneShotDenoiser
    classifier: torch.nn.Module
    progress: dict[str, Any]

    @classmethod
    def start(cls, settings: FinetuneSettings) -> "_Worker":
        """Load the models through certification's loaders, restore the latest checkpoint if the run
        has one, then wrap in DDP (DDP broadcasts rank 0's weights, so every replica starts identical)."""
        context = ray.train.get_context()
        device = ray.train.torch.get_device()
        base, classifier = settings.model_spec.load()
        if settings.gradient_checkpointing:  # recompute activations in backward: ADM-256 at a useful batch
            base.unet.enable_gradient_checkpointing()
        model = trainable_unet(base.unet, settings.lora).to(device).train()
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
        progress: dict[str, Any] = {"epoch": 0, "step": 0, "epoch_step": 0, "history": []}
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                restored = load_checkpoint(Path(directory), model, optimizer)
            progress = {key: restored[key] for key in progress}

        def wrap(unet: torch.nn.Module) -> OneShotDenoiser:  # the base model's schedule, fit and timestep scale
            return OneShotDenoiser(unet, base.alphas_cumprod, base.prediction_type, base.fit,
                                   base.timestep_scale).to(device)

        bare, denoiser = wrap(model), wrap(model)
        denoiser.unet = ray.train.torch.prepare_model(model)
        classifier = frozen(classifier).to(device)
        if settings.precision == "bf16":  # frozen: its weights need no fp32 master copy
            classifier = classifier.to(torch.bfloat16)
        return cls(settings, device, context.get_world_rank(), context.get_world_size(), model, optimizer,
                   denoiser, bare, classifier, progress)

    def probe(self, probe_set: ProbeSet) -> dict[str, float]:
        self.model.eval()
        settings = self.settings
        metrics = probe_metrics(self.bare, self.classifier, probe_set, settings.loss.sigmas, settings.probe_samples,
                                settings.seed, settings.model_spec.num_classes, settings.precision)
        self.model.train()
        return metrics

    def train_epoch(self, shard, epoch: int, bar) -> dict[str, float]:
        """One pass over this worker's shard, with a checkpoint every `checkpoint_every` steps; returns
        the loss terms averaged over all workers' steps of this pass.

        A run resumed mid-epoch skips the batches the interrupted pass had trained on (Ray Data's
        shard order is not guaranteed to repeat exactly, so they are not always the same images); the
        noise of every step is fixed by its index either way."""
        settings = self.settings
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        sums = torch.zeros(len(METRIC_NAMES) + 1, device=self.device)  # the last entry counts steps
        batches = shard.iter_torch_batches(
            batch_size=settings.batch_size, drop_last=True, device=self.device,
            local_shuffle_buffer_size=4 * settings.batch_size,
            local_shuffle_seed=settings.seed + 7919 * epoch + self.rank,
        )
        steps_per_epoch, done = settings.steps_per_epoch(self.world), self.progress["epoch_step"]
        for index, batch in enumerate(batches):  # always drained: every worker ends the pass together
            if index < done or index >= steps_per_epoch:
                continue
            generator = step_generator(settings.seed, self.rank, self.progress["step"], self.device)
            with autocast(self.device, settings.precision):
                terms = cascade_finetune_loss(self.denoiser, self.classifier, batch["image"].float(),
                                              batch["label"].long(), settings.loss, generator)
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
            self.optimizer.step()
            sums += torch.cat([terms.detached(), torch.ones(1, device=self.device)])
            self.progress["step"] += 1
            self.progress["epoch_step"] += 1
            if bar is not None:
                bar.update(1)
            every = settings.checkpoint_every
            if every and self.progress["step"] % every == 0 and self.progress["epoch_step"] < steps_per_epoch:
                self.report({"epoch": epoch, "step": self.progress["step"]})
        totals = _sum_over_workers(sums)
        steps = max(float(totals[-1]), 1.0)
        return {name: float(value) / steps for name, value in zip(METRIC_NAMES, totals)}

    def report(self, metrics: dict[str, float]) -> None:
        """Every worker reports (it is a barrier); rank 0 alone writes the checkpoint, since DDP keeps
        the replicas identical."""
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                record = {"settings": asdict(self.settings), **self.progress}
                save_checkpoint(Path(directory), self.model, self.optimizer, record)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                if "loss" in metrics:
                    print(_epoch_line(metrics, self.settings.epochs), flush=True)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; config = {"settings": FinetuneSettings, "probe": ProbeSet}."""
    settings: FinetuneSettings = config["settings"]
    probe_set: ProbeSet = config["probe"]
    worker = _Worker.start(settings)
    progress = worker.progress
    if not progress["history"]:  # the base model's probe: the baseline every later epoch compares to
        progress["history"].append({"epoch": 0, "step": 0, **worker.probe(probe_set)})
        if worker.rank == 0:
            print(f"base denoiser: {_probe_text(progress['history'][0])}", flush=True)
    shard = ray.train.get_dataset_shard("train")
    bar = _progress_bar(settings, progress["step"], worker.rank, worker.world)
    for epoch in range(progress["epoch"], settings.epochs):
        metrics: dict[str, float] = {"epoch": epoch + 1, **worker.train_epoch(shard, epoch, bar)}
        metrics.update({"step": progress["step"], **worker.probe(probe_set)})
        progress.update(epoch=epoch + 1, epoch_step=0)
        progress["history"].append(metrics)
        worker.report(metrics)
    if bar is not None:
        bar.close()


def _probe_text(metrics: dict[str, float]) -> str:
    sigmas = [key.removeprefix("probe_accuracy_sigma") for key in metrics if key.startswith("probe_accuracy_sigma")]
    return "probe smoothed accuracy / confidently wrong " + ", ".join(
        f"σ={s}: {metrics['probe_accuracy_sigma' + s]:.0%} / {metrics['probe_confident_wrong_sigma' + s]:.0%}"
        for s in sigmas
    )


def _epoch_line(metrics: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}: loss {metrics['loss']:.4f} "
        f"(diff {metrics['loss_diffusion']:.4f}, rec {metrics['loss_recoverable']:.3f}, "
        f"anti {metrics['loss_anti']:.3f}, recoverable {metrics['fraction_recoverable']:.0%}); "
        f"{_probe_text(metrics)}"
    )
