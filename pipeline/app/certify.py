"""The certify job end to end: sample counts (one Ray Data execution) → reduce → results.parquet → report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from pipeline.app.cli import prepare_out_dir
from pipeline.app.presets import Preset
from pipeline.app.reduce import (
    cascade_lacking,
    missing_images,
    reduce_adaptive,
    reduce_cascade,
    reduce_single_scales,
    refuse_incomplete,
)
from pipeline.app.report import render_report
from pipeline.app.workload import DataOptions, ModelOptions, Workload, build_workload
from pipeline.distributed.ray_init import init_ray
from pipeline.distributed.run import ExecutionConfig, sample_counts
from pipeline.errors import UserError
from pipeline.sampling.strategies import SamplingConfig
from pipeline.store.atomic import write_bytes, write_parquet
from pipeline.store.counts import CountsArrays, counts_to_arrays
from pipeline.store.run_config import check_resume, join, shard_metadata, write_image_ids


@dataclass(frozen=True)
class CertifyRequest:
    preset: Preset
    sampling: SamplingConfig
    execution: ExecutionConfig
    data: DataOptions
    models: ModelOptions
    out: str
    overwrite: bool = False
    resume: bool = False


def inputs_of(request: CertifyRequest) -> dict:
    """Besides the sampling settings, what the counts depend on: the models and how the images reach
    them. Recorded with the settings so that `--resume` refuses to mix, e.g., two denoiser fits."""
    models, data = request.models, request.data
    return {"data": data.data, "preprocess": data.preprocess, "denoiser": models.denoiser,
            "classifier": models.classifier, "classifier_weights": models.classifier_weights,
            "denoiser_fit": models.denoiser_fit, "classifier_interpolation": models.classifier_interpolation,
            "precision": models.precision}


def run_settings(sampling: SamplingConfig, user_alpha: float) -> dict:
    """The run's settings as stored in run_config.json and in every shard's metadata: the sampling
    config (alpha is the per-image level) plus the alpha the user asked for (differs under
    --family-wise)."""
    settings = asdict(sampling)
    settings["sigmas"] = list(settings["sigmas"])
    settings["user_alpha"] = user_alpha
    settings["target_radii"] = list(settings["target_radii"])  # as JSON reads it back, for the resume check
    return settings


class Stopwatch:
    """Wall seconds per phase of a job, for the report header (where the time of a run goes)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._started = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    def summary(self) -> str:
        total = time.perf_counter() - self._started
        return f"{total:.1f} s (" + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items()) + ")"


def per_image_sampling(sampling: SamplingConfig, num_images: int) -> SamplingConfig:
    """--family-wise: every image at alpha / M, so that by Bonferroni over the M images all their
    certificates hold together with probability >= 1 - alpha (method.md §4c)."""
    return replace(sampling, alpha=sampling.alpha / num_images) if sampling.family_wise else sampling


def guarantee_line(sampling: SamplingConfig, user_alpha: float, num_images: int) -> str:
    """What the report's certificates carry, stated exactly (method.md §4c)."""
    if sampling.alpha_mode == "reference":
        return (f"guarantee: none stated (reference mode: alpha/k at stage k as the published code, "
                f"alpha={sampling.alpha:g})")
    if sampling.family_wise:
        return (f"guarantee: family-wise over {num_images} images: per image alpha/M={sampling.alpha:.4g} "
                f"(alpha={user_alpha:g}), all certificates hold together with probability >= {1 - user_alpha:g}")
    return (f"guarantee: per image at alpha={sampling.alpha:g} (each certificate is wrong with probability "
            f"<= alpha; not jointly over the run, see --family-wise)")


