"""Compare runs: certified accuracy at the report's radii, ACR, certified wrong and forwards per image.

    python jobs/compare.py outputs/digits outputs/digits-best --names continue,best --out outputs/compare

Each run is an OUT directory of jobs/certify.py (or a results Parquet file); paths or fsspec URLs. With
--out, also writes comparison.md and comparison.png (one certified-accuracy curve per run) there.
"""

from __future__ import annotations

import argparse

from pipeline.app.cli import run_main
from pipeline.app.compare import compare_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.strip().splitlines()[1:]))
    parser.add_argument("outs", nargs="+", help="run directories (holding results.parquet) or results files")
    parser.add_argument("--names", help="comma-separated run names for the table and plot (default: directory names)")
    parser.add_argument("--out", help="directory for comparison.md and comparison.png (default: print only)")
    parser.add_argument("--radii", help="comma-separated radii for certified accuracy (default: 0,0.25,0.5,0.75,1)")
    args = parser.parse_args()
    print(compare_job(args.outs, args.names, args.out, args.radii))


if __name__ == "__main__":
    run_main(main)
