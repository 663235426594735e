"""Cascaded prediction (no certificate) with multi-scale diffusion denoised smoothing.

    python jobs/predict.py --n 100 --out outputs/digits-predict
"""

from dataclasses import replace

from pipeline.app.args import build_parser, request_from_args
from pipeline.app.cli import run_main
from pipeline.errors import UserError
from pipeline.app.predict import predict


def main() -> None:
    parser = build_parser("digits", __doc__.strip().splitlines()[0])
    parser.set_defaults(n=100)
    args = parser.parse_args()
    if args.adaptive:
        raise UserError("--adaptive is for certification; predict uses the fixed-n test of method.md §5")
    if args.out is None:
        args.out = f"outputs/{args.preset}-predict"
    request = request_from_args(args)
    sampling = replace(request.sampling, n_select=0, strategy="predict")
    print(predict(replace(request, sampling=sampling)))


if __name__ == "__main__":
    run_main(main)
