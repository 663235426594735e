"""Vote sources: the kernel bound to one batch of images, answering `votes(requests)` on demand.

A sampling strategy (strategies.py, adaptive.py) asks for the votes of arbitrary sample ranges of
(image, scale, phase) — the whole first scale for every image, the next scale for a few, the next
adaptive round for the undecided ones — without knowing what computes them: the fused kernel on a
device, or a cache of it when two strategies are compared on the same noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.sampling.kernel import FusedDenoiseClassify, VoteRequests, request_pieces
from pipeline.sampling.noise import NOISE_CHUNK, Phase


class VoteSource(Protocol):
    num_classes: int

    def votes(self, requests: VoteRequests) -> np.ndarray:
        """(R, num_classes) int64 class counts, one row per request."""
        ...


class FusedVoteSource:
    """Votes from the fused kernel for one batch of images (kept on the kernel's device)."""

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
        self.images = fused.device_images(images)
        self.image_ids = [int(i) for i in image_ids]
        self.sigmas = [float(s) for s in sigmas]
        self.totals = {Phase(p): int(n) for p, n in totals.items()}
        self.seed = seed

    def votes(self, requests: VoteRequests) -> np.ndarray:
        if len(requests) == 0:
            return np.zeros((0, self.num_classes), np.int64)
        return self.fused.votes(self.images, self.image_ids, self.sigmas, self.totals, self.seed, requests)


class CachedVoteSource:
    """Remembers the votes of every chunk (or part of a chunk) it has served, so that two strategies
    compared on the same images (fixed n and adaptive) pay for each once; the votes are identical
    either way. A whole chunk is keyed (row, stage, phase, chunk), a part of one (a sub-chunk range,
    `request_pieces`) (row, stage, phase, chunk, first, end)."""

    def __init__(self, inner: FusedVoteSource):
        self.inner = inner
        self.num_classes = inner.num_classes
        self.cache: dict[tuple[int, ...], np.ndarray] = {}

    def votes(self, requests: VoteRequests) -> np.ndarray:
        keys_per_request = []
        for row, stage, phase, start, stop in zip(requests.rows, requests.stages, requests.phases,
                                                  requests.starts, requests.stops):
            total = self.inner.totals[Phase(int(phase))]
            keys = []
            for chunk, first, end in request_pieces(int(start), int(stop), total):
                whole = first == 0 and end == min(NOISE_CHUNK, total - chunk * NOISE_CHUNK)
                address = (int(row), int(stage), int(phase), chunk)
                keys.append(address if whole else (*address, first, end))
            keys_per_request.append(keys)
        missing = sorted({key for keys in keys_per_request for key in keys} - self.cache.keys())
        if missing:
            totals = [self.inner.totals[Phase(key[2])] for key in missing]
            bounds = [key[4:] if len(key) == 6 else (0, min(NOISE_CHUNK, total - key[3] * NOISE_CHUNK))
                      for key, total in zip(missing, totals)]
            chunk_requests = VoteRequests(
                rows=np.array([k[0] for k in missing]), stages=np.array([k[1] for k in missing]),
                phases=np.array([k[2] for k in missing]),
                starts=np.array([k[3] * NOISE_CHUNK + first for k, (first, _) in zip(missing, bounds)]),
                stops=np.array([k[3] * NOISE_CHUNK + end for k, (_, end) in zip(missing, bounds)]),
            )
            self.cache.update(zip(missing, self.inner.votes(chunk_requests)))
        return np.array([np.sum([self.cache[key] for key in keys], axis=0) for keys in keys_per_request],
                        dtype=np.int64).reshape(len(requests), self.num_classes)

    def save(self, path: str | Path) -> None:
        """Write every cached chunk's votes to an .npz file (keys (N, 4): row, stage, phase, chunk; parts of
        chunks under piece_keys (N, 6): the same and first, end)."""
        keys = sorted(k for k in self.cache if len(k) == 4)
        pieces = sorted(k for k in self.cache if len(k) == 6)
        np.savez(path, keys=np.array(keys, np.int64).reshape(-1, 4),
                 votes=np.array([self.cache[k] for k in keys], np.int64).reshape(-1, self.num_classes),
                 piece_keys=np.array(pieces, np.int64).reshape(-1, 6),
                 piece_votes=np.array([self.cache[k] for k in pieces], np.int64).reshape(-1, self.num_classes))

    def load(self, path: str | Path) -> None:
        """Add the chunks of a file written by `save`. Votes are a pure function of the models, the seed
        and the chunk's address, so a file from a run with the same models, images, sigmas, seed and
        phase totals serves exactly the votes the kernel would compute (the caller checks those match)."""
        with np.load(path) as data:
            self.cache.update(zip(map(tuple, data["keys"].tolist()), data["votes"]))
            if "piece_keys" in data:
                self.cache.update(zip(map(tuple, data["piece_keys"].tolist()), data["piece_votes"]))
