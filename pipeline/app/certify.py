"""The certify job end to end: sample counts (one Ray Data execution) → reduce → results.parquet → report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from pipeline.app.cli import prepare_out_dir
from pipeline.app.presets import Preset
from pipeline.app.reduce import reduce_adaptive, reduce_cascade, reduce_single_scales
from pipeline.app.report import render_report
from pipeline.app.workload import DataOptions, ModelOptions, Workload, build_workload
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


def run_settings(sampling: SamplingConfig) -> dict:
    """The run's settings as stored in run_config.json and in every shard's metadata."""
    settings = asdict(sampling)
    settings["sigmas"] = list(settings["sigmas"])
    settings["target_radii"] = list(settings["target_radii"])  # as JSON reads it back, for the resume check
    return settings


def collect_counts(request: CertifyRequest, min_select: int = 1) -> tuple[Workload, CountsArrays]:
    """Validate, prepare --out, load the models, join Ray and sample (or reuse) the counts of every image."""
    sampling = request.sampling
    if sampling.n < 1 or sampling.n_select < min_select:
        raise UserError(f"--n must be >= 1 and --n-select >= {min_select}")
    if not 0 < sampling.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {sampling.alpha}")
    prepare_out_dir(request.out, request.overwrite, request.resume)
    workload = build_workload(request.preset, request.data, request.models)
    settings = run_settings(sampling)
    check_resume(request.out, settings, request.resume)  # only once the models load: a failed start leaves OUT empty
    write_image_ids(request.out, workload.image_ids)
    counts = sample_counts(workload.dataset_for, workload.image_ids, workload.model_spec, sampling,
                           request.execution, join(request.out, "counts"), shard_metadata(settings))
    return workload, counts_to_arrays(counts, sampling.sigmas)


def certify(request: CertifyRequest) -> str:
    """Run everything; returns the printed summary table."""
    sampling = request.sampling
    started = time.perf_counter()
    workload, arrays = collect_counts(request)
    adaptive = sampling.strategy == "adaptive"
    if adaptive:
        results = reduce_adaptive(arrays, sampling.alpha, sampling.p0, sampling.routing, sampling.target_radii)
    else:
        results = reduce_cascade(arrays, sampling.alpha, sampling.alpha_mode, sampling.p0)
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
    header = "\n".join([
        f"# mdds certification report ({request.preset.name})",
        "",
        *[f"- {line}" for line in workload.notes],
        f"- images: {results.num_rows}; sigmas {list(sampling.sigmas)}; n_select={sampling.n_select}, "
        f"n={sampling.n}; alpha={sampling.alpha} ({sampling.alpha_mode} mode); p0={sampling.p0}; "
        f"sampling: {sampling.strategy}; routing: {sampling.routing}",
        *([f"- target-radius run: each image was only asked whether it is certified at radius "
           f"{', '.join(f'{r:g}' for r in sampling.target_radii)}; its radius is the largest of these proven "
           f"(images with none abstain), so certified accuracy is meaningful at these radii only"]
          if sampling.target_radii else []),
        f"- wall time: {time.perf_counter() - started:.1f} s",
        *([f"- skipped unreadable images ({len(skipped)}): {', '.join(skipped)}"] if skipped else []),
    ])
    report, png = render_report(tables, header)
    write_bytes(join(request.out, "report.md"), report.encode())
    write_bytes(join(request.out, "certified_accuracy.png"), png)
    return report
