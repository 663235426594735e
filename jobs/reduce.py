"""Apply the cascade rule to a counts Parquet file or directory and write results.parquet.

    python jobs/reduce.py OUT/counts --out OUT/results-best.parquet --routing best
    python jobs/reduce.py OUT/counts --out OUT/results-reference.parquet --alpha-mode reference

Defaults come from the run that wrote the counts (run_config.json beside counts/, else the settings
in every shard's metadata): its sigmas, per-image alpha, alpha mode, p0 and routing. Counts of an
adaptive run go to the sequential (confidence-sequence) reduce, never to Clopper-Pearson. Every image
the run was asked to certify (OUT/images.parquet) must have the rows the routing needs, or the reduce
names the missing ones instead of certifying the others alone. Union mode's guarantee is per image:
each certificate is wrong with probability at most alpha (docs/statistics.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.app.cli import run_main
from pipeline.app.presets import parse_sigmas
from pipeline.app.reduce import (
    cascade_lacking,
    missing_images,
    reduce_adaptive,
    reduce_cascade,
    refuse_incomplete,
    scales_sampled,
)
from pipeline.app.report import markdown_table
from pipeline.store.metrics import summary_rows
from pipeline.errors import UserError
from pipeline.stats.cascade import ALPHA_MODES, ROUTINGS, check_p0
from pipeline.store.counts import CountsArrays, counts_to_arrays, read_counts_reporting
from pipeline.store.atomic import write_parquet
from pipeline.store.run_config import counts_run_settings, read_image_ids

DEFAULT_ALPHA = 0.001


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.strip().splitlines()[1:]))
    parser.add_argument("counts", help="counts Parquet file or directory (image_id, label, sigma, "
                        "select_counts, estimate_counts)")
    parser.add_argument("--sigmas", help="the cascade's scales, e.g. 1.0,0.5,0.25; a subset of the run's scales "
                        "only for --all-scales runs or bare counts where every image has every scale (an early-exit "
                        "run's images decided at a dropped scale would vanish); default: the run's, else the data's")
    parser.add_argument("--out", required=True, help="results Parquet file to write")
    parser.add_argument("--alpha", type=float, help="failure probability of each image's certificate "
                        f"(default: the run's per-image alpha, else {DEFAULT_ALPHA})")
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES,
                        help="union (per-image guarantee, 2K-1 exact intervals) or reference (alpha/k, Goodman, "
                             "as published; no guarantee); default: the run's, else union")
    parser.add_argument("--routing", choices=ROUTINGS,
                        help="union mode: cascade (published), continue, or best (every scale needed); "
                             "default: the run's routing, else continue (union) / cascade (reference)")
    parser.add_argument("--p0", type=float, help="probability threshold, >= 0.5 (default: the run's, else 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser.parse_args()


def cascade_sigmas(flag: str | None, settings: dict | None, table: pa.Table) -> tuple[float, ...] | None:
    """--sigmas, checked against how the counts were sampled; else the run's; else None (the data's)."""
    run = tuple(settings["sigmas"]) if settings else None
    if not flag:
        return run
    sigmas = parse_sigmas(flag)
    available = run or tuple(sorted(set(table["sigma"].to_pylist()), reverse=True))
    dropped = sorted(set(available) - set(sigmas), reverse=True)
    if not dropped:
        return sigmas
    strategy = settings["strategy"] if settings else None
    if strategy in ("early_exit", "adaptive"):
        raise UserError(f"--sigmas drops scale(s) {dropped} of an {strategy.replace('_', '-')} run: images decided "
                        "there have no rows at the other scales and would vanish; reduce over all of "
                        f"{list(available)}, or sample with --all-scales to reduce over any subset")
    if strategy is None and not counts_to_arrays(table).present.all():
        raise UserError(f"--sigmas drops scale(s) {dropped}, but not every image of these bare counts has every "
                        "scale: images decided at a dropped scale would vanish")
    return sigmas


def statistics(args: argparse.Namespace, settings: dict | None) -> tuple[float, str, str, float]:
    """alpha, alpha mode, routing and p0: the flags, else the run's, else the defaults."""
    run = settings or {}
    alpha = args.alpha if args.alpha is not None else run.get("alpha", DEFAULT_ALPHA)
    alpha_mode = args.alpha_mode or run.get("alpha_mode", "union")
    p0 = args.p0 if args.p0 is not None else run.get("p0", 0.5)
    check_p0(p0)
    if args.routing:
        routing = args.routing
    elif alpha_mode == run.get("alpha_mode") and "routing" in run:
        routing = run["routing"]
    else:
        routing = "continue" if alpha_mode == "union" else "cascade"
    return alpha, alpha_mode, routing, p0


