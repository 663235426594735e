"""The certify job end to end: sample counts (Ray Data) → reduce → results.parquet → report."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq

from pipeline.cli import join, prepare_out_dir
from pipeline.counts import CountsArrays, counts_to_arrays
from pipeline.errors import UserError
from pipeline.presets import Preset
from pipeline.reduce import reduce_cascade, reduce_single_scales
from pipeline.report import render_report
from pipeline.run import ExecutionConfig, SamplingConfig, check_resume, sample_counts
from pipeline.workload import DataOptions, ModelOptions, Workload, build_workload


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


def write_bytes(url: str, payload: bytes) -> None:
    with fsspec.open(url, "wb") as handle:
        handle.write(payload)


def write_parquet(table, url: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(url, buffer.getvalue())


def collect_counts(request: CertifyRequest, min_select: int = 1) -> tuple[Workload, CountsArrays]:
    """Validate, prepare --out, load the models, join Ray and sample (or reuse) the counts of every image."""
    sampling = request.sampling
    if sampling.n < 1 or sampling.n_select < min_select:
        raise UserError(f"--n must be >= 1 and --n-select >= {min_select}")
    if not 0 < sampling.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {sampling.alpha}")
    prepare_out_dir(request.out, request.overwrite, request.resume)
    workload = build_workload(request.preset, request.data, request.models)
    check_resume(request.out, sampling, request.resume)  # only once the models load: a failed start leaves OUT empty
    counts = sample_counts(workload.dataset, workload.image_ids, workload.model_spec, sampling,
                           request.execution, join(request.out, "counts"))
    return workload, counts_to_arrays(counts, sampling.sigmas)


def certify(request: CertifyRequest) -> str:
    """Run everything; returns the printed summary table."""
    sampling = request.sampling
    started = time.perf_counter()
    workload, arrays = collect_counts(request)
    if sampling.adaptive:
        from pipeline.adaptive_actor import reduce_adaptive

        results = reduce_adaptive(arrays, sampling.alpha, sampling.p0)
    else:
        results = reduce_cascade(arrays, sampling.alpha, sampling.alpha_mode, sampling.p0)
    write_parquet(results, join(request.out, "results.parquet"))

    tables = {"cascade " + "/".join(f"{s:g}" for s in sampling.sigmas): results}
    # Clopper-Pearson is invalid on adaptively stopped counts: no single-scale baselines then.
    single_scales = {} if sampling.adaptive else reduce_single_scales(arrays, sampling.alpha, sampling.p0)
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
        f"n={sampling.n}; alpha={sampling.alpha} ({sampling.alpha_mode} mode); p0={sampling.p0}",
        f"- wall time: {time.perf_counter() - started:.1f} s",
        *([f"- skipped unreadable images ({len(skipped)}): {', '.join(skipped)}"] if skipped else []),
    ])
    report, png = render_report(tables, header)
    write_bytes(join(request.out, "report.md"), report.encode())
    write_bytes(join(request.out, "certified_accuracy.png"), png)
    return report
