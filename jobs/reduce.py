"""Apply the cascade rule to a counts Parquet file or directory and write results.parquet.

    python jobs/reduce.py OUT/counts --out OUT/results-best.parquet --routing best
    python jobs/reduce.py OUT/counts --out OUT/results-reference.parquet --alpha-mode reference
"""

import argparse

from pipeline.app.cli import run_main
from pipeline.app.reduce import REDUCE_EPILOG, reduce_job
from pipeline.config import ALPHA_MODES, ROUTINGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__ + REDUCE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("counts", help="counts Parquet file or directory, local or fsspec URL (image_id, label, "
                        "sigma, select_counts, estimate_counts)")
    parser.add_argument("--sigmas", help="the cascade's scales, e.g. 1.0,0.5,0.25; a subset of the run's scales "
                        "only for --all-scales runs or bare counts where every image has every scale (an early-exit "
                        "run's images decided at a dropped scale would vanish); default: the run's, else the data's")
    parser.add_argument("--out", required=True, help="results Parquet file to write (local or fsspec URL)")
    parser.add_argument("--alpha", type=float, help="failure probability of each image's certificate "
                        "(default: the run's per-image alpha, else 0.001)")
    parser.add_argument("--alpha-mode", choices=ALPHA_MODES,
                        help="union (per-image guarantee, 2K-1 exact intervals) or reference (alpha/k, Goodman, "
                             "as published; no guarantee); default: the run's, else union")
    parser.add_argument("--routing", choices=ROUTINGS,
                        help="union mode: cascade (published), continue, or best (every scale needed); "
                             "default: the run's routing, else continue (union) / cascade (reference)")
    parser.add_argument("--p0", type=float, help="probability threshold, >= 0.5 (default: the run's, else 0.5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = vars(parser.parse_args())
    print(reduce_job(args.pop("counts"), args.pop("out"), **args))


if __name__ == "__main__":
    run_main(main)
