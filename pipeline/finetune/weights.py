"""What is trained (the whole UNet, or LoRA adapters on it), how it is checkpointed, and the export.

A checkpoint directory holds three files:
  weights.safetensors  the trained tensors: the full UNet state, or only the LoRA adapter tensors
                       (the base weights are the base denoiser directory named in training.json)
  optimizer.pt         the AdamW state dict (read back with torch.load(weights_only=True))
  training.json        the settings, completed epochs, optimizer steps and per-epoch metrics
The export merges the adapters (if any) into the UNet and writes a plain diffusers directory, so
certification needs neither peft nor this package's training code.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.models.denoiser import FINETUNE_RECORD_FILE, load_denoiser, write_timestep_scale
from pipeline.models.spec import local_copy, output_folder

LORA_TARGETS = ("conv1", "conv2", "to_q", "to_k", "to_v", "to_out.0")
"""The ResNet convolutions and attention projections: where a UNet's capacity sits (diffusers naming,
which the guided-diffusion converter also produces for ADM)."""
ADAPTER_NAME = "default"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "training.json"


@dataclass(frozen=True)
class LoraSettings:
    """rank 0 = full fine-tuning; alpha None = rank (peft scales the adapter by alpha / rank)."""

    rank: int = 0
    alpha: float | None = None
    targets: tuple[str, ...] = LORA_TARGETS

    def describe(self) -> str:
        if self.rank == 0:
            return "full fine-tuning"
        return f"LoRA rank {self.rank}, alpha {self.alpha or self.rank:g} on {','.join(self.targets)} (merged)"


def trainable_unet(unet: UNet2DModel, lora: LoraSettings) -> torch.nn.Module:
    """The UNet itself for full fine-tuning (rank 0), else a peft LoraModel in which only the
    adapters require gradients. Adapters start at zero (peft's default), so step 0 is the base model."""
    if lora.rank < 0:
        raise UserError(f"LoRA rank must be >= 0 (0 = full fine-tuning), got {lora.rank}")
    if lora.rank == 0:
        return unet.requires_grad_(True)
    module_names = [name for name, _ in unet.named_modules()]
    targets = [t for t in lora.targets if any(name == t or name.endswith("." + t) for name in module_names)]
    if not targets:
        raise UserError(f"this UNet has none of the LoRA target layers {','.join(lora.targets)}; "
                        "name others with --lora-targets or use --lora-rank 0")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=targets)
    return LoraModel(unet, config, ADAPTER_NAME)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold to rebuild `model` from the base denoiser."""
    state = model.state_dict()
    if isinstance(model, LoraModel):
        state = {name: tensor for name, tensor in state.items() if "lora_" in name}
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load checkpoint tensors; a checkpoint from another architecture or LoRA rank is refused."""
    expected = set(trainable_state(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(
            f"checkpoint weights do not fit this model (different UNet or LoRA rank?): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}"
        )
    model.load_state_dict(state, strict=False)


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]
) -> None:
    """Write the three checkpoint files into `directory` (an existing, empty directory)."""
    save_file(trainable_state(model), str(directory / WEIGHTS_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(progress, indent=2))


def read_progress(directory: Path) -> dict[str, Any]:
    """training.json of a checkpoint: settings, epoch, step, history."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a fine-tuning checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def load_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore weights (and the optimizer state, when given) in place; returns the progress record."""
    progress = read_progress(directory)
    load_trainable_state(model, load_file(str(directory / WEIGHTS_FILE)))
    if optimizer is not None:
        device = next(p for group in optimizer.param_groups for p in group["params"]).device
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True))
    return progress


def merged_unet(model: torch.nn.Module) -> UNet2DModel:
    """A plain UNet2DModel: LoRA adapters folded into the weights they adapt."""
    return model.merge_and_unload() if isinstance(model, LoraModel) else model


def load_base_scheduler(denoiser_dir: str | Path) -> DDPMScheduler:
    """The base denoiser's scheduler (flat save or pipeline layout); fine-tuning never changes it."""
    denoiser_dir = Path(denoiser_dir)
    subfolder = "scheduler" if (denoiser_dir / "scheduler" / "scheduler_config.json").is_file() else None
    return DDPMScheduler.from_pretrained(denoiser_dir, subfolder=subfolder)


def export_denoiser(checkpoint_dir: str | Path, out_dir: str | Path, run: dict[str, str]) -> str:
    """Write the checkpoint's denoiser as UNet2DModel + DDPMScheduler save_pretrained into `out_dir`,
    loadable by `load_denoiser` (and so by `jobs/certify*.py --denoiser`), with finetune.json naming the
    base checkpoint and the run (`run`: its name and storage_path), which certification reports.

    The checkpoint, the base denoiser and `out_dir` may each be a local path or an fsspec URL (where a
    cluster's certification actors read it); returns `out_dir` as a string."""
    with tempfile.TemporaryDirectory(prefix="mdds-export-") as scratch:
        checkpoint = Path(local_copy(str(checkpoint_dir), scratch))
        progress = read_progress(checkpoint)
        settings = progress["settings"]
        base_location = settings["model_spec"]["denoiser"]
        lora = LoraSettings(**{**settings["lora"], "targets": tuple(settings["lora"]["targets"])})
        base_dir = local_copy(base_location, scratch)
        base = load_denoiser(base_dir)
        scheduler = load_base_scheduler(base_dir)
        model = trainable_unet(base.unet, lora)
        load_checkpoint(checkpoint, model)
    unet = merged_unet(model).eval()
    record = {"base_denoiser": base_location, "run": run["name"], "storage_path": run["storage_path"],
              "trainable": lora.describe(), **progress}
    with output_folder(str(out_dir)) as folder:
        unet.save_pretrained(folder, safe_serialization=True)
        scheduler.save_pretrained(folder)
        write_timestep_scale(folder, base.timestep_scale)  # the network still expects the base model's timesteps
        (Path(folder) / FINETUNE_RECORD_FILE).write_text(json.dumps(record, indent=2))
    return str(out_dir)
