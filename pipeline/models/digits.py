"""Train-on-first-use, cached models for the embedded digits default (no downloads, ever).

A tiny diffusers DDPM UNet and a tiny timm classifier are trained on the digits train split the
first time they are needed and cached as safetensors. The cache key includes every training setting,
so changing a setting retrains instead of silently reusing stale weights; a cache that fails to load
is retrained with a warning, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from filelock import FileLock
from tqdm.auto import tqdm

from pipeline.data.digits import IMAGE_SIZE, NUM_CLASSES, load_digits_split
from pipeline.errors import UserError
from pipeline.models.classifier import NormalizedClassifier
from pipeline.models.denoiser import load_denoiser

logger = logging.getLogger(__name__)

CACHE_ENV = "MDDS_CACHE_DIR"
CLASSIFIER_ARCH = "resnet10t"


@dataclass(frozen=True)
class DenoiserTraining:
    """DDPM training settings. t is drawn from [0, max_timestep) because one-shot denoising only
    queries t*(sigma), which is below 600 for every sigma <= 1.5; later steps would waste the budget."""

    steps: int = 600
    batch_size: int = 128
    learning_rate: float = 2e-3
    max_timestep: int = 600
    block_out_channels: tuple[int, int] = (16, 32)
    seed: int = 0


@dataclass(frozen=True)
class ClassifierTraining:
    """Classifier settings; mild noise augmentation makes it tolerate imperfect denoising."""

    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 3e-3
    noise_std: float = 0.1
    seed: int = 0


def cache_dir(override: str | Path | None = None) -> Path:
    """`override`, else $MDDS_CACHE_DIR, else $XDG_CACHE_HOME/mdds (default ~/.cache/mdds)."""
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mdds"


def _key(settings: object) -> str:
    return hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]


def new_digits_unet(block_out_channels: tuple[int, int] = (16, 32)) -> UNet2DModel:
    """The embedded denoiser architecture: two levels, no attention, 16×16×1."""
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def new_digits_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def new_digits_classifier() -> NormalizedClassifier:
    import timm

    network = timm.create_model(CLASSIFIER_ARCH, pretrained=False, num_classes=NUM_CLASSES, in_chans=1)
    return NormalizedClassifier(network, None, (0.5,), (0.5,))


def _atomic_dir(target: Path) -> Path:
    """A temp dir beside `target`; the caller renames it into place so readers never see half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def train_digits_denoiser(settings: DenoiserTraining, progress: bool = True) -> tuple[UNet2DModel, DDPMScheduler]:
    """Standard DDPM ε-prediction training on the clean digits train split."""
    torch.manual_seed(settings.seed)
    images = torch.from_numpy(load_digits_split().train_images) * 2.0 - 1.0
    unet, scheduler = new_digits_unet(settings.block_out_channels), new_digits_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.learning_rate)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate, total_steps=settings.steps)
    generator = torch.Generator().manual_seed(settings.seed)
    unet.train()
    for _ in tqdm(range(settings.steps), desc="training digits denoiser (first run only)", disable=not progress):
        index = torch.randint(0, len(images), (settings.batch_size,), generator=generator)
        clean = images[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, settings.max_timestep, (settings.batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    return unet.eval(), scheduler


def train_digits_classifier(settings: ClassifierTraining, progress: bool = True) -> NormalizedClassifier:
    """Plain supervised training on the clean train split (flip-free: digits are not symmetric)."""
    torch.manual_seed(settings.seed)
    split = load_digits_split()
    images, labels = torch.from_numpy(split.train_images), torch.from_numpy(split.train_labels)
    classifier = new_digits_classifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    steps_per_epoch = -(-len(images) // settings.batch_size)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, settings.learning_rate, total_steps=settings.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(settings.seed)
    classifier.train()
    for _ in tqdm(range(settings.epochs), desc="training digits classifier (first run only)", disable=not progress):
        for batch in torch.randperm(len(images), generator=generator).split(settings.batch_size):
            noisy = images[batch] + settings.noise_std * torch.randn(images[batch].shape, generator=generator)
            loss = F.cross_entropy(classifier(noisy), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
    return classifier.eval()


def _load_cached_classifier(path: Path) -> NormalizedClassifier:
    from safetensors.torch import load_file

    classifier = new_digits_classifier()
    classifier.network.load_state_dict(load_file(str(path / "classifier.safetensors")))
    return classifier.eval()


def digits_denoiser_dir(
    settings: DenoiserTraining = DenoiserTraining(), root: str | Path | None = None, progress: bool = True
) -> Path:
    """Path of the cached digits denoiser (diffusers format), training it first if needed."""
    target = cache_dir(root) / f"digits-denoiser-{_key(settings)}"
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            try:
                load_denoiser(target)
                return target
            except UserError as error:
                logger.warning("cached digits denoiser is unreadable (%s); retraining", error)
        unet, scheduler = train_digits_denoiser(settings, progress)
        tmp = _atomic_dir(target)
        unet.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(asdict(settings), indent=2))
        _replace_dir(tmp, target)
    return target


def digits_classifier_dir(
    settings: ClassifierTraining = ClassifierTraining(), root: str | Path | None = None, progress: bool = True
) -> Path:
    """Path of the cached digits classifier (safetensors + JSON), training it first if needed."""
    from safetensors.torch import save_file

    target = cache_dir(root) / f"digits-classifier-{_key(settings)}"
    with FileLock(str(target) + ".lock"):
        if target.is_dir():
            try:
                _load_cached_classifier(target)
                return target
            except Exception as error:  # any unreadable cache is retrained, whatever broke it
                logger.warning("cached digits classifier is unreadable (%s); retraining", error)
        classifier = train_digits_classifier(settings, progress)
        tmp = _atomic_dir(target)
        save_file({k: v.contiguous() for k, v in classifier.network.state_dict().items()},
                  str(tmp / "classifier.safetensors"))
        (tmp / "training.json").write_text(json.dumps({"arch": CLASSIFIER_ARCH, **asdict(settings)}, indent=2))
        _replace_dir(tmp, target)
    return target


def load_digits_classifier(path: str | Path) -> NormalizedClassifier:
    """Load the cached classifier dir; a corrupt file becomes a one-line UserError."""
    try:
        return _load_cached_classifier(Path(path))
    except Exception as error:
        raise UserError(f"could not load digits classifier from {path}: {error}") from error


def clean_accuracy(classifier: torch.nn.Module) -> float:
    """Base classifier accuracy on the clean digits test split (reported next to certified accuracy)."""
    split = load_digits_split()
    with torch.inference_mode():
        predictions = classifier(torch.from_numpy(split.test_images)).argmax(1).numpy()
    return float(np.mean(predictions == split.test_labels))
