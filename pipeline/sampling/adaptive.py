"""Adaptive sampling (the strategy): rounds of votes until each (image, scale) is settled.

The stopping and certification rules are statistics and live in pipeline/stats/sequential_cascade.py;
this module only asks a vote source for the next rounds. The fixed-n baseline over the same
source is `pipeline.sampling.strategies.run_fixed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.sampling.kernel import VoteRequests
from pipeline.sampling.noise import NOISE_CHUNK, Phase
from pipeline.sampling.votes import VoteSource
from pipeline.config import CertifyConfig
from pipeline.stats.cascade import CascadeResult
from pipeline.stats.sequential_cascade import DONE, NEXT, certify_cascade_sequential, round_status


@dataclass(frozen=True)
class SamplingOutcome:
    """Votes at the stopping time and the cascade's certificates; unconsulted stages are zeros."""

    result: CascadeResult
    select_counts: np.ndarray  # int64 (M, K, C)
    estimate_counts: np.ndarray  # int64 (M, K, C)
    rounds: int

    @property
    def consulted(self) -> np.ndarray:
        """(M, K) bool: the stages that drew samples for each image."""
        return self.select_counts.sum(axis=2) > 0

    @property
    def forward_passes(self) -> int:
        """Denoiser + classifier calls spent (one per Monte-Carlo sample)."""
        return int(self.select_counts.sum() + self.estimate_counts.sum())


def round_ends(n_max: int, first_round: int = 64, growth: float = 1.2) -> np.ndarray:
    """Cumulative estimation sample sizes after each round: whole noise chunks, growing by `growth`,
    ending exactly at n_max. Why ×1.2: a run stops at the first round end past the point where it
    could have stopped, overshooting by up to growth − 1; on the first 20 digits test images the
    general mode with ×1.5 spent 12 % more forward passes than with ×1.2, and ×2 29 % more, at the same
    certified accuracy; the extra rounds cost only their Python bookkeeping."""
    ends = []
    size = max(NOISE_CHUNK, -(-first_round // NOISE_CHUNK) * NOISE_CHUNK)
    while size < n_max:
        ends.append(size)
        size = max(size + NOISE_CHUNK, -(-int(size * growth) // NOISE_CHUNK) * NOISE_CHUNK)
    return np.array([*ends, n_max], dtype=np.int64)


def run_adaptive(source: VoteSource, num_images: int, config: CertifyConfig, first_round: int = 64,
                 growth: float = 1.2) -> SamplingOutcome:
    """Sample every image through the cascade in rounds (`round_ends`); every round is one
    `source.votes` call covering all images still sampling, whatever scale each has reached. A stage's
    selection votes (`config.selection_samples`, the first of the selection phase, whose noise is
    independent of the estimation samples') are drawn with its first round."""
    num_scales, num_classes = len(config.sigmas), source.num_classes
    ends = round_ends(config.n, first_round, growth)
    select = np.zeros((num_images, num_scales, num_classes), dtype=np.int64)
    estimate = np.zeros_like(select)
    stage = np.zeros(num_images, dtype=np.int64)  # the stage each image is deciding
    target = np.zeros(num_images, dtype=np.int64)  # the stage it samples next (stage, or an earlier one)
    step = np.zeros((num_images, num_scales), dtype=np.int64)  # rounds drawn per (image, stage)
    active = np.ones(num_images, dtype=bool)
    rounds = 0
    while active.any():
        rows = np.flatnonzero(active)
        drawn = step[rows, target[rows]]
        fresh = rows[drawn == 0]
        requests = VoteRequests.concat([
            VoteRequests(rows, target[rows], np.full(len(rows), int(Phase.ESTIMATE)),
                         np.where(drawn == 0, 0, ends[np.maximum(drawn - 1, 0)]), ends[drawn]),
            VoteRequests(fresh, target[fresh], np.full(len(fresh), int(Phase.SELECT)),
                         np.zeros(len(fresh)), np.full(len(fresh), config.selection_samples)),
        ])
        votes = source.votes(requests)
        estimate[rows, target[rows]] += votes[: len(rows)]
        select[fresh, target[fresh]] += votes[len(rows):]
        step[rows, target[rows]] += 1
        rounds += 1
        deciding = stage[rows]  # images that move on below start the next stage next round
        for k in np.unique(deciding):
            at_stage = rows[deciding == k]
            status, next_target = round_status(select[at_stage], estimate[at_stage], int(k), config)
            target[at_stage] = next_target
            moving = at_stage[status == NEXT]
            active[at_stage[status == DONE]] = False
            if k == num_scales - 1:
                active[moving] = False
            else:
                stage[moving] = target[moving] = k + 1
    result = certify_cascade_sequential(select, estimate, config.sigmas, config.rule, config.target_radii)
    return SamplingOutcome(result, select, estimate, rounds)