def collect_counts(request: CertifyRequest, stopwatch: Stopwatch, min_select: int = 1) -> tuple[Workload, SamplingConfig, CountsArrays]:
    """Validate, prepare --out, load the models, join Ray and sample (or reuse) the counts of every
    image; returns the sampling config actually used (per-image alpha) with the counts."""
    sampling = request.sampling
    if sampling.n < 1 or sampling.n_select < min_select:
        raise UserError(f"--n must be >= 1 and --n-select >= {min_select}")
    if not 0 < sampling.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {sampling.alpha}")
    prepare_out_dir(request.out, request.overwrite, request.resume)
    workload = build_workload(request.preset, request.data, request.models)
    sampling = per_image_sampling(sampling, len(workload.image_ids))
    settings = run_settings(sampling, request.sampling.alpha)
    settings["inputs"] = inputs_of(request)
    check_resume(request.out, settings, request.resume)  # only once the models load: a failed start leaves OUT empty
    write_image_ids(request.out, workload.image_ids)
    stopwatch.lap("models")
    init_ray()
    stopwatch.lap("Ray start")
    counts = sample_counts(workload.dataset_for, workload.image_ids, workload.model_spec, sampling,
                           request.execution, join(request.out, "counts"), shard_metadata(settings))
    stopwatch.lap("sampling")
    arrays = counts_to_arrays(counts, sampling.sigmas)
    _check_every_image_has_its_counts(request, workload, sampling, arrays)
    return workload, sampling, arrays


def _check_every_image_has_its_counts(request: CertifyRequest, workload: Workload, sampling: SamplingConfig,
                                      arrays: CountsArrays) -> None:
    """After sampling, every asked image must have the rows its routing needs; images skipped as
    unreadable (--on-bad-image skip) have none and are listed in the report instead."""
    asked = workload.image_ids
    if request.data.on_bad_image == "skip" and workload.locations is not None:
        asked = np.intersect1d(asked, arrays.image_ids)
    lacking = None
    if sampling.strategy in ("early_exit", "all_scales"):
        lacking = cascade_lacking(arrays, sampling.alpha, sampling.alpha_mode, sampling.p0, sampling.routing)
    refuse_incomplete(missing_images(arrays, asked, lacking), len(workload.image_ids), (),
                      "run the same command with --resume to sample them")


def certify(request: CertifyRequest) -> str:
    """Run everything; returns the printed summary table."""
    stopwatch = Stopwatch()
    workload, sampling, arrays = collect_counts(request, stopwatch)
    adaptive = sampling.strategy == "adaptive"
    if adaptive:
        results = reduce_adaptive(arrays, sampling.alpha, sampling.p0, sampling.routing, sampling.target_radii)
    else:
        results = reduce_cascade(arrays, sampling.alpha, sampling.alpha_mode, sampling.p0, sampling.routing)
    write_parquet(results, join(request.out, "results.parquet"))

    tables = {"cascade " + "/".join(f"{s:g}" for s in sampling.sigmas): results}
    # Clopper-Pearson is invalid on adaptively stopped counts: no single-scale baselines then.
    single_scales = {} if adaptive else reduce_single_scales(arrays, sampling.alpha, sampling.p0)
    for sigma, table in single_scales.items():
        tables[f"sigma={sigma:g} alone"] = table
    skipped = []
    if workload.locations is not None:
        present = set(arrays.image_ids.tolist())
        skipped = [workload.locations[i] for i in sorted(workload.locations) if i not in present]
    stopwatch.lap("reduce")
    header = "\n".join([
        f"# mdds certification report ({request.preset.name})",
        "",
        *[f"- {line}" for line in workload.notes],
        f"- images: {results.num_rows}; sigmas {list(sampling.sigmas)}; n_select={sampling.n_select}, "
        f"n={sampling.n}; alpha={sampling.alpha:g} ({sampling.alpha_mode} mode); p0={sampling.p0}; "
        f"sampling: {sampling.strategy}; routing: {sampling.routing}",
        *([f"- target-radius run: each image was only asked whether it is certified at radius "
           f"{', '.join(f'{r:g}' for r in sampling.target_radii)}; its radius is the largest of these proven "
           f"(images with none abstain), so certified accuracy is meaningful at these radii only"]
          if sampling.target_radii else []),
        f"- {guarantee_line(sampling, request.sampling.alpha, len(workload.image_ids))}",
        f"- wall time: {stopwatch.summary()}",
        *([f"- skipped unreadable images ({len(skipped)}): {', '.join(skipped)}"] if skipped else []),
    ])
    report, png = render_report(tables, header)
    write_bytes(join(request.out, "report.md"), report.encode())
    write_bytes(join(request.out, "certified_accuracy.png"), png)
    return report
