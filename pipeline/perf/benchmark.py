"""The benchmark's sections (pipeline/app/benchmark.py runs them): every figure is measured in this
process, on this machine.

Each section times two ways of doing the same work (same models, same images, same number of
samples) back to back and reports their ratio, so machine speed and background load largely cancel
(the load average is recorded next to them because this machine is shared). Every section also
checks that both ways agree (identical counts where the noise is shared), so a fast wrong path
cannot look like a speed-up.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from scipy.special import ndtr, ndtri

from pipeline.config import CertifyConfig
from pipeline.errors import UserError
from pipeline.models.spec import ModelSpec
from pipeline.perf.flops import flops_per_sample, peak_bf16_flops, utilization
from pipeline.perf.reference_loop import reference_counts
from pipeline.sampling.adaptive import SamplingOutcome, run_adaptive
from pipeline.sampling.kernel import FusedDenoiseClassify
from pipeline.sampling.noise import Phase
from pipeline.sampling.strategies import BatchCounts, make_strategy, run_fixed, sample_totals
from pipeline.sampling.votes import CachedVoteSource, FusedVoteSource
from pipeline.stats.cascade import certify_cascade
from pipeline.stats.sample_complexity import fewest_expected_votes
from pipeline.stats.sequential_cascade import sequential_level
from pipeline.store.metrics import REPORT_RADII, average_certified_radius, certified_accuracy
from pipeline.store.results import results_table

T = TypeVar("T")


def timed(function: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """Run `function` and return (result, wall seconds), synchronizing CUDA so queued work counts."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    started = time.perf_counter()
    result = function()
    synchronize()
    return result, time.perf_counter() - started


def machine_info(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_1_5_15_min": list(os.getloadavg()),
    }


@dataclass(frozen=True)
class BenchmarkImages:
    """The images a section measures on, and the settings both of its ways certify them with.

    `config` is the fixed-n early-exit run every section starts from; sections that compare other
    strategies (all scales, adaptive) derive theirs from it with `CertifyConfig.replace`."""

    images: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    config: CertifyConfig

    def subset(self, count: int) -> BenchmarkImages:
        return replace(self, images=self.images[:count], image_ids=self.image_ids[:count],
                       labels=self.labels[:count])

    @property
    def samples(self) -> dict[Phase, int]:
        return sample_totals(self.config)

    @property
    def all_scales_samples(self) -> int:
        return len(self.images) * len(self.config.sigmas) * (self.config.n_select + self.config.n)


