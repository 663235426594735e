"""FLOPs per Monte-Carlo sample and model FLOP utilization (MFU) of the fused step.

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s, where achieved = FLOPs per sample
(counted by torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions and attention, the
standard MFU convention; norms and activations are not counted) × measured samples per second.
Peaks are the vendors' dense (no sparsity) bf16 tensor-core figures.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.sampling.kernel import FusedDenoiseClassify

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s); first match wins, so the
    # more specific names come first.
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("A6000", 155.0),
)


def peak_bf16_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s for a device name, or None when unknown (MFU is then not reported)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def flops_per_sample(fused: FusedDenoiseClassify, sample_shape: tuple[int, ...], sigma: float,
                     probe_batch: int = 4) -> float:
    """FLOPs of one denoise + classify call per sample, counted on a small probe batch.

    Calls the class's own `predict`, so an instance-level torch.compile wrapper is bypassed (the
    compiled graph does the same arithmetic)."""
    noisy = torch.rand((probe_batch, *sample_shape), device=fused.device)
    steps = torch.full((probe_batch,), fused.denoiser.timestep_for_sigma(sigma), device=fused.device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        type(fused).predict(fused, noisy, steps)
    return counter.get_total_flops() / probe_batch


def utilization(flops_per_sample_: float, samples_per_second: float, peak_flops: float | None) -> dict:
    """Achieved FLOP/s, and MFU when the peak is known."""
    achieved = flops_per_sample_ * samples_per_second
    return {
        "flops_per_sample": flops_per_sample_,
        "achieved_flops_per_s": achieved,
        "peak_bf16_flops_per_s": peak_flops,
        "mfu": achieved / peak_flops if peak_flops else None,
    }
