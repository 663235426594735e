"""Sampling strategies: which (image, scale) cells of one batch get votes, decided inside the batch.

A strategy is resolved once from the run's configuration (`make_strategy`) and then owns every
sampling decision: nothing else asks whether a run samples early-exit, all-scales or adaptively.

- `EarlyExit` (the certify task, and the predict task with its prediction test): scale 1 for every image of the batch, then
  the routing rule (pipeline/stats, per image, from that image's own counts) picks the images that
  need scale 2, and so on. Each image's decision needs only its own counts because the levels
  depend only on the number of scales.
- `AllScales`: every scale for every image, in one packed request (single-scale baselines).
- `Adaptive`: rounds of votes until each (image, scale) is settled (sampling/adaptive.py).

`sample` yields, after each stage, the cells it has just filled, so the caller can persist them
before the next stage starts: a preempted run loses at most one stage of one batch. Cells already
present (a resumed run's rows on disk) are never sampled again; the routing is applied to them as
to fresh votes, so a resumed image continues from the first stage it still needs. `pending` is the
same walk without sampling: which images still need any cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.config import CertifyConfig
from pipeline.sampling.adaptive import SamplingOutcome, run_adaptive
from pipeline.sampling.kernel import VoteRequests
from pipeline.sampling.noise import Phase
from pipeline.sampling.votes import VoteSource
from pipeline.stats.cascade import certify_cascade, needs_next_stage
from pipeline.stats.prediction import predict_cascade


@dataclass
class BatchCounts:
    """Votes of one batch: (M, K, C) per phase and which (image, scale) cells hold votes."""

    select: np.ndarray
    estimate: np.ndarray
    present: np.ndarray  # bool (M, K)

    @staticmethod
    def empty(num_images: int, num_scales: int, num_classes: int) -> BatchCounts:
        shape = (num_images, num_scales, num_classes)
        return BatchCounts(np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                           np.zeros(shape[:2], dtype=bool))


class Strategy(Protocol):
    def sample(self, source: VoteSource, counts: BatchCounts) -> Iterator[np.ndarray]:
        """Fill `counts` in place; after each stage yield the (M, K) mask of cells just filled."""
        ...

    def pending(self, counts: BatchCounts) -> np.ndarray:
        """(M,) True where an image still needs a cell that `counts` does not hold."""
        ...


class _StageRule(Protocol):
    def __call__(self, counts: BatchCounts, rows: np.ndarray, stage: int) -> np.ndarray:
        """Of `rows` (which needed stages < stage), those that need `stage` too."""
        ...


@dataclass(frozen=True)
class EarlyExit:
    """Scales highest first; after each, the stage rule decides per image whether the next is needed."""

    num_scales: int
    n_select: int
    n: int
    needs_stage: _StageRule

    def _walk(self, counts: BatchCounts, source: VoteSource | None) -> Iterator[tuple[int, np.ndarray]]:
        """(stage, rows that need it and lack it); with a source those rows are sampled first."""
        rows = np.arange(len(counts.present))
        for stage in range(self.num_scales):
            if stage:
                rows = rows[self.needs_stage(counts, rows, stage)]
            if rows.size == 0:
                return
            missing = rows[~counts.present[rows, stage]]
            if source is not None and missing.size:
                _fill(source, counts, missing, np.full(missing.size, stage), self.n_select, self.n)
            yield stage, missing
            if source is None:
                rows = rows[counts.present[rows, stage]]  # the rest cannot be routed further yet

    def sample(self, source: VoteSource, counts: BatchCounts) -> Iterator[np.ndarray]:
        for stage, filled in self._walk(counts, source):
            if filled.size:
                yield _mask(counts, filled, np.full(filled.size, stage))

    def pending(self, counts: BatchCounts) -> np.ndarray:
        pending = np.zeros(len(counts.present), dtype=bool)
        for _, missing in self._walk(counts, None):
            pending[missing] = True
        return pending


@dataclass(frozen=True)
class AllScales:
    """Every scale of every image, in one packed request."""

    n_select: int
    n: int

    def sample(self, source: VoteSource, counts: BatchCounts) -> Iterator[np.ndarray]:
        rows, stages = np.nonzero(~counts.present)
        if rows.size:
            _fill(source, counts, rows, stages, self.n_select, self.n)
            yield _mask(counts, rows, stages)

    def pending(self, counts: BatchCounts) -> np.ndarray:
        return ~counts.present.all(axis=1)


@dataclass(frozen=True)
class Adaptive:
    """Rounds until settled; an image's cells are written together once it stops, so an image with
    any cell on disk is done."""

    config: CertifyConfig

    def sample(self, source: VoteSource, counts: BatchCounts) -> Iterator[np.ndarray]:
        rows = np.flatnonzero(self.pending(counts))
        if rows.size == 0:
            return
        outcome = run_adaptive(_RowSubset(source, rows), len(rows), self.config)
        counts.select[rows], counts.estimate[rows] = outcome.select_counts, outcome.estimate_counts
        filled = np.zeros_like(counts.present)
        filled[rows] = outcome.consulted
        counts.present |= filled
        yield filled

    def pending(self, counts: BatchCounts) -> np.ndarray:
        return ~counts.present.any(axis=1)


class _RowSubset:
    """A vote source restricted to some rows of the batch (renumbered 0..len(rows)-1)."""

    def __init__(self, inner: VoteSource, rows: np.ndarray):
        self.inner, self.rows, self.num_classes = inner, rows, inner.num_classes

    def votes(self, requests: VoteRequests) -> np.ndarray:
        return self.inner.votes(VoteRequests(self.rows[requests.rows], requests.stages, requests.phases,
                                             requests.starts, requests.stops))


def _fill(source: VoteSource, counts: BatchCounts, rows: np.ndarray, stages: np.ndarray, n_select: int,
          n: int) -> None:
    """Sample the whole selection and estimation sets of the given cells in one request."""
    parts = [VoteRequests.whole(rows, stages, Phase.ESTIMATE, n)]
    if n_select:
        parts.append(VoteRequests.whole(rows, stages, Phase.SELECT, n_select))
    votes = source.votes(VoteRequests.concat(parts))
    counts.estimate[rows, stages] = votes[: len(rows)]
    if n_select:
        counts.select[rows, stages] = votes[len(rows):]
    counts.present[rows, stages] = True


def _mask(counts: BatchCounts, rows: np.ndarray, stages: np.ndarray) -> np.ndarray:
    mask = np.zeros_like(counts.present)
    mask[rows, stages] = True
    return mask


def sample_totals(config: CertifyConfig) -> dict[Phase, int]:
    """Samples per phase that fix the noise chunks (the adaptive estimation phase runs up to n_max)."""
    return {Phase.SELECT: config.n_select, Phase.ESTIMATE: config.n}


def make_strategy(config: CertifyConfig) -> Strategy:
    """The strategy for a run's configuration: the only place its task and strategy pick the sampling."""
    num_scales = len(config.sigmas)
    if config.task == "predict":
        def predict_rule(counts: BatchCounts, rows: np.ndarray, stage: int) -> np.ndarray:
            _, decided_stage = predict_cascade(counts.estimate[rows, :stage], config.image_alpha)
            return decided_stage < 0

        return EarlyExit(num_scales, 0, config.n, predict_rule)
    if config.strategy == "all_scales":
        return AllScales(config.n_select, config.n)
    if config.strategy == "adaptive":
        return Adaptive(config)

    def certify_rule(counts: BatchCounts, rows: np.ndarray, stage: int) -> np.ndarray:
        return needs_next_stage(counts.select[rows, :stage], counts.estimate[rows, :stage], num_scales, config.rule)

    return EarlyExit(num_scales, config.n_select, config.n, certify_rule)


def run_fixed(source: VoteSource, num_images: int, config: CertifyConfig) -> SamplingOutcome:
    """The fixed-n early-exit cascade of `config` over `source`, as the actors run it: the baseline
    adaptive sampling is measured against, on the same noise chunks. `rounds` counts the stages sampled."""
    config = config.replace(strategy="early_exit", target_radii=(), routing=config.routing)
    counts = BatchCounts.empty(num_images, len(config.sigmas), source.num_classes)
    stages = sum(1 for _ in make_strategy(config).sample(source, counts))
    result = certify_cascade(counts.select, counts.estimate, config.sigmas, config.rule)
    return SamplingOutcome(result, counts.select, counts.estimate, stages)
