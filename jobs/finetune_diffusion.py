"""Fine-tune the diffusion denoiser for the multi-scale cascade (method.md §6) with Ray Train.

The classifier stays frozen; the UNet (or a LoRA adapter on it) learns to denoise so that recoverable
inputs are classified correctly and non-recoverable ones get denoisings that disagree, which makes the
smoothed classifier abstain (or fall through to a lower scale) instead of certifying a wrong class.
Data, denoiser and classifier are given as to the certification jobs; docs/finetuning.md has the
ImageNet cluster run.

    python jobs/finetune_diffusion.py --num-workers 2                  # digits, CPU, a few minutes
    python jobs/finetune_diffusion.py --out outputs/finetune-digits --resume --epochs 12
    python jobs/certify.py --all-scales --denoiser outputs/finetune-digits/denoiser
    python jobs/finetune_diffusion.py --preset cifar10 --data DIR/cifar-10-batches-py \\
        --denoiser models/cifar10-improved --classifier hf:models/vit-cifar10 --device cuda
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python jobs/finetune_diffusion.py` from a plain checkout

from pipeline.app.cli import run_main  # noqa: E402
from pipeline.app.finetune import build_parser, finetune  # noqa: E402


def main() -> None:
    args = build_parser(__doc__.strip()).parse_args()
    denoiser_out = finetune(args)
    script = "certify_imagenet.py" if args.preset == "imagenet" else "certify.py"
    print(f"fine-tuned denoiser: {denoiser_out}" + (f" (copied to {args.export_to})" if args.export_to else ""))
    print(f"certify with it:     python jobs/{script} --preset {args.preset} --denoiser {denoiser_out} ...")


if __name__ == "__main__":
    run_main(main)
