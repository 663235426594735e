"""Measure how often certificates over-claim, on base classifiers with known class probabilities.

    python jobs/coverage.py --trials 10000 --alpha 0.05 --seed 0 --out coverage.json
"""

from pipeline.app.cli import run_main
from pipeline.app.coverage import build_parser, coverage


def main() -> None:
    print(coverage(build_parser().parse_args()))


if __name__ == "__main__":
    run_main(main)
