"""The fused denoise-classify kernel (docs/denoised-smoothing.md): Monte-Carlo class counts for sample ranges.

This is the only place that turns noise into votes. A request names samples [start, stop) of one
(image row, scale, phase); all requested noise chunks of a call — any mix of images, scales and
phases — are cut into batches of `batch_size` samples, so one UNet forward (per-sample
timestep t*(sigma)) and one classifier forward serve many images and several noise scales at once.
Counts are accumulated on the device with `bincount` (no host sync per batch). Noise is
counter-seeded per (image_id, sigma, phase, chunk) (see noise.py): the votes of a sample range are
identical whatever the packing, the sharding or the order of requests (and in fp32 whatever the
batch size; see `fixed_shape`), so fixed-n, early-exit and adaptive runs share their noise. A chunk
cut across two forwards draws its noise once per piece (at most one extra chunk per forward). No Ray
here: this module can be benchmarked, compiled and tested alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.models.denoiser import OneShotDenoiser
from pipeline.models.precision import Precision, autocast
from pipeline.sampling.noise import NOISE_CHUNK, Phase, chunk_lengths, chunk_noise


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

    @staticmethod
    def whole(rows: np.ndarray, stages: np.ndarray, phase: Phase, total: int) -> VoteRequests:
        """Samples [0, total) of phase `phase` for each (row, stage) pair."""
        count = len(rows)
        return VoteRequests(np.asarray(rows, np.int64), np.asarray(stages, np.int64),
                            np.full(count, int(phase), np.int64), np.zeros(count, np.int64),
                            np.full(count, total, np.int64))

    def __len__(self) -> int:
        return len(self.rows)


def request_pieces(start: int, stop: int, total: int) -> list[tuple[int, int, int]]:
    """(chunk, first, end) for samples [start, stop) of a phase with `total` samples: the samples
    [first, end) of each noise chunk the range touches. A range may start and stop inside a chunk (an
    adaptive run's selection budget below n_select): the kernel still draws the
    chunk's whole noise (its length is fixed by `total`) and uses the slice, so the votes of any range
    are those samples' votes in a run that draws the whole phase."""
    if not 0 <= start < stop <= total:
        raise UserError(f"sample range [{start}, {stop}) is not inside the {total} samples of its phase")
    return [(chunk, max(start - chunk * NOISE_CHUNK, 0), min(stop - chunk * NOISE_CHUNK, NOISE_CHUNK))
            for chunk in range(start // NOISE_CHUNK, -(-stop // NOISE_CHUNK))]


@dataclass(frozen=True)
class _Chunk:
    """Samples [first, end) of one noise chunk of `length` samples (image `row`, scale `stage`) for one request."""

    request: int
    row: int
    stage: int
    phase: Phase
    chunk: int
    length: int
    first: int
    end: int


@dataclass(frozen=True)
class _Piece:
    """Samples [start, stop) of one chunk: a chunk cut across two forwards is two pieces."""

    chunk: _Chunk
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FusedDenoiseClassify(torch.nn.Module):
    """denoise(x + δ) → classifier → argmax, counted per request."""

    def __init__(
        self,
        denoiser: OneShotDenoiser,
        classifier: torch.nn.Module,
        num_classes: int,
        device: torch.device | str | None = None,
        batch_size: int = 1024,
        precision: Precision | None = None,
    ):
        super().__init__()
        self.device = torch.device(device) if device is not None else default_device()
        self.denoiser = denoiser.to(self.device).eval()
        self.classifier = classifier.to(self.device).eval()
        self.num_classes = num_classes
        self.batch_size = batch_size
        # None: bf16 on GPU, exact fp32 on CPU (what the reference forwards in the tests compare with).
        self.precision: Precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        # Reduced-precision kernels are chosen per input shape (oneDNN's AMX kernels on CPU, cuBLAS and
        # cuDNN on GPU) and round differently, so a sample's bf16 vote can change with the size of the
        # forward it lands in. In bf16 every forward therefore has exactly `batch_size` rows (the last
        # one padded): a vote then depends on the batch size alone, not on packing, sharding, strategy
        # or resume. fp32 forwards are row-independent and skip the padding.
        self.fixed_shape = self.precision == "bf16"
        # NHWC convolutions: cuDNN's tensor-core kernels on GPU, and oneDNN's blocked kernels for the
        # classifier on CPU. On CPU the UNet stays NCHW: its GroupNorm and attention are slower in NHWC
        # (digits UNet, one core: 0.92 vs 1.02 s per 1,024 samples in fp32, 0.47 vs 1.10 in bf16).
        self.denoiser_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.denoiser.to(memory_format=self.denoiser_format)
        self.classifier.to(memory_format=torch.channels_last)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Class predictions for noisy images in image space: one UNet and one classifier call."""
        with autocast(self.device, self.precision):
            denoised = self.denoiser(noisy.contiguous(memory_format=self.denoiser_format), timesteps)
            return self.classifier(denoised.contiguous(memory_format=torch.channels_last)).argmax(dim=1)

    def device_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Checked (N, C, H, W) float32 images on this kernel's device."""
        images = images.float() if torch.is_tensor(images) else torch.tensor(np.asarray(images), dtype=torch.float32)
        if images.ndim != 4:
            raise UserError(f"images must be (N, C, H, W); got shape {tuple(images.shape)}")
        if images.shape[1] != self.denoiser.in_channels:
            raise UserError(
                f"images have {images.shape[1]} channels but the denoiser expects {self.denoiser.in_channels}"
            )
        return images.to(self.device)

    def _batches(self, chunks: list[_Chunk]) -> Iterator[list[_Piece]]:
        """Cut the chunks' requested samples, in order, into batches of exactly `batch_size` (the last one shorter)."""
        batch: list[_Piece] = []
        filled = 0
        for chunk in chunks:
            start = chunk.first
            while start < chunk.end:
                stop = min(chunk.end, start + self.batch_size - filled)
                batch.append(_Piece(chunk, start, stop))
                filled += stop - start
                start = stop
                if filled == self.batch_size:
                    yield batch
                    batch, filled = [], 0
        if batch:
            yield batch

    def _padded(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With fixed shapes, a short last batch is filled up to `batch_size` rows with its first sample."""
        missing = self.batch_size - len(noisy) if self.fixed_shape else 0
        if missing <= 0:
            return noisy, timesteps
        return (torch.cat([noisy, noisy[:1].expand(missing, *noisy.shape[1:])]),
                torch.cat([timesteps, timesteps[:1].expand(missing)]))

    @torch.inference_mode()
    def votes(
        self,
        images: torch.Tensor,
        image_ids: Sequence[int],
        sigmas: Sequence[float],
        totals: Mapping[Phase, int],
        seed: int,
        requests: VoteRequests,
    ) -> np.ndarray:
        """(R, num_classes) int64 class counts, one row per request.

        `images` come from `device_images`; `totals[phase]` is the phase's full sample count, which
        fixes the chunk lengths (a range's votes equal those samples' votes in any run with the same
        seed and totals)."""
        if len(image_ids) != len(images):
            raise UserError(f"{len(image_ids)} image ids for {len(images)} images")
        device, classes = self.device, self.num_classes
        sigma_values = [float(s) for s in sigmas]
        timesteps = [self.denoiser.timestep_for_sigma(s) for s in sigma_values]
        chunks = []
        for index, (row, stage, phase, start, stop) in enumerate(zip(
                requests.rows, requests.stages, requests.phases, requests.starts, requests.stops)):
            phase = Phase(int(phase))
            lengths = chunk_lengths(int(totals[phase]))
            chunks += [_Chunk(index, int(row), int(stage), phase, chunk, lengths[chunk], first, end)
                       for chunk, first, end in request_pieces(int(start), int(stop), int(totals[phase]))]
        counts = torch.zeros(len(requests) * classes, dtype=torch.int64, device=device)
        shape = tuple(images.shape[1:])
        for batch in self._batches(chunks):
            noise = torch.cat([chunk_noise(shape, p.chunk.length, seed, int(image_ids[p.chunk.row]),
                                           sigma_values[p.chunk.stage], p.chunk.phase, p.chunk.chunk,
                                           device)[p.start:p.stop] for p in batch])
            lengths = torch.tensor([p.length for p in batch], device=device)

            def per_sample(values: list, dtype=None) -> torch.Tensor:
                return torch.tensor(values, device=device, dtype=dtype).repeat_interleave(lengths)

            request = per_sample([p.chunk.request for p in batch])
            sigma = per_sample([sigma_values[p.chunk.stage] for p in batch], torch.float32)
            noisy = images[per_sample([p.chunk.row for p in batch])] + sigma.view(-1, 1, 1, 1) * noise
            steps = per_sample([timesteps[p.chunk.stage] for p in batch])
            predictions = self.predict(*self._padded(noisy, steps))[: len(noisy)]
            counts += torch.bincount(request * classes + predictions, minlength=counts.numel())
        return counts.view(len(requests), classes).cpu().numpy()

    def count(
        self,
        images: np.ndarray | torch.Tensor,
        image_ids: Sequence[int],
        sigmas: Sequence[float],
        samples: Mapping[Phase, int],
        seed: int,
    ) -> dict[Phase, np.ndarray]:
        """Counts of every sample of every (image, sigma): (num_images, num_sigmas, num_classes) per phase."""
        images = self.device_images(images)
        rows, stages = np.divmod(np.arange(len(images) * len(sigmas)), len(sigmas))
        phases = list(samples)
        requests = VoteRequests.concat([VoteRequests.whole(rows, stages, phase, samples[phase]) for phase in phases])
        votes = self.votes(images, image_ids, sigmas, samples, seed, requests)
        per_phase = votes.reshape(len(phases), len(images), len(sigmas), self.num_classes)
        return {phase: per_phase[index] for index, phase in enumerate(phases)}
