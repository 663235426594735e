"""Vote sources: class counts for arbitrary sample ranges of (image, scale, phase), on demand.

`FusedDenoiseClassify.count` always draws samples [0, n) of every (image, scale). Adaptive sampling
needs "the next block of samples" of only the (image, scale) pairs still undecided, at different
scales in one batch. A request names a sample range [start, stop) of one (image row, stage, phase);
ranges are made of whole noise chunks (pipeline/noise.py), so the votes of a range are exactly the
votes those samples get inside a fixed-n run with the same seed: adaptive and fixed-n runs share
their noise (common random numbers), and results never depend on batching or on the round schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.fused import FusedDenoiseClassify
from pipeline.noise import NOISE_CHUNK, Phase, chunk_lengths, chunk_noise


@dataclass(frozen=True)
class VoteRequests:
    """R requests: samples [starts, stops) of image `rows` at scale index `stages` in `phases`."""

    rows: np.ndarray
    stages: np.ndarray
    phases: np.ndarray
    starts: np.ndarray
    stops: np.ndarray

    @staticmethod
    def concat(parts: Sequence[VoteRequests]) -> VoteRequests:
        return VoteRequests(*(np.concatenate([getattr(p, f) for p in parts]).astype(np.int64)
                              for f in ("rows", "stages", "phases", "starts", "stops")))

    def __len__(self) -> int:
        return len(self.rows)


class VoteSource(Protocol):
    num_classes: int

    def votes(self, requests: VoteRequests) -> np.ndarray:
        """(R, num_classes) int64 class counts, one row per request."""
        ...


def request_chunks(start: int, stop: int, total: int) -> range:
    """Chunk indices covering samples [start, stop) of a phase with `total` samples."""
    if not (0 <= start < stop <= total) or start % NOISE_CHUNK or (stop % NOISE_CHUNK and stop != total):
        raise UserError(f"sample range [{start}, {stop}) of {total} does not align with noise chunks of {NOISE_CHUNK}")
    return range(start // NOISE_CHUNK, -(-stop // NOISE_CHUNK))


class FusedVoteSource:
    """Votes from the fused model: `fused.predict` on whole counter-seeded noise chunks, packed into
    batches of about `fused.batch_size` samples across requests (any mix of images, scales, phases)."""

    def __init__(
        self,
        fused: FusedDenoiseClassify,
        images: np.ndarray,
        image_ids: Sequence[int],
        sigmas: Sequence[float],
        totals: Mapping[Phase, int],
        seed: int,
    ):
        self.fused = fused
        self.num_classes = fused.num_classes
        self.images = torch.as_tensor(np.asarray(images), dtype=torch.float32).to(fused.device)
        self.image_ids = [int(i) for i in image_ids]
        self.sigmas = [float(s) for s in sigmas]
        self.timesteps = [fused.denoiser.timestep_for_sigma(s) for s in self.sigmas]
        self.totals = {Phase(p): int(n) for p, n in totals.items()}
        self.seed = seed

    def _units(self, requests: VoteRequests) -> list[tuple[int, int, int, Phase, int, int]]:
        """(request index, row, stage, phase, chunk, chunk length) for every chunk requested."""
        units = []
        for index, (row, stage, phase, start, stop) in enumerate(zip(
                requests.rows, requests.stages, requests.phases, requests.starts, requests.stops)):
            phase = Phase(int(phase))
            lengths = chunk_lengths(self.totals[phase])
            units += [(index, int(row), int(stage), phase, chunk, lengths[chunk])
                      for chunk in request_chunks(int(start), int(stop), self.totals[phase])]
        return units

    @torch.inference_mode()
    def votes(self, requests: VoteRequests) -> np.ndarray:
        device, classes = self.fused.device, self.num_classes
        counts = torch.zeros(len(requests) * classes, dtype=torch.int64, device=device)
        shape = tuple(self.images.shape[1:])
        units = self._units(requests)
        start = 0
        while start < len(units):
            stop, filled = start, 0
            while stop < len(units) and filled < self.fused.batch_size:
                filled += units[stop][5]
                stop += 1
            batch = units[start:stop]
            start = stop
            noise = torch.cat([chunk_noise(shape, length, self.seed, self.image_ids[row], self.sigmas[stage],
                                           phase, chunk, device)
                               for _, row, stage, phase, chunk, length in batch])
            lengths = torch.tensor([u[5] for u in batch], device=device)
            per_sample = {name: torch.tensor(values, device=device).repeat_interleave(lengths)
                          for name, values in (("request", [u[0] for u in batch]), ("row", [u[1] for u in batch]),
                                               ("sigma", [self.sigmas[u[2]] for u in batch]),
                                               ("step", [self.timesteps[u[2]] for u in batch]))}
            noisy = self.images[per_sample["row"]] + per_sample["sigma"].view(-1, 1, 1, 1) * noise
            predictions = self.fused.predict(noisy, per_sample["step"])
            counts += torch.bincount(per_sample["request"] * classes + predictions, minlength=counts.numel())
        return counts.view(len(requests), classes).cpu().numpy()


class CachedVoteSource:
    """Remembers the votes of every chunk it has served, so that two strategies compared on the same
    images (fixed n and adaptive) pay for each chunk once; the votes are identical either way."""

    def __init__(self, inner: FusedVoteSource):
        self.inner = inner
        self.num_classes = inner.num_classes
        self.cache: dict[tuple[int, int, int, int], np.ndarray] = {}

    def votes(self, requests: VoteRequests) -> np.ndarray:
        keys_per_request = []
        for row, stage, phase, start, stop in zip(requests.rows, requests.stages, requests.phases,
                                                  requests.starts, requests.stops):
            total = self.inner.totals[Phase(int(phase))]
            keys_per_request.append([(int(row), int(stage), int(phase), chunk)
                                     for chunk in request_chunks(int(start), int(stop), total)])
        missing = sorted({key for keys in keys_per_request for key in keys} - self.cache.keys())
        if missing:
            totals = [self.inner.totals[Phase(key[2])] for key in missing]
            chunk_requests = VoteRequests(
                rows=np.array([k[0] for k in missing]), stages=np.array([k[1] for k in missing]),
                phases=np.array([k[2] for k in missing]),
                starts=np.array([k[3] * NOISE_CHUNK for k in missing]),
                stops=np.array([min((k[3] + 1) * NOISE_CHUNK, total) for k, total in zip(missing, totals)]),
            )
            self.cache.update(zip(missing, self.inner.votes(chunk_requests)))
        return np.array([np.sum([self.cache[key] for key in keys], axis=0) for keys in keys_per_request],
                        dtype=np.int64).reshape(len(requests), self.num_classes)
