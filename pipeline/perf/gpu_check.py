"""A short throughput and MFU check of the fused step on ImageNet-size models (random weights).

Throughput does not depend on the weights, so no checkpoint is needed: the denoiser is a randomly
initialised diffusers UNet2DModel with the layout of guided-diffusion's 256×256 unconditional model
(the one Carlini et al. use; built by pipeline/models/guided_diffusion.py's config helpers) and the
classifier a randomly initialised timm model at 224×224. `tiny=True` swaps in a 32×32 two-level
UNet and a small classifier, so the same code path runs on a CPU in seconds (tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.perf.flops import flops_per_sample, peak_bf16_flops, utilization
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.perf.tuning import batch_size_for_memory, compile_predict
from pipeline.models.classifier import NormalizedClassifier
from pipeline.models.denoiser import OneShotDenoiser, denoiser_from_parts
from pipeline.models.guided_diffusion import (
    UNET_ARCHITECTURES,
    CheckpointLayout,
    GuidedDiffusionConfig,
    diffusers_unet_config,
    make_scheduler,
    network_timestep_scale,
    resolve_architecture,
)
from pipeline.sampling.noise import Phase

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

TINY_UNET = GuidedDiffusionConfig(
    image_size=32, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(16,),
    num_head_channels=16, learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True,
)


def guided_denoiser(config: GuidedDiffusionConfig, device: torch.device) -> OneShotDenoiser:
    """A random-weight denoiser with exactly the architecture `config` describes."""
    levels = len(config.channel_mult)
    layout = CheckpointLayout(
        in_channels=3,
        out_channels=6 if config.learn_sigma else 3,
        model_channels=config.num_channels,
        num_res_blocks=config.num_res_blocks,
        channel_mult=config.channel_mult,
        attention_levels=frozenset(level for level in range(levels)
                                   if config.image_size // 2**level in config.attention_resolutions),
        use_scale_shift_norm=config.use_scale_shift_norm,
        resblock_updown=config.resblock_updown,
    )
    from diffusers import UNet2DModel

    arch = resolve_architecture(config, layout)
    with torch.device(device):  # initialise on the device: ~550M parameters at 256×256
        unet = UNet2DModel(**diffusers_unet_config(arch)).eval()
    return denoiser_from_parts(unet, make_scheduler(config, arch.learn_sigma),
                               timestep_scale=network_timestep_scale(config))


def timm_classifier(name: str, input_size: int, device: torch.device) -> NormalizedClassifier:
    import timm

    with torch.device(device):
        network = timm.create_model(name, pretrained=False, num_classes=1000).eval()
    return NormalizedClassifier(network, (input_size, input_size), IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class GpuCheckSettings:
    classifier: str = "resnet50"
    tiny: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch.compile default: compiles in ~1-2 min; max-autotune takes far longer
    batch_size: int | None = None  # None: sized to memory on CUDA, 64 on CPU
    timed_batches: int = 4
    sigma: float = 0.5
    peak_tflops: float | None = None


def run_gpu_check(settings: GpuCheckSettings, device: torch.device) -> dict:
    """Build the models, size the batch, warm up (and compile), then time whole batches of samples."""
    started = time.perf_counter()
    unet_config = TINY_UNET if settings.tiny else UNET_ARCHITECTURES["imagenet256-uncond"]
    denoiser = guided_denoiser(unet_config, device)
    classifier = timm_classifier("resnet10t" if settings.tiny else settings.classifier,
                                 32 if settings.tiny else 224, device)
    fused = FusedDenoiseClassify(denoiser, classifier, 1000, device=device, batch_size=64)
    shape = (3, unet_config.image_size, unet_config.image_size)
    fused.batch_size = settings.batch_size or batch_size_for_memory(fused, shape, settings.sigma)
    per_sample_flops = flops_per_sample(fused, shape, settings.sigma)
    if settings.compile:
        compile_predict(fused, mode=settings.compile_mode)
    images = np.random.default_rng(0).random((1, *shape), dtype=np.float32)
    samples = {Phase.ESTIMATE: fused.batch_size}
    fused.count(images, [0], [settings.sigma], samples, seed=0)  # warm-up (and compilation)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    warm = time.perf_counter()
    samples = {Phase.ESTIMATE: fused.batch_size * settings.timed_batches}
    counts = fused.count(images, [1], [settings.sigma], samples, seed=0)
    synchronize()
    elapsed = time.perf_counter() - warm
    total = int(counts[Phase.ESTIMATE].sum())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name, settings.peak_tflops) if device.type == "cuda" else None
    return {
        "device": name,
        "denoiser": "guided-diffusion 32x32 tiny" if settings.tiny else "guided-diffusion 256x256 uncond layout",
        "classifier": "resnet10t@32" if settings.tiny else f"{settings.classifier}@224",
        "dtype": "bf16 autocast" if fused.precision == "bf16" else "fp32",
        "compiled": settings.compile,
        "batch_size": fused.batch_size,
        "samples": total,
        "seconds": elapsed,
        "samples_per_s": total / elapsed,
        "setup_and_warmup_s": warm - started,
        **utilization(per_sample_flops, total / elapsed, peak),
    }


@dataclass(frozen=True)
class FinetuneMemorySettings:
    """The ImageNet fine-tuning defaults (pipeline/app/finetune.py): LoRA rank 16, batch 8 per GPU,
    M = 2 denoisings, gradient checkpointing, bf16 autocast with the classifier in bf16."""

    classifier: str = "resnet50"
    tiny: bool = False
    batch_size: int = 8
    lora_rank: int = 16
    gradient_checkpointing: bool = True
    steps: int = 3


def run_finetune_memory_check(settings: FinetuneMemorySettings, device: torch.device) -> dict:
    """Peak GPU memory and time of fine-tuning steps on the ADM-256 layout: what --batch-size the
    ImageNet preset can afford on this GPU (on CPU the same code runs, with no memory figure)."""
    from pipeline.finetune.loss import LossSettings, cascade_finetune_loss
    from pipeline.finetune.train_loop import frozen
    from pipeline.finetune.weights import LoraSettings, trainable_unet
    from pipeline.models.precision import autocast

    unet_config = TINY_UNET if settings.tiny else UNET_ARCHITECTURES["imagenet256-uncond"]
    denoiser = guided_denoiser(unet_config, device)
    if settings.gradient_checkpointing:
        denoiser.unet.enable_gradient_checkpointing()
    denoiser.unet = trainable_unet(denoiser.unet, LoraSettings(settings.lora_rank)).train()
    precision = "bf16" if device.type == "cuda" else "fp32"
    classifier = frozen(timm_classifier("resnet10t" if settings.tiny else settings.classifier,
                                        32 if settings.tiny else 224, device))
    if precision == "bf16":
        classifier = classifier.to(torch.bfloat16)
    parameters = [p for p in denoiser.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    size = unet_config.image_size
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(settings.batch_size, 3, size, size, generator=generator, device=device)
    labels = torch.randint(0, 1000, (settings.batch_size,), generator=generator, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(settings.steps):
        started = time.perf_counter()
        with autocast(device, precision):
            terms = cascade_finetune_loss(denoiser, classifier, images, labels, LossSettings(), generator)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "denoiser": "guided-diffusion 32x32 tiny" if settings.tiny else "guided-diffusion 256x256 uncond layout",
        "classifier": "resnet10t@32" if settings.tiny else f"{settings.classifier}@224",
        "batch_size": settings.batch_size, "lora_rank": settings.lora_rank, "precision": precision,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "trainable_parameters": sum(p.numel() for p in parameters),
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "seconds_per_step_after_first": float(np.mean(times[1:])) if len(times) > 1 else times[0],
        "loss": float(terms.total.detach()),
    }
