"""Convert an OpenAI guided-diffusion / improved-diffusion UNet checkpoint (.pt) into a diffusers directory.

    python jobs/convert_guided_diffusion.py 256x256_diffusion_uncond.pt models/imagenet256 --preset imagenet256-uncond

--help says where the checkpoints come from and which flags they need.
"""

from pipeline.app.cli import exit_status
from pipeline.app.convert_guided_diffusion import build_parser, convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    return exit_status(convert_checkpoint, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
