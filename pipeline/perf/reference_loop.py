"""The baseline the fused step is measured against: the published certifiers' sampling loop.

Cohen et al.'s `Smooth._sample_noise` (reused unchanged by Carlini et al. and Jeong & Shin) certifies
one image at one scale at a time: N0 selection samples, then N estimation samples, each drawn in
fixed batches of copies of the image, in fp32, with the predictions copied to the host and counted
in a Python loop after every batch. This module reproduces that structure with *our* models and
noise model (same denoiser, classifier, t*(sigma)), so that a benchmark ratio measures the sampling
structure only. It is for benchmarking; certification never uses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.models.denoiser import OneShotDenoiser
from pipeline.sampling.noise import Phase


def _count_array(predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Cohen's `_count_arr`: one Python increment per prediction."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for index in predictions:
        counts[index] += 1
    return counts


def sample_noise_counts(
    denoiser: OneShotDenoiser,
    classifier: torch.nn.Module,
    image: torch.Tensor,
    sigma: float,
    num: int,
    batch_size: int,
    num_classes: int,
) -> np.ndarray:
    """Class counts of `num` noisy copies of one (C, H, W) image, drawn `batch_size` at a time."""
    timestep = denoiser.timestep_for_sigma(sigma)
    counts = np.zeros(num_classes, dtype=np.int64)
    with torch.no_grad():
        remaining = num
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = image.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            steps = torch.full((this_batch,), timestep, dtype=torch.long, device=batch.device)
            predictions = classifier(denoiser(batch + noise, steps)).argmax(1)
            counts += _count_array(predictions.cpu().numpy(), num_classes)
    return counts


def reference_counts(
    denoiser: OneShotDenoiser,
    classifier: torch.nn.Module,
    images: np.ndarray,
    sigmas: Sequence[float],
    n_select: int,
    n: int,
    batch_size: int,
    num_classes: int,
    device: torch.device | str,
    seed: int = 0,
) -> dict[Phase, np.ndarray]:
    """Counts (num_images, num_sigmas, num_classes) per phase, image by image, scale by scale."""
    torch.manual_seed(seed)
    denoiser, classifier = denoiser.to(device).eval(), classifier.to(device).eval()
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32, device=device)
    shape = (len(images), len(sigmas), num_classes)
    select, estimate = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for row, image in enumerate(images):
        for scale, sigma in enumerate(sigmas):
            select[row, scale] = sample_noise_counts(denoiser, classifier, image, float(sigma), n_select,
                                                     batch_size, num_classes)
            estimate[row, scale] = sample_noise_counts(denoiser, classifier, image, float(sigma), n,
                                                       batch_size, num_classes)
    return {Phase.SELECT: select, Phase.ESTIMATE: estimate}
