"""Apply the cascade rule to a counts Parquet file or directory and write results.parquet.

    python jobs/reduce.py OUT/counts --out OUT/results-reference.parquet --alpha-mode reference
"""

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.stats.cascade import ALPHA_MODES
from pipeline.app.cli import run_main
from pipeline.store.counts import counts_to_arrays, read_counts
from pipeline.errors import UserError
from pipeline.app.presets import parse_sigmas
from pipeline.app.reduce import reduce_adaptive, reduce_cascade
from pipeline.store.run_config import counts_run_settings


def run_sigmas(counts: str, flag: str | None) -> tuple[float, ...] | None:
    """--sigmas, else the certify run's run_config.json beside counts/, else None (from the data)."""
    if flag:
        return parse_sigmas(flag)
    config = Path(counts).resolve().parent / "run_config.json"
    if Path(counts).is_dir() and config.is_file():
        return tuple(json.loads(config.read_text())["sigmas"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("counts", help="counts Parquet file or directory (image_id, label, sigma, "
                        "select_counts, estimate_counts)")
    parser.add_argument("--sigmas", help="the cascade's scales, e.g. 1.0,0.5,0.25 (rows at other scales are "
                        "ignored, so an --all-scales run can be reduced over any subset); default: run_config.json "
                        "next to a counts/ directory written by certify, else the sigmas found in the data")
    parser.add_argument("--out", required=True, help="results Parquet file to write")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES, default="union",
                        help="union (sound joint guarantee, default) or reference (alpha/k, as published)")
    parser.add_argument("--p0", type=float, default=0.5, help="probability threshold (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    sigmas = run_sigmas(args.counts, args.sigmas)
    table = read_counts(args.counts)
    if args.sigmas:  # an explicit subset: reduce the cascade over those scales only
        table = table.filter(pc.is_in(table["sigma"], value_set=pa.array(sigmas, pa.float64())))
    arrays = counts_to_arrays(table, sigmas)
    sampled = counts_run_settings(args.counts) or {}
    if sampled.get("strategy") == "adaptive":  # stopped on the data: Clopper-Pearson would over-claim
        if args.alpha_mode != "union" or args.sigmas:
            raise UserError("adaptive counts reduce with the sequential rule over the run's own scales, in union "
                            "mode only (drop --alpha-mode / --sigmas)")
        results = reduce_adaptive(arrays, args.alpha, args.p0, sampled.get("routing", "cascade"),
                                  sampled.get("target_radii", ()))
    else:
        results = reduce_cascade(arrays, args.alpha, args.alpha_mode, args.p0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(results, tmp)
    tmp.replace(out)
    certified = int((results["prediction"].to_numpy() >= 0).sum())
    print(f"wrote {out}: {results.num_rows} images, {certified} certified, sigmas {arrays.sigmas.tolist()}")


if __name__ == "__main__":
    run_main(main)
