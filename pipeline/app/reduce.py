"""The reduce stage: counts → certificates → the results table, for the certify driver, `pipeline.reduce`
and `jobs/reduce.py` alike.

Fixed-n counts go to the Clopper-Pearson cascade (pipeline/stats/cascade.py); counts of an adaptive
run were stopped on the data and go to the confidence-sequence cascade
(pipeline/stats/sequential_cascade.py), never to Clopper-Pearson. Every image the run was asked to
certify must have the rows its routing needs, or the reduce names the missing ones instead of
certifying the others alone (certified accuracy over the images that happen to have counts would
overstate it). Each image's certificate depends only on its own rows, so the counts are read and
certified group by group of images (store/counts.py): memory stays bounded whatever the run's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.config import CertifyConfig
from pipeline.errors import UserError
from pipeline.stats.cascade import certify_cascade, certify_single_scale, needed_stages
from pipeline.stats.sequential_cascade import certify_cascade_sequential
from pipeline.store.counts import CountsArrays, CountsIndex, index_counts, index_table
from pipeline.store.results import RESULTS_SCHEMA, results_table
from pipeline.store.run_config import counts_run_settings, read_image_ids

#: How many missing image ids an error message lists before "…".
LISTED_IDS = 10


@dataclass
class Reduced:
    """What a reduce found: the results, each scale alone where every image has it (fixed n only), and
    the scales per image early exit would sample under the routing (counts with every scale of every image)."""

    results: pa.Table
    single_scales: dict[float, pa.Table] = field(default_factory=dict)
    scales_per_image: float | None = None


def run_config_of(counts: str | pa.Table) -> CertifyConfig | None:
    """The configuration the counts were sampled with: run_config.json beside counts/, else any shard's
    metadata; None for bare counts (a table, or files without settings)."""
    if isinstance(counts, pa.Table):
        return None
    stored = counts_run_settings(counts)
    return CertifyConfig.from_dict(stored) if stored else None


def reduce(counts: str | pa.Table, config: CertifyConfig | None = None, *, sigmas: Sequence[float] | None = None,
           alpha: float | None = None, alpha_mode: str | None = None, routing: str | None = None,
           p0: float | None = None) -> pa.Table:
    """Certify counts (a counts/ directory, a Parquet file, a URL or a table) without sampling again.

    The statistics are `config`'s, else the run's (run_config.json / shard metadata), else defaults
    (union mode, alpha 0.001, the data's sigmas); the keyword settings override them: `alpha` is the
    per-image level, `sigmas` a subset of the scales (only where every image has them, e.g. an
    all-scales run). Counts of an adaptive run are certified with the sequential cascade and their own
    routing. Raises ValueError naming the images that lack the rows their routing needs.
    """
    return reduce_counts(counts, config, sigmas=sigmas, alpha=alpha, alpha_mode=alpha_mode, routing=routing,
                         p0=p0)[0].results


def reduce_counts(counts: str | pa.Table, config: CertifyConfig | None = None, *,
                  sigmas: Sequence[float] | None = None, alpha: float | None = None, alpha_mode: str | None = None,
                  routing: str | None = None, p0: float | None = None,
                  asked: np.ndarray | None = None, single_scales: bool = False,
                  hint: str | None = None) -> tuple[Reduced, CertifyConfig]:
    """`reduce` with what the jobs also need: the config used, each scale alone (`single_scales`), the
    scales per image. `asked`: the image ids that must all be certified (default: OUT/images.parquet
    beside a counts/ directory, else those in the counts); `hint`: what the refusal of missing counts
    tells the user to do (default: by how the counts were sampled)."""
    run = config or run_config_of(counts)
    if run is not None and run.task == "predict":
        raise UserError("these counts come from a predict run (no selection votes): they cannot be certified")
    adaptive = run is not None and run.strategy == "adaptive"
    if adaptive and (alpha_mode == "reference" or routing not in (None, run.routing)):
        raise UserError("these counts come from an adaptive run (stopped on the data): only the sequential "
                        f"cascade with the run's own routing ({run.routing}) is valid on them; drop "
                        "--alpha-mode / --routing")
    index = _index(counts)
    available = run.sigmas if run else tuple(sorted(set(index.sigma.tolist()), reverse=True))
    chosen = _cascade_sigmas(sigmas, available, run, index)
    config = _effective(run, available, chosen, alpha, alpha_mode, routing, p0)
    if asked is None and isinstance(counts, str) and _is_dir(counts):
        asked = read_image_ids(counts.rstrip("/").rsplit("/", 1)[0] or ".")
    if len(index.file) == 0:
        raise UserError("the counts table has no rows")
    if asked is not None:  # a resumed OUT may hold rows of images no longer asked for
        index = index.only(image_ids=asked)
    parts, partial, seen, scales_needed = [], [], [], []
    alone: dict[float, list[pa.Table]] | None = {} if single_scales and not adaptive else None
    for arrays in index.only(sigmas=config.sigmas).groups(sigmas=config.sigmas):
        seen.append(arrays.image_ids)
        if adaptive:
            result = certify_cascade_sequential(arrays.select_counts, arrays.estimate_counts, arrays.sigmas,
                                                config.rule, config.target_radii)
        else:
            needed = needed_stages(arrays.select_counts, arrays.estimate_counts, arrays.present, config.rule)
            lacking = (needed & ~arrays.present).any(axis=1)
            partial.append(arrays.image_ids[lacking])
            if lacking.any():
                continue
            result = certify_cascade(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, config.rule)
            scales_needed.append(needed.sum(axis=1) if arrays.present.all() else None)
            if alone is not None:
                alone = _single_scales(arrays, config, alone, first=len(parts) == 0)
        parts.append(results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas))
    present = np.concatenate(seen) if seen else np.array([], np.int64)
    absent = np.setdiff1d(asked, present) if asked is not None else np.array([], np.int64)
    missing = np.union1d(absent, np.concatenate(partial) if partial else []).astype(np.int64)
    refuse_incomplete(missing, len(asked) if asked is not None else len(present), index.unreadable,
                      hint or _hint(run, config.routing, adaptive))
    reduced = Reduced(pa.concat_tables(parts) if parts else RESULTS_SCHEMA.empty_table())
    if alone:
        reduced.single_scales = {sigma: pa.concat_tables(tables) for sigma, tables in alone.items()}
    if scales_needed and all(n is not None for n in scales_needed):
        reduced.scales_per_image = float(np.concatenate(scales_needed).mean())
    return reduced, config


def _index(counts: str | pa.Table) -> CountsIndex:
    """The counts to reduce, indexed (store/counts.py): files are read group of images by group."""
    if isinstance(counts, pa.Table):
        return index_table(counts)
    return index_counts(counts)


def _is_dir(location: str) -> bool:
    fs, path = fsspec.core.url_to_fs(location)
    return fs.isdir(path)


def _cascade_sigmas(requested: Sequence[float] | None, available: tuple[float, ...], run: CertifyConfig | None,
                    index: CountsIndex) -> tuple[float, ...]:
    """The scales to reduce over: `requested` (checked against how the counts were sampled), else all."""
    if not requested:
        return available
    chosen = tuple(sorted({float(s) for s in requested}, reverse=True))
    dropped = sorted(set(available) - set(chosen), reverse=True)
    if not dropped:
        return chosen
    if run is not None and run.strategy in ("early_exit", "adaptive"):
        raise UserError(f"--sigmas drops scale(s) {dropped} of an {run.strategy.replace('_', '-')} run: images "
                        "decided there have no rows at the other scales and would vanish; reduce over all of "
                        f"{list(available)}, or sample with --all-scales to reduce over any subset")
    if run is None and not _every_image_has_every_scale(index):
        raise UserError(f"--sigmas drops scale(s) {dropped}, but not every image of these bare counts has every "
                        "scale: images decided at a dropped scale would vanish")
    return chosen


def _every_image_has_every_scale(index: CountsIndex) -> bool:
    cells = np.unique(np.stack([index.image_id.astype(np.float64), index.sigma]), axis=1).shape[1]
    return len(index.image_ids) * len(np.unique(index.sigma)) == cells


def _effective(run: CertifyConfig | None, available: tuple[float, ...], sigmas: tuple[float, ...],
               alpha: float | None, alpha_mode: str | None, routing: str | None, p0: float | None) -> CertifyConfig:
    """The run's configuration (or the bare-counts default) with the requested statistics: the routing
    default follows a changed alpha mode (CertifyConfig.replace)."""
    base = run or CertifyConfig(sigmas=available)  # bare counts: the configuration's defaults
    changes: dict = {"sigmas": sigmas}
    if alpha is not None:
        changes.update(alpha=alpha, family_wise=False)
    if alpha_mode is not None and alpha_mode != base.alpha_mode:
        changes["alpha_mode"] = alpha_mode
    if routing is not None:
        changes["routing"] = routing
    if p0 is not None:
        changes["p0"] = p0
    return base.replace(**changes)


def _hint(run: CertifyConfig | None, routing: str, adaptive: bool) -> str:
    """What to do about images that lack rows: depends on how the counts were sampled."""
    if adaptive:
        return "resume the run to sample them"
    if run is None:
        return (f"routing {routing} needs scales these bare counts lack; sample them, or pass the routing the "
                "counts were sampled with (e.g. --routing cascade)")
    if run.strategy == "early_exit" and run.routing != routing:
        return (f"the run sampled early exit with routing {run.routing}: reduce with that routing, or sample "
                "with --all-scales")
    return "resume the run (certify --resume) to sample them"


def refuse_incomplete(missing: np.ndarray, num_asked: int, unreadable: Sequence[str], hint: str) -> None:
    """Name what is missing (count, ids, unreadable shards) in one line."""
    if not len(missing) and not unreadable:
        return
    ids = ", ".join(str(i) for i in missing[:LISTED_IDS]) + (", …" if len(missing) > LISTED_IDS else "")
    parts = [f"{len(missing)} of {num_asked} image(s) lack the counts their routing needs"
             + (f" (ids {ids})" if len(missing) else "")]
    if unreadable:
        parts.append(f"unreadable shard(s): {', '.join(unreadable)}")
    raise UserError("; ".join(parts) + f"; {hint}")


def _single_scales(arrays: CountsArrays, config: CertifyConfig, so_far: dict[float, list[pa.Table]],
                   first: bool) -> dict[float, list[pa.Table]]:
    """Cohen et al. at each scale alone, kept only for the scales every image of every group has."""
    kept = {}
    for k, sigma in enumerate(arrays.sigmas.tolist()):
        if arrays.present[:, k].all() and (first or sigma in so_far):
            result = certify_single_scale(arrays.select_counts[:, k], arrays.estimate_counts[:, k], sigma,
                                          config.rule)
            table = results_table(arrays.image_ids, arrays.labels, result, arrays.sigmas[k:k + 1])
            kept[sigma] = [*so_far.get(sigma, []), table]
    return kept


def reduce_job(counts: str, out: str, *, overwrite: bool = False, sigmas: str | None = None,
               alpha: float | None = None, alpha_mode: str | None = None, routing: str | None = None,
               p0: float | None = None) -> str:
    """jobs/reduce.py: reduce, write `out` (never over an existing file unless `overwrite`), and return
    the printed summary: one line, then the report's table row (with the scales per image early exit
    would sample under this routing, for counts holding every scale of every image)."""
    from pipeline.app.presets import parse_sigmas
    from pipeline.app.report import markdown_table
    from pipeline.store.atomic import write_parquet
    from pipeline.store.metrics import summary_rows

    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path) and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    reduced, config = reduce_counts(counts, sigmas=parse_sigmas(sigmas) if sigmas else None, alpha=alpha,
                                    alpha_mode=alpha_mode, routing=routing, p0=p0)
    results = reduced.results
    write_parquet(results, out)
    certified = int((results["prediction"].to_numpy() >= 0).sum())
    row = summary_rows({"/".join(f"{s:g}" for s in config.sigmas) + f" {config.routing}": results})[0]
    if reduced.scales_per_image is not None and config.strategy != "adaptive":
        row["scales/image"] = reduced.scales_per_image
    return (f"wrote {out}: {results.num_rows} images, {certified} certified, sigmas {list(config.sigmas)}, "
            f"{config.alpha_mode} mode, routing {config.routing}, alpha={config.image_alpha:g} per image\n"
            + markdown_table([row]))


REDUCE_EPILOG = """
Defaults come from the run that wrote the counts (run_config.json beside counts/, else the settings
in every shard's metadata): its sigmas, per-image alpha, alpha mode, p0 and routing. Counts of an
adaptive run go to the sequential (confidence-sequence) reduce, never to Clopper-Pearson. Every image
the run was asked to certify (OUT/images.parquet) must have the rows the routing needs, or the reduce
names the missing ones instead of certifying the others alone. Union mode's guarantee is per image:
each certificate is wrong with probability at most alpha (docs/statistics.md).
"""
