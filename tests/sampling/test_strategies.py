"""Sampling strategies on a scripted vote source (no model, no Ray): which cells each one samples,
in which stages, and that a resume continues from the first stage an image still needs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.sampling.kernel import VoteRequests
from pipeline.sampling.noise import Phase
from pipeline.config import CascadeRule, CertifyConfig
from pipeline.sampling.strategies import BatchCounts, make_strategy
from pipeline.stats.cascade import needs_next_stage

NUM_CLASSES = 10
SIGMAS = (1.0, 0.5, 0.25)


class ScriptedVotes:
    """Even rows: every vote for class 1 (certified at once). Odd rows: votes spread evenly over the
    classes (p̄ < 1/2: they fall through every scale). Records every request it serves."""

    num_classes = NUM_CLASSES

    def __init__(self) -> None:
        self.served: list[tuple[int, int, int]] = []  # (row, stage, phase)

    def votes(self, requests: VoteRequests) -> np.ndarray:
        out = np.zeros((len(requests), NUM_CLASSES), np.int64)
        for index, (row, stage, phase, start, stop) in enumerate(zip(
                requests.rows, requests.stages, requests.phases, requests.starts, requests.stops)):
            self.served.append((int(row), int(stage), int(phase)))
            total = int(stop - start)
            if row % 2 == 0:
                out[index, 1] = total
            else:
                out[index] = total // NUM_CLASSES
                out[index, : total % NUM_CLASSES] += 1
        return out


def config(strategy: str = "early_exit", **overrides) -> CertifyConfig:
    settings = dict(sigmas=SIGMAS, n_select=20, n=200, seed=0, alpha=0.001, alpha_mode="union", p0=0.5,
                    strategy=strategy, routing="cascade")
    settings.update(overrides)
    return CertifyConfig(**settings)


def run(strategy, counts: BatchCounts) -> tuple[list[np.ndarray], ScriptedVotes]:
    source = ScriptedVotes()
    return [mask.copy() for mask in strategy.sample(source, counts)], source


def test_early_exit_samples_each_scale_only_for_the_images_routed_there():
    counts = BatchCounts.empty(6, 3, NUM_CLASSES)
    stages, source = run(make_strategy(config()), counts)
    odd = np.arange(6) % 2 == 1
    assert len(stages) == 3  # one shard per stage
    np.testing.assert_array_equal(stages[0][:, 0], True)
    for k in (1, 2):
        np.testing.assert_array_equal(stages[k][:, k], odd)
        assert stages[k].sum() == odd.sum()
    assert {(row, stage) for row, stage, _ in source.served} == {(r, k) for r in range(6) for k in range(3)
                                                                 if k == 0 or r % 2}
    # what was routed is exactly the stats rule applied to the counts sampled so far
    for k in (1, 2):
        reached = counts.present[:, k - 1]
        rule = needs_next_stage(counts.select[reached, :k], counts.estimate[reached, :k], 3, CascadeRule(0.001))
        np.testing.assert_array_equal(counts.present[reached, k], rule)


def test_a_resumed_batch_continues_from_the_first_stage_it_still_needs():
    strategy = make_strategy(config())
    complete = BatchCounts.empty(6, 3, NUM_CLASSES)
    run(strategy, complete)
    assert not strategy.pending(complete).any()

    resumed = BatchCounts.empty(6, 3, NUM_CLASSES)
    resumed.present[:, 0] = True  # an interrupted run wrote the first stage of every image
    resumed.select[:, 0], resumed.estimate[:, 0] = complete.select[:, 0], complete.estimate[:, 0]
    np.testing.assert_array_equal(strategy.pending(resumed), np.arange(6) % 2 == 1)
    stages, source = run(strategy, resumed)
    assert all(stage > 0 for _, stage, _ in source.served), "a stage already on disk was sampled again"
    np.testing.assert_array_equal(resumed.estimate, complete.estimate)
    np.testing.assert_array_equal(resumed.present, complete.present)


def test_all_scales_samples_every_missing_cell_in_one_stage():
    counts = BatchCounts.empty(4, 3, NUM_CLASSES)
    counts.present[0] = True
    stages, source = run(make_strategy(config("all_scales")), counts)
    assert len(stages) == 1 and stages[0].sum() == 9 and not stages[0][0].any()
    assert len(source.served) == 9 * 2  # select + estimate of the 9 missing cells, in one request


def test_predict_never_draws_selection_votes():
    stages, source = run(make_strategy(config(task="predict", n_select=0)), BatchCounts.empty(4, 3, NUM_CLASSES))
    assert {phase for _, _, phase in source.served} == {int(Phase.ESTIMATE)}
    assert stages[0][:, 0].all()


def test_unknown_strategy_is_a_user_error():
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="strategy"):
        config("fastest")
