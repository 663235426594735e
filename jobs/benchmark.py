"""Measure the certifier's speed against the published sampling loop, Ray Data and the hardware.

    python jobs/benchmark.py --quick --skip-ray       # a smoke test; --help lists the sections
"""

from pipeline.app.benchmark import benchmark, build_parser
from pipeline.app.cli import run_main


def main() -> None:
    print(benchmark(build_parser().parse_args()))


if __name__ == "__main__":
    run_main(main)
