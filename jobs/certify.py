"""Certify a classifier with multi-scale diffusion denoised smoothing (default: the embedded digits).

    python jobs/certify.py                       # digits, trains the tiny models on first use
    python jobs/certify.py --all-scales --out outputs/digits-all --n 2000
"""

from pipeline.app.certify import certify
from pipeline.app.args import build_parser, request_from_args
from pipeline.app.cli import run_main


def main() -> None:
    parser = build_parser("digits", __doc__.strip().splitlines()[0])
    print(certify(request_from_args(parser.parse_args())))


if __name__ == "__main__":
    run_main(main)
