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
from pipeline.sampling.noise import NOISE_CHUNK, Phase, chunk_lengths


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
    """Remembers the votes of every piece of a noise chunk it has served, so that two strategies compared
    on the same images (fixed n and adaptive) pay for each once; the votes are identical either way.
    A piece is keyed (row, stage, phase, chunk, first, end): samples [first, end) of that chunk
    (`request_pieces`; a whole chunk is [0, its length))."""

    def __init__(self, inner: FusedVoteSource):
        self.inner = inner
        self.num_classes = inner.num_classes
        self.cache: dict[tuple[int, int, int, int, int, int], np.ndarray] = {}

    def votes(self, requests: VoteRequests) -> np.ndarray:
        keys_per_request = [
            [(int(row), int(stage), int(phase), *piece)
             for piece in request_pieces(int(start), int(stop), self.inner.totals[Phase(int(phase))])]
            for row, stage, phase, start, stop in zip(requests.rows, requests.stages, requests.phases,
                                                      requests.starts, requests.stops)]
        missing = sorted({key for keys in keys_per_request for key in keys} - self.cache.keys())
        if missing:
            rows, stages, phases, chunks, firsts, ends = (np.array(column) for column in zip(*missing))
            offsets = chunks * NOISE_CHUNK
            self.cache.update(zip(missing, self.inner.votes(VoteRequests(rows, stages, phases, offsets + firsts,
                                                                         offsets + ends))))
        return np.array([np.sum([self.cache[key] for key in keys], axis=0) for keys in keys_per_request],
                        dtype=np.int64).reshape(len(requests), self.num_classes)

    def save(self, path: str | Path) -> None:
        """Write every cached piece's votes to an .npz file (keys (N, 6): row, stage, phase, chunk, first, end)."""
        keys = sorted(self.cache)
        np.savez(path, keys=np.array(keys, np.int64).reshape(-1, 6),
                 votes=np.array([self.cache[k] for k in keys], np.int64).reshape(-1, self.num_classes))

    def load(self, path: str | Path) -> None:
        """Add the pieces of a file written by `save`. Votes are a pure function of the models, the seed
        and the piece's address, so a file from a run with the same models, images, sigmas, seed and
        phase totals serves exactly the votes the kernel would compute (the caller checks those match).
        Files from before pieces hold whole chunks keyed (row, stage, phase, chunk)."""
        with np.load(path) as data:
            keys = data["keys"].tolist()
            if data["keys"].shape[1] == 4:
                lengths = {phase: chunk_lengths(total) for phase, total in self.inner.totals.items()}
                keys = [(*key, 0, lengths[Phase(key[2])][key[3]]) for key in keys]
            self.cache.update(zip(map(tuple, keys), data["votes"]))
