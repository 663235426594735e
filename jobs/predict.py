"""Cascaded prediction (no certificate) with multi-scale diffusion denoised smoothing.

    python jobs/predict.py --n 100 --out outputs/digits-predict
"""

from pipeline.app.args import build_parser, request_from_args
from pipeline.app.cli import run_main
from pipeline.app.predict import predict


def main() -> None:
    parser = build_parser("digits", __doc__.strip().splitlines()[0])
    parser.set_defaults(n=100)
    print(predict(request_from_args(parser.parse_args(), task="predict")))


if __name__ == "__main__":
    run_main(main)
