"""Throughput options for the fused step: static-shape torch.compile, batch sizing.

The fused step already runs channels_last, on-device noise and on-device `bincount` counts, plus bf16
autocast on CUDA (pipeline/sampling/kernel.py). What is left for peak throughput lives here, as opt-in wrappers,
so the fused step stays plain eager PyTorch (and exact fp32 on CPU) unless a caller asks:

- `compile_predict`: `FusedDenoiseClassify.count` packs whole noise chunks into batches of
  batch_size … batch_size + NOISE_CHUNK − 1 samples (and a smaller last batch). Padding every batch
  to that one maximum gives torch.compile a single static shape: one compilation, and with
  mode="reduce-overhead" one CUDA graph replayed for every batch. The padding rows are sliced off
  before counting, so counts are unchanged.
- `batch_size_for_memory`: the largest batch that fits, from the peak memory of a probe batch.
- `tuned_copy`: a second fused step with its own copies of the models and all of the above.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.sampling.noise import NOISE_CHUNK


def tuned_copy(fused: FusedDenoiseClassify, compile_mode: str | None = None) -> FusedDenoiseClassify:
    """A fused step on deep copies of `fused`'s models with compile_predict (copies, so that `fused`
    itself keeps running eager)."""
    tuned = FusedDenoiseClassify(copy.deepcopy(fused.denoiser), copy.deepcopy(fused.classifier), fused.num_classes,
                                 fused.device, fused.batch_size, fused.precision)
    compile_predict(tuned, mode=compile_mode)
    return tuned


def static_batch_size(batch_size: int) -> int:
    """The largest batch `FusedDenoiseClassify.count` can form with this batch_size."""
    return batch_size + NOISE_CHUNK - 1


def compile_predict(fused: FusedDenoiseClassify, mode: str | None = None,
                    compiler: Callable[..., Callable] = torch.compile) -> None:
    """Replace `fused.predict` by a compiled, padded-to-static-shape version (in place).

    `compiler` is torch.compile; tests pass an identity to check the padding alone."""
    eager = type(fused).predict.__get__(fused)
    compiled = compiler(eager, mode=mode, dynamic=False)
    size = static_batch_size(fused.batch_size)

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        count = len(noisy)
        if count > size:  # a caller with its own batching: run it as is (compiles that shape once)
            return compiled(noisy, timesteps)
        padded = torch.cat([noisy, noisy[:1].expand(size - count, *noisy.shape[1:])])
        padded_steps = torch.cat([timesteps, timesteps[:1].expand(size - count)])
        return compiled(padded, padded_steps)[:count].clone()

    fused.predict = predict


def batch_size_for_memory(
    fused: FusedDenoiseClassify,
    sample_shape: tuple[int, ...],
    sigma: float,
    memory_fraction: float = 0.7,
    probe_batch: int = 8,
    max_batch: int = 4096,
) -> int:
    """Samples per forward that fill `memory_fraction` of the free GPU memory (CPU: unchanged).

    Activation memory grows linearly with the batch, so the peak of one probe batch, minus what is
    resident before it, gives the per-sample cost. Rounded down to whole noise chunks.
    """
    if fused.device.type != "cuda":
        return fused.batch_size
    torch.cuda.synchronize(fused.device)
    torch.cuda.reset_peak_memory_stats(fused.device)
    resident = torch.cuda.memory_allocated(fused.device)
    noisy = torch.rand((probe_batch, *sample_shape), device=fused.device)
    steps = torch.full((probe_batch,), fused.denoiser.timestep_for_sigma(sigma), device=fused.device)
    with torch.inference_mode():
        type(fused).predict(fused, noisy, steps)
    torch.cuda.synchronize(fused.device)
    per_sample = max(1, (torch.cuda.max_memory_allocated(fused.device) - resident) / probe_batch)
    free, _ = torch.cuda.mem_get_info(fused.device)
    fitting = int(memory_fraction * free / per_sample)
    return max(NOISE_CHUNK, min(max_batch, fitting) // NOISE_CHUNK * NOISE_CHUNK)