def reduce(args: argparse.Namespace, settings: dict | None, arrays: CountsArrays, asked: np.ndarray | None,
           unreadable: list[str]) -> pa.Table:
    """The results, once every asked image is known to have the rows its reduce needs."""
    alpha, alpha_mode, routing, p0 = statistics(args, settings)
    num_asked = len(asked) if asked is not None else len(arrays.image_ids)
    if settings and settings.get("strategy") == "adaptive":
        run_routing = settings.get("routing", "cascade")
        if args.alpha_mode == "reference" or args.routing not in (None, run_routing):
            raise UserError("these counts come from an adaptive run (stopped on the data): only the sequential "
                            f"cascade with the run's own routing ({run_routing}) is valid on them; drop "
                            "--alpha-mode / --routing")
        refuse_incomplete(missing_images(arrays, asked), num_asked, unreadable, "resume the run to sample them")
        return reduce_adaptive(arrays, alpha, p0, run_routing, settings.get("target_radii", ()))
    lacking = cascade_lacking(arrays, alpha, alpha_mode, p0, routing)
    refuse_incomplete(missing_images(arrays, asked, lacking), num_asked, unreadable, _hint(settings, routing))
    return reduce_cascade(arrays, alpha, alpha_mode, p0, routing)


def _hint(settings: dict | None, routing: str) -> str:
    """What to do about images that lack rows: depends on how the counts were sampled."""
    if settings is None:
        return (f"routing {routing} needs scales these bare counts lack; sample them, or pass the routing the "
                "counts were sampled with (e.g. --routing cascade)")
    sampled_with = settings.get("routing") if settings.get("strategy") == "early_exit" else None
    if sampled_with and sampled_with != routing:
        return (f"the run sampled early exit with routing {sampled_with}: reduce with that routing, or sample "
                "with --all-scales")
    return "resume the run (certify --resume) to sample them"


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    settings = counts_run_settings(args.counts)
    if settings and settings.get("strategy") == "predict":
        raise UserError("these counts come from a predict run (no selection votes): they cannot be certified")
    table, unreadable = read_counts_reporting(args.counts)
    sigmas = cascade_sigmas(args.sigmas, settings, table)
    if args.sigmas:  # a checked subset: reduce the cascade over those scales only
        table = table.filter(pc.is_in(table["sigma"], value_set=pa.array(sigmas, pa.float64())))
    arrays = counts_to_arrays(table, sigmas)
    asked = read_image_ids(str(Path(args.counts).resolve().parent)) if Path(args.counts).is_dir() else None
    results = reduce(args, settings, arrays, asked, unreadable)
    write_parquet(results, str(out))
    alpha, alpha_mode, routing, p0 = statistics(args, settings)
    certified = int((results["prediction"].to_numpy() >= 0).sum())
    print(f"wrote {out}: {results.num_rows} images, {certified} certified, sigmas {arrays.sigmas.tolist()}, "
          f"{alpha_mode} mode, routing {routing}, alpha={alpha:g} per image")
    print(summary(results, arrays, settings, (alpha, alpha_mode, routing, p0)))


def summary(results: pa.Table, arrays: CountsArrays, settings: dict | None, stats: tuple) -> str:
    """The report's table row for these results; for counts with every scale of every image, also the
    scales per image that early exit under this routing samples."""
    alpha, alpha_mode, routing, p0 = stats
    row = summary_rows({"/".join(f"{s:g}" for s in arrays.sigmas) + f" {routing}": results})[0]
    adaptive = bool(settings) and settings.get("strategy") == "adaptive"
    if arrays.present.all() and not adaptive:
        row["scales/image"] = float(scales_sampled(arrays, alpha, alpha_mode, p0, routing).mean())
    return markdown_table([row])


if __name__ == "__main__":
    run_main(main)
