"""The certify job end to end: sample counts (one Ray Data execution) → reduce → results.parquet → report."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.app.cli import prepare_out_dir
from pipeline.app.presets import DatasetPreset
from pipeline.app.reduce import reduce_counts
from pipeline.app.report import render_report
from pipeline.app.workload import DataOptions, ModelOptions, Workload, build_workload
from pipeline.config import CertifyConfig
from pipeline.distributed.ray_init import init_ray
from pipeline.distributed.run import DatasetFor, ExecutionConfig, sample_counts
from pipeline.models.spec import ModelSource
from pipeline.stats.sequential_cascade import STOPPING_RULES
from pipeline.store.atomic import write_bytes, write_parquet
from pipeline.store.run_config import check_resume, join, shard_metadata, write_image_ids


@dataclass(frozen=True)
class CertifyRequest:
    preset: DatasetPreset
    config: CertifyConfig
    execution: ExecutionConfig
    data: DataOptions
    models: ModelOptions
    out: str
    overwrite: bool = False
    resume: bool = False


def inputs_of(request: CertifyRequest) -> dict:
    """Besides the configuration, what the counts depend on: the models and how the images reach them.
    Recorded with the settings so that `--resume` refuses to mix, e.g., two denoiser fits."""
    models, data = request.models, request.data
    return {"data": data.data, "preprocess": data.preprocess, "denoiser": models.denoiser,
            "classifier": models.classifier, "classifier_weights": models.classifier_weights,
            "denoiser_fit": models.denoiser_fit, "classifier_interpolation": models.classifier_interpolation,
            "precision": models.precision}


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


def guarantee_line(config: CertifyConfig) -> str:
    """What the report's certificates carry, stated exactly (docs/statistics.md, the guarantee)."""
    if config.alpha_mode == "reference":
        return (f"guarantee: none stated (reference mode: alpha/k at stage k as the published code, "
                f"alpha={config.image_alpha:g})")
    if config.family_wise:
        return (f"guarantee: family-wise over {config.family_size} images: per image alpha/M={config.image_alpha:.4g} "
                f"(alpha={config.alpha:g}), all certificates hold together with probability >= {1 - config.alpha:g}")
    return (f"guarantee: per image at alpha={config.alpha:g} (each certificate is wrong with probability "
            f"<= alpha; not jointly over the run, see --family-wise)")


def collect_counts(request: CertifyRequest, stopwatch: Stopwatch) -> tuple[Workload, CertifyConfig, np.ndarray]:
    """Prepare --out, load the models, join Ray and sample (or reuse) the counts of every image; returns
    the run's configuration (family-wise: per-image alpha fixed by the number of images) and the ids
    that must all have their counts (an unreadable image skipped with --on-bad-image skip has none)."""
    prepare_out_dir(request.out, request.overwrite, request.resume)
    workload = build_workload(request.preset, request.data, request.models)
    config, sampled = sample_run(request.out, request.config, inputs_of(request), workload.image_ids,
                                 workload.dataset_for, workload.model_spec, request.execution, request.resume,
                                 stopwatch)
    asked = workload.image_ids
    if request.data.on_bad_image == "skip" and workload.locations is not None:
        asked = np.intersect1d(asked, sampled)
    return workload, config, asked


def sample_run(out: str, config: CertifyConfig, inputs: dict, image_ids: np.ndarray, dataset_for: DatasetFor,
               models: ModelSource, execution: ExecutionConfig, resume: bool,
               stopwatch: Stopwatch) -> tuple[CertifyConfig, np.ndarray]:
    """Record the run (or check a resume matches it), join Ray and sample every cell still missing, in
    one Ray Data execution; OUT is prepared and the models checked. Returns the configuration of the
    run over these images and the ids with counts on disk."""
    config = config.for_images(len(image_ids))
    if config.strategy == "adaptive":  # the stopping rules decide the counts too
        inputs = {**inputs, "stopping_rules": STOPPING_RULES}
    settings = {**config.to_dict(), "inputs": inputs}
    check_resume(out, settings, resume)  # only once the models load: a failed start leaves OUT empty
    write_image_ids(out, image_ids)
    stopwatch.lap("models")
    init_ray()
    stopwatch.lap("Ray start")
    sampled = sample_counts(dataset_for, image_ids, models, config, execution, join(out, "counts"),
                            shard_metadata(settings))
    stopwatch.lap("sampling")
    return config, sampled


def certify(request: CertifyRequest) -> str:
    """Run everything; returns the printed report."""
    stopwatch = Stopwatch()
    workload, config, asked = collect_counts(request, stopwatch)
    skipped = () if workload.locations is None else tuple(workload.locations[i] for i in sorted(workload.locations)
                                                          if i not in set(asked.tolist()))
    return write_results(request.out, config, asked, request.preset.name, workload.notes, stopwatch, skipped)[1]


def write_results(out: str, config: CertifyConfig, asked: np.ndarray, title: str, notes: Sequence[str],
                  stopwatch: Stopwatch, skipped: Sequence[str] = ()) -> tuple[pa.Table, str]:
    """Reduce OUT/counts, write results.parquet, report.md and the curve; returns the results and the report."""
    adaptive = config.strategy == "adaptive"
    # Clopper-Pearson is invalid on adaptively stopped counts: no single-scale baselines then.
    reduced, _ = reduce_counts(join(out, "counts"), config, asked=asked, single_scales=not adaptive,
                               hint="run the same command with --resume to sample them")
    results = reduced.results
    write_parquet(results, join(out, "results.parquet"))
    tables = {"cascade " + "/".join(f"{s:g}" for s in config.sigmas): results}
    for sigma, table in reduced.single_scales.items():
        tables[f"sigma={sigma:g} alone"] = table
    stopwatch.lap("reduce")
    header = "\n".join([
        f"# mdds certification report ({title})",
        "",
        *[f"- {line}" for line in notes],
        f"- images: {results.num_rows}; sigmas {list(config.sigmas)}; n_select={config.selection_samples}, "
        f"n={'at most ' if config.strategy == 'adaptive' else ''}{config.n}; alpha={config.image_alpha:g} "
        f"({config.alpha_mode} mode); p0={config.p0}; sampling: {config.strategy}; routing: {config.routing}",
        *([f"- target-radius run: each image was only asked whether it is certified at radius "
           f"{', '.join(f'{r:g}' for r in config.target_radii)}; its radius is the largest of these proven "
           f"(images with none abstain), so certified accuracy is meaningful at these radii only"]
          if config.target_radii else []),
        f"- {guarantee_line(config)}",
        f"- wall time: {stopwatch.summary()}",
        *([f"- skipped unreadable images ({len(skipped)}): {', '.join(skipped)}"] if skipped else []),
    ])
    report, png = render_report(tables, header)
    write_bytes(join(out, "report.md"), report.encode())
    write_bytes(join(out, "certified_accuracy.png"), png)
    return results, report