def fused_vs_reference(fused: FusedDenoiseClassify, work: BenchmarkImages, reference_batch: int, repeats: int,
                       tuned: FusedDenoiseClassify | None = None) -> dict:
    """All scales of every image by the reference loop, the fused step and (optionally) a tuned copy
    of it (pipeline/perf/tuning.py: torch.compile). Each repeat times every variant back
    to back, and the speed-up is the median of the per-repeat time ratios, so that a change of
    background load between repeats cancels."""
    config = work.config
    # Own fp32, contiguous-layout (NCHW) copies, as the reference code runs: the fused step switched its
    # models to channels_last.
    denoiser = copy.deepcopy(fused.denoiser).to(memory_format=torch.contiguous_format)
    classifier = copy.deepcopy(fused.classifier).to(memory_format=torch.contiguous_format)

    def reference(images: np.ndarray, sigmas, samples: dict[Phase, int]) -> dict[Phase, np.ndarray]:
        return reference_counts(denoiser, classifier, images, sigmas, samples.get(Phase.SELECT, 1),
                                samples[Phase.ESTIMATE], reference_batch, fused.num_classes, fused.device, config.seed)

    variants = {"reference": reference}
    for name, step in (("fused", fused), ("tuned", tuned)):
        if step is not None:
            variants[name] = lambda images, sigmas, samples, step=step: step.count(
                images, work.image_ids[: len(images)], sigmas, samples, config.seed)
    # Warm-up on one image: allocator growth, kernel selection and (tuned) compilation.
    warm_up_s = {name: timed(lambda run=run: run(work.images[:1], config.sigmas[:1], {Phase.ESTIMATE: 64}),
                             fused.device)[1] for name, run in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    counts = {}
    for _ in range(repeats):
        for name, run in variants.items():
            counts[name], seconds = timed(lambda run=run: run(work.images, config.sigmas, work.samples), fused.device)
            times[name].append(seconds)
    samples = work.all_scales_samples
    result = {
        "images": len(work.images), "sigmas": list(config.sigmas), "n_select": config.n_select, "n": config.n,
        "samples": samples, "fused_batch_size": fused.batch_size, "reference_batch_size": reference_batch,
        "times_s": times, "warm_up_s": warm_up_s,
        "_fused_counts": counts["fused"],
    }
    for name in variants:
        seconds = float(np.median(times[name]))
        result[f"{name}_s"] = seconds
        result[f"{name}_samples_per_s"] = samples / seconds
        if name != "reference":
            result[f"{name}_speedup"] = float(np.median(np.divide(times["reference"], times[name])))
            result[f"{name}_top_class_agreement"] = float(np.mean(
                counts["reference"][Phase.ESTIMATE].argmax(-1) == counts[name][Phase.ESTIMATE].argmax(-1)))
    if tuned is not None:  # compiled kernels may round differently: count the votes that moved
        result["tuned_votes_differing_from_fused"] = sum(
            int(np.abs(counts["tuned"][p] - counts["fused"][p]).sum()) for p in counts["fused"]) // 2
    return result


def raw_fused(fused: FusedDenoiseClassify, work: BenchmarkImages) -> tuple[dict[Phase, np.ndarray], float]:
    """All scales of every image by the fused step in this process (after a one-image warm-up): the
    baseline the Ray pipeline is held to, without the reference loop's cost."""
    sigmas, seed = work.config.sigmas, work.config.seed
    timed(lambda: fused.count(work.images[:1], work.image_ids[:1], sigmas[:1], {Phase.ESTIMATE: 64}, seed),
          fused.device)
    return timed(lambda: fused.count(work.images, work.image_ids, sigmas, work.samples, seed), fused.device)


def early_exit(fused: FusedDenoiseClassify, work: BenchmarkImages, all_scales_counts: dict[Phase, np.ndarray],
               all_scales_s: float) -> dict:
    """The early-exit strategy the actors run (sampling/strategies.py) on the same images and noise:
    each scale only for the images the routing sends there (docs/statistics.md)."""
    config = work.config
    strategy = make_strategy(config)
    counts = BatchCounts.empty(len(work.images), len(config.sigmas), fused.num_classes)
    source = FusedVoteSource(fused, work.images, work.image_ids, config.sigmas, work.samples, config.seed)

    def staged() -> list[int]:
        return [int(filled.sum()) for filled in strategy.sample(source, counts)]

    sampled, seconds = timed(staged, fused.device)
    early = certify_cascade(counts.select, counts.estimate, config.sigmas, config.rule)
    full = certify_cascade(all_scales_counts[Phase.SELECT], all_scales_counts[Phase.ESTIMATE], config.sigmas,
                           config.rule)
    passes = sum(sampled) * (config.n_select + config.n)
    return {
        "images_sampled_per_stage": sampled,
        "forward_passes_early_exit": passes,
        "forward_passes_all_scales": work.all_scales_samples,
        "forward_passes_saved": 1.0 - passes / work.all_scales_samples,
        "early_exit_s": seconds,
        "all_scales_s": all_scales_s,
        "wall_time_saved": 1.0 - seconds / all_scales_s,
        "same_certificates": bool(np.array_equal(early.prediction, full.prediction)
                                  and np.array_equal(early.radius, full.radius)),
    }


def ray_pipeline(spec: ModelSpec, work: BenchmarkImages, batch_size: int, use_gpu: bool,
                 raw_counts: dict[Phase, np.ndarray], raw_s: float, workdir: Path,
                 actor_counts: Sequence[int] = (1, 2)) -> dict:
    """pipeline.distributed.run.sample_counts (all scales, one Ray Data pass) vs the raw fused step's time.

    Ray's own start-up (ray.init) is timed and excluded; everything after it (dataset execution,
    actor start-up and model loading, shard writes and reads) is included. A run with one sample
    per phase estimates that fixed per-execution cost, which is reported separately too.
    """
    import ray.data

    from pipeline.distributed.ray_init import init_ray
    from pipeline.distributed.run import ExecutionConfig, rows_of, sample_counts
    from pipeline.store.counts import counts_to_arrays

    _, startup_s = timed(init_ray, torch.device("cpu"))

    def run(actors: int, n_select: int, n: int, name: str) -> float:
        rows = {int(i): (int(y), x) for i, y, x in zip(work.image_ids, work.labels, work.images)}

        def dataset_for(todo: np.ndarray, num_blocks: int):
            return ray.data.from_items([{"image_id": int(i), "label": rows[int(i)][0], "image": rows[int(i)][1]}
                                        for i in todo], override_num_blocks=num_blocks)

        config = work.config.replace(n_select=n_select, n=n, strategy="all_scales")
        execution = ExecutionConfig(actors, max(1, len(work.images) // 4), batch_size, use_gpu)
        return timed(lambda: sample_counts(dataset_for, work.image_ids, spec, config, execution,
                                           str(workdir / name), {}), torch.device("cpu"))[1]

    overhead_s = run(1, 1, 1, "overhead")
    runs = {}
    for actors in actor_counts:
        seconds = run(actors, work.config.n_select, work.config.n, f"actors-{actors}")
        arrays = counts_to_arrays(rows_of(str(workdir / f"actors-{actors}"), work.image_ids), work.config.sigmas)
        runs[actors] = {
            "seconds": seconds,
            "samples_per_s": work.all_scales_samples / seconds,
            "efficiency": raw_s / seconds,
            "efficiency_without_execution_overhead": raw_s / max(seconds - overhead_s, 1e-9),
            "counts_equal_raw": bool(np.array_equal(arrays.select_counts, raw_counts[Phase.SELECT])
                                     and np.array_equal(arrays.estimate_counts, raw_counts[Phase.ESTIMATE])),
        }
    # Like for like: as many single-threaded actors as the raw step had torch threads (same cores).
    matched = torch.get_num_threads() if torch.get_num_threads() in runs else None
    return {
        "ray_startup_s_excluded": startup_s,
        "per_execution_overhead_s": overhead_s,
        "raw_fused_s": raw_s,
        "raw_fused_torch_threads": torch.get_num_threads(),
        "actor_torch_threads": "1 per actor on CPU (Ray sets OMP_NUM_THREADS to the actor's num_cpus=1)",
        "samples": work.all_scales_samples,
        "by_actors": {str(a): r for a, r in runs.items()},
        "matched_actors": matched,
        "efficiency": runs[matched]["efficiency"] if matched else None,
        "scaling_1_to_2_actors": (runs[1]["seconds"] / runs[2]["seconds"]) if {1, 2} <= set(runs) else None,
    }


def flops_section(fused: FusedDenoiseClassify, sample_shape: tuple[int, ...], sigma: float,
                  samples_per_s: float, peak_tflops: float | None) -> dict:
    name = torch.cuda.get_device_name(fused.device) if fused.device.type == "cuda" else "cpu"
    peak = peak_bf16_flops(name, peak_tflops) if fused.device.type == "cuda" else None
    return {"device": name, "samples_per_s": samples_per_s,
            **utilization(flops_per_sample(fused, sample_shape, sigma), samples_per_s, peak)}


# Carlini et al. (ICLR 2023): one batch of 32 noisy ImageNet images through the 552M-parameter guided-diffusion
# UNet and BEiT-L takes 1.5 s on an A100, so 1,000 images at n = 10,000 are about 130 GPU-hours. The
# projection charges a run's forward passes per image at that rate for that many images.
A100_SECONDS_PER_FORWARD = 1.5 / 32
PROJECTED_IMAGENET_IMAGES = 1_000


def _accuracy(outcome: SamplingOutcome, work: BenchmarkImages, radii: Sequence[float] = REPORT_RADII) -> dict:
    """Certified images at each radius, ACR, and what the run cost: forward passes (per image at each scale
    too) and their projection to the ImageNet protocol on an A100 (same forward passes per image)."""
    table = results_table(work.image_ids, work.labels, outcome.result, np.asarray(work.config.sigmas))
    per_image = outcome.forward_passes / len(work.images)
    return {
        "certified_accuracy": {f"{r:g}": certified_accuracy(table, r) for r in radii},
        # the unit of "within 1 image": certified accuracy × images
        "certified_images": {f"{r:g}": int(round(certified_accuracy(table, r) * table.num_rows)) for r in radii},
        "acr": average_certified_radius(table),
        "forward_passes": outcome.forward_passes,
        "forward_passes_per_image_by_scale": ((outcome.select_counts.sum(axis=(0, 2)) +
                                               outcome.estimate_counts.sum(axis=(0, 2))) / len(work.images)).tolist(),
        "projected_a100_gpu_hours": per_image * PROJECTED_IMAGENET_IMAGES * A100_SECONDS_PER_FORWARD / 3600,
        "deciding_stage_counts": {str(s): int(np.sum(outcome.result.stage == s))
                                  for s in range(-1, len(work.config.sigmas))},
    }


def _run_summary(outcome: SamplingOutcome, work: BenchmarkImages, radii: Sequence[float], fixed_passes: int,
                 seconds_per_forward: float) -> dict:
    """Accuracy, forward passes, how many times fewer than fixed n, and the wall time those passes take."""
    return {**_accuracy(outcome, work, radii), "rounds": outcome.rounds,
            "times_fewer_forward_passes": fixed_passes / outcome.forward_passes,
            "wall_s_estimated": outcome.forward_passes * seconds_per_forward,
            "estimation_samples": outcome.estimate_counts.sum(axis=2).tolist()}


GENERAL_MODE_RADII = (0.0, 0.25, 0.5, 0.75)
"""The radii at which the general adaptive mode is held to fixed n's certified images (issue 25)."""


def fewest_forward_passes(fixed: SamplingOutcome, work: BenchmarkImages, radii: Sequence[float]) -> dict:
    """What limits an adaptive row, from the fixed run's votes: the fewest forward passes any valid sequential
    procedure at the adaptive run's per-interval level (alpha / (2K − 1)) could spend in expectation while
    certifying, at every radius in `radii` (0: any certificate), all but one of the images fixed n certifies
    correctly there (pipeline/stats/sample_complexity.py: the image with the largest bound is left out).

    Each image pays the selection samples an adaptive run draws at its first scale and, where it must be
    certified, the votes that prove its largest such radius at the scale fixed n certified it at, were its
    vote rate there the fixed run's estimate (n votes: near a threshold the estimate's own error moves the
    bound by tens of percent; the caps of earlier scales are ignored, which only lowers the bound)."""
    config = work.config.replace(strategy="adaptive")
    result, rows = fixed.result, np.arange(len(work.images))
    stage = np.maximum(result.stage, 0)
    chosen = np.maximum(result.prediction, 0)
    counts = fixed.estimate_counts[rows, stage]
    rate = counts[rows, chosen] / np.maximum(counts.sum(axis=1), 1)
    sigma = np.asarray(config.sigmas)[stage]
    correct = (result.prediction >= 0) & (result.prediction == work.labels)
    level = sequential_level(len(config.sigmas), config.alpha)
    votes = np.zeros(len(rows))
    for radius in radii:
        needed = correct & (result.radius >= radius if radius > 0 else result.radius > 0)
        threshold = np.where(needed, ndtr(radius / sigma + ndtri(config.p0)), 0.5)
        proof = fewest_expected_votes(np.where(needed, rate, 1.0), threshold, level)
        votes = np.where(needed, np.maximum(votes, proof), votes)
    left_out = int(np.argmax(votes))
    votes[left_out] = 0.0
    passes = config.selection_samples * len(rows) + votes.sum()
    return {"forward_passes": passes, "times_fewer_at_most": fixed.forward_passes / passes,
            "left_out_image": int(work.image_ids[left_out]), "level": level}


def _fixed_votes(source: CachedVoteSource, work: BenchmarkImages, fused: FusedDenoiseClassify,
                 vote_cache: Path | None) -> tuple[SamplingOutcome, float, str]:
    """The fixed-n run (the baseline every adaptive run shares its votes with) and its wall time.

    With `vote_cache`, the votes a previous run drew are loaded (their file records the settings and
    the measured wall time of the fixed run that drew them) and the votes drawn now are saved there:
    the fixed n = 10,000 run on 100 images is ~1M forward passes, which on a shared 2-core machine is
    hours, and the adaptive rules can then be re-evaluated on exactly the same votes. The record holds
    the arithmetic too: bf16 and fp32 votes differ near class boundaries (on digits, a vote in about a
    third of the chunks of 64), so a file is only read by a run of the same precision."""
    config = work.config
    settings = {"images": len(work.images), "sigmas": list(config.sigmas), "n_select": config.n_select, "n": config.n,
                "seed": config.seed, "alpha": config.alpha, "first_image": int(work.image_ids[0]),
                "precision": fused.precision}
    record = vote_cache.with_name(vote_cache.name + ".json") if vote_cache is not None else None
    if record is not None and record.is_file():
        stored = json.loads(record.read_text())
        if stored["settings"] != settings:
            raise UserError(f"{vote_cache} holds votes for other settings: {stored['settings']} (now {settings})")
        source.load(vote_cache)
        fixed = run_fixed(source, len(work.images), config)
        return fixed, stored["fixed_wall_s"], f"measured when {vote_cache.name} was filled"
    fixed, seconds = timed(lambda: run_fixed(source, len(work.images), config), fused.device)
    if record is not None:
        source.save(vote_cache)
        record.write_text(json.dumps({"settings": settings, "fixed_wall_s": seconds}, indent=2))
    return fixed, seconds, "measured"


def adaptive_vs_fixed(fused: FusedDenoiseClassify, work: BenchmarkImages, radius_tolerance: float,
                      tolerance_sweep: Sequence[float] = (), target_radii: Sequence[float] = (0.25, 0.5, 0.75),
                      vote_cache: Path | None = None) -> dict:
    """Fixed n (work.config: early exit, Clopper-Pearson) vs adaptive sampling up to n_max = the same n:
    the general mode, and target-radius runs for each R alone and for all of them together.

    All runs draw from one chunk cache over the same counter-seeded noise: the fixed run is timed;
    each adaptive run then pays only for chunks no earlier run drew, so its forward passes are exact
    (counted by the sampler) and its wall time is estimated from the fixed run's time per forward.
    `tolerance_sweep` reruns the general rule at other radius tolerances on the same votes.
    """
    config = work.config
    source = CachedVoteSource(FusedVoteSource(fused, work.images, work.image_ids, config.sigmas, work.samples,
                                              config.seed))
    count = len(work.images)
    fixed, fixed_s, fixed_s_source = _fixed_votes(source, work, fused, vote_cache)
    per_forward_s = fixed_s / fixed.forward_passes

    def adaptive(**options) -> SamplingOutcome:
        return run_adaptive(source, count, config.replace(strategy="adaptive", **options))

    general = adaptive(radius_tolerance=radius_tolerance)
    targets = {f"{r:g}": adaptive(target_radii=(r,)) for r in target_radii}
    if len(target_radii) > 1:
        targets[",".join(f"{r:g}" for r in target_radii)] = adaptive(target_radii=tuple(target_radii))
    radii = sorted({*REPORT_RADII, *target_radii})

    def summary(outcome: SamplingOutcome, proven: Sequence[float] | None = None) -> dict:
        report = _run_summary(outcome, work, radii, fixed.forward_passes, per_forward_s)
        if proven is not None:
            report["fewest_forward_passes"] = fewest_forward_passes(fixed, work, proven)
        return report

    sweep = {f"{t:g}": summary(adaptive(radius_tolerance=t)) for t in tolerance_sweep}
    if vote_cache is not None:
        source.save(vote_cache)  # with the chunks only adaptive runs drew
    return {
        "images": count, "first_image": int(work.image_ids[0]), "n_max": config.n, "n_select": config.n_select,
        "adaptive_select": config.adaptive_select,
        "alpha": config.alpha, "sigmas": list(config.sigmas),
        "projection": {"images": PROJECTED_IMAGENET_IMAGES, "a100_seconds_per_forward": A100_SECONDS_PER_FORWARD},
        "radius_tolerance": radius_tolerance, "target_radii": list(target_radii),
        "general_mode_radii": [f"{r:g}" for r in GENERAL_MODE_RADII],
        "fixed": {**_accuracy(fixed, work, radii), "wall_s": fixed_s, "wall_s_source": fixed_s_source},
        "adaptive": summary(general, GENERAL_MODE_RADII),
        "target_radius": {name: summary(outcome, [float(r) for r in name.split(",")])
                          for name, outcome in targets.items()},
        "forward_passes_saved": 1.0 - general.forward_passes / fixed.forward_passes,
        "tolerance_sweep": sweep,
        "per_image": {"image_id": work.image_ids.tolist(), "label": work.labels.tolist(),
                      "fixed_prediction": fixed.result.prediction.tolist(),
                      "fixed_radius": fixed.result.radius.round(4).tolist(),
                      "adaptive_prediction": general.result.prediction.tolist(),
                      "adaptive_radius": general.result.radius.round(4).tolist()},
    }


def _report_phases(report: str) -> dict[str, float]:
    """The phases of the report's `- wall time: T s (models a s, Ray start b s, ...)` line."""
    match = re.search(r"^- wall time: ([\d.]+) s \((.*)\)$", report, re.MULTILINE)
    if not match:
        return {}
    phases = {"total": float(match.group(1))}
    for part in match.group(2).split(", "):
        name, seconds = part.rsplit(" ", 2)[0], part.rsplit(" ", 2)[1]
        phases[name] = float(seconds)
    return phases


def main_job(repo_root: Path, workdir: Path, extra_args: Sequence[str] = ()) -> dict:
    """`python jobs/certify.py` as a newcomer runs it: once with an empty model cache (first-use
    training included), then again with the cache; wall time of the whole command, the report's
    phases, and the most Ray worker processes alive at once."""
    import subprocess
    import sys

    from pipeline.perf.processes import PeakRayWorkers

    env = {**os.environ, "MDDS_CACHE_DIR": str(workdir / "model-cache")}
    runs = {}
    for name in ("first_run", "cached"):
        out = workdir / f"main-job-{name}"
        with PeakRayWorkers(interval_s=0.25) as workers:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "jobs/certify.py", "--out", str(out), *extra_args], cwd=repo_root,
                                  env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"jobs/certify.py failed ({done.returncode}): {done.stderr[-2000:]}")
        report = (out / "report.md").read_text()
        runs[name] = {"command_s": seconds, "phases_s": _report_phases(report), "peak_ray_workers": workers.peak}
    return {"command": "python jobs/certify.py " + " ".join(extra_args), **runs,
            "load_average_at_end": list(os.getloadavg())}
