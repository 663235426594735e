"""Counter-based Gaussian noise: the noise of a sample depends only on where it sits, not on batching.

Every sample is addressed by (seed, image_id, sigma, phase, chunk, index-in-chunk). A chunk of
`NOISE_CHUNK` samples is drawn from a generator seeded by a hash of the first five, so the counts an
image gets are identical whatever the batch size, the number of actors or the order of work, and a
resumed run redraws exactly the noise an interrupted run would have used.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import torch

NOISE_CHUNK = 64
"""Samples per noise chunk. Changing it changes every count, so it is a constant, not an option."""


class Phase(IntEnum):
    """Which Monte-Carlo sample set the noise is for; select and estimate must be independent."""

    SELECT = 0
    ESTIMATE = 1


def chunk_seed(seed: int, image_id: int, sigma: float, phase: Phase, chunk: int) -> int:
    """A 63-bit seed for one chunk; sigma enters by its exact float64 bits, so 0.5 and 0.50 agree."""
    key = f"{seed}:{image_id}:{float(sigma).hex()}:{int(phase)}:{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def chunk_noise(
    shape: tuple[int, ...],
    count: int,
    seed: int,
    image_id: int,
    sigma: float,
    phase: Phase,
    chunk: int,
    device: torch.device,
) -> torch.Tensor:
    """Standard-normal noise of shape (count, *shape) for one chunk, drawn on `device`.

    `count` must be the chunk's full length (see `chunk_lengths`): torch's samplers fill tensors in
    blocks, so a shorter draw from the same seed is not a prefix of a longer one.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(chunk_seed(seed, image_id, sigma, phase, chunk))
    return torch.randn((count, *shape), generator=generator, device=device)


def chunk_lengths(num_samples: int) -> list[int]:
    """Lengths of the chunks that `num_samples` samples are split into (all full but the last)."""
    full, rest = divmod(num_samples, NOISE_CHUNK)
    return [NOISE_CHUNK] * full + ([rest] if rest else [])
