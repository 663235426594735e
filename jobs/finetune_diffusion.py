"""Fine-tune the diffusion denoiser for the multi-scale cascade with Ray Train (--help: the method and runs).

    python jobs/finetune_diffusion.py --num-workers 2                  # digits, CPU, a few minutes
"""

import sys
from pathlib import Path

# `python jobs/finetune_diffusion.py` from a plain checkout (no `pip install -e .`)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.app.cli import run_main  # noqa: E402
from pipeline.app.finetune import build_parser, finetune_and_report  # noqa: E402


def main() -> None:
    print(finetune_and_report(build_parser().parse_args()))


if __name__ == "__main__":
    run_main(main)
