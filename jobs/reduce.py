"""Apply the cascade rule to a counts Parquet file or directory and write results.parquet.

    python jobs/reduce.py OUT/counts --out OUT/results-reference.parquet --alpha-mode reference
"""

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.cascade import ALPHA_MODES
from pipeline.cli import run_main
from pipeline.counts import counts_to_arrays, read_counts
from pipeline.errors import UserError
from pipeline.reduce import reduce_cascade


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("counts", help="counts Parquet file or directory (image_id, label, sigma, "
                        "select_counts, estimate_counts); the sigmas are read from the data")
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
    arrays = counts_to_arrays(read_counts(args.counts))
    results = reduce_cascade(arrays, args.alpha, args.alpha_mode, args.p0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(results, tmp)
    tmp.replace(out)
    certified = int((results["prediction"].to_numpy() >= 0).sum())
    print(f"wrote {out}: {results.num_rows} images, {certified} certified, sigmas {arrays.sigmas.tolist()}")


if __name__ == "__main__":
    run_main(main)
