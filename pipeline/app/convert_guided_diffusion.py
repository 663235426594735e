"""The guided-diffusion converter's command line (jobs/convert_guided_diffusion.py): flags spelled as the
original repositories spell them, a preset of published architecture flags, and the summary it prints.
The conversion itself is pipeline/models/guided_diffusion.py.
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from pipeline.data.filesystems import open_location
from pipeline.models.guided_diffusion import (
    UNET_ARCHITECTURES,
    ConvertedDenoiser,
    GuidedDiffusionConfig,
    check_output_dir,
    convert_guided_diffusion,
    save_converted,
)

DESCRIPTION = """Convert an OpenAI guided-diffusion / improved-diffusion UNet checkpoint (.pt) into a diffusers directory.

The directory holds a UNet2DModel (config.json + diffusion_pytorch_model.safetensors), the
DDPMScheduler of the full training schedule (scheduler_config.json) and, for improved-diffusion models
trained on rescaled timesteps, timestep_scale.json (the network sees t*1000/T): what load_denoiser(dir) reads.

Checkpoints are not downloaded here; get them from the READMEs of the GitHub repositories:
  openai/guided-diffusion    256x256_diffusion_uncond.pt   -> --preset imagenet256-uncond
  openai/improved-diffusion  cifar10_uncond_50M_500K.pt    -> --preset cifar10-improved
For other checkpoints pass the MODEL_FLAGS and DIFFUSION_FLAGS their README lists (both the
guided-diffusion spelling --num_channels and --num-channels work; booleans take True/False).
Flags left unset come from the preset, else from the checkpoint's tensor shapes; flags that are set
are checked against the checkpoint. --image-size, the attention head split and the schedule are not
stored in the weights, so they must be given (or come from a preset).
"""

EXAMPLES = """examples:
  python jobs/convert_guided_diffusion.py 256x256_diffusion_uncond.pt models/imagenet256 --preset imagenet256-uncond
  python jobs/convert_guided_diffusion.py cifar10_uncond_50M_500K.pt models/cifar10 --preset cifar10-improved
  python jobs/convert_guided_diffusion.py model.pt out --image_size 64 --num_channels 128 --num_res_blocks 3 \\
      --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine --rescale_timesteps True
"""


def parse_bool(text: str) -> bool:
    """guided-diffusion's str2bool spellings, so its flag lines can be pasted."""
    lowered = text.lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_guided_diffusion.py",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="the original .pt state dict (a local path or an fsspec URL: s3://, gs://)")
    parser.add_argument("out_dir", help="directory to write, a local path or an fsspec URL (must be empty or new)")
    parser.add_argument("--preset", choices=sorted(UNET_ARCHITECTURES), help="flags of a published checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")

    model = parser.add_argument_group("architecture (unset: preset, else read from the checkpoint)")
    model.add_argument("--image-size", "--image_size", type=int, metavar="N",
                       help="training resolution (required without preset)")
    model.add_argument("--num-channels", "--num_channels", type=int, metavar="N", help="base channel count")
    model.add_argument("--num-res-blocks", "--num_res_blocks", type=int, metavar="N", help="ResBlocks per level")
    model.add_argument("--channel-mult", "--channel_mult", type=parse_ints, metavar="N,N,...",
                       help="e.g. 1,1,2,2,4,4 (default: guided-diffusion's for the image size)")
    model.add_argument("--attention-resolutions", "--attention_resolutions", type=parse_ints, metavar="N,N,...",
                       help="e.g. 32,16,8")
    model.add_argument("--num-heads", "--num_heads", type=int, metavar="N",
                       help="heads per attention layer (default 4)")
    model.add_argument("--num-head-channels", "--num_head_channels", type=int, metavar="N",
                       help="channels per head; overrides --num-heads (default -1: use --num-heads)")
    model.add_argument("--use-new-attention-order", "--use_new_attention_order", type=parse_bool, metavar="BOOL",
                       help="qkv split before heads (default False, the legacy order)")
    model.add_argument("--learn-sigma", "--learn_sigma", type=parse_bool, metavar="BOOL",
                       help="learned variance: twice the input channels out (6 for RGB)")
    model.add_argument("--use-scale-shift-norm", "--use_scale_shift_norm", type=parse_bool, metavar="BOOL")
    model.add_argument("--resblock-updown", "--resblock_updown", type=parse_bool, metavar="BOOL")
    model.add_argument("--dropout", type=float, metavar="P", help="stored in the config (used only when training)")

    diffusion = parser.add_argument_group("diffusion schedule (unset: preset, else guided-diffusion's defaults)")
    diffusion.add_argument("--diffusion-steps", "--diffusion_steps", type=int, metavar="N", help="T (default 1000)")
    diffusion.add_argument("--noise-schedule", "--noise_schedule", choices=("linear", "cosine"), help="default linear")
    diffusion.add_argument("--rescale-timesteps", "--rescale_timesteps", type=parse_bool, metavar="BOOL",
                           help="network saw t*1000/T (improved-diffusion's default; default False)")
    return parser


def config_from_args(args: argparse.Namespace) -> GuidedDiffusionConfig:
    """The preset (or the defaults), with every flag the user gave on top."""
    base = UNET_ARCHITECTURES[args.preset] if args.preset else GuidedDiffusionConfig()
    given = {field.name: getattr(args, field.name) for field in fields(GuidedDiffusionConfig)}
    return replace(base, **{name: value for name, value in given.items() if value is not None})


def describe(converted: ConvertedDenoiser, config: GuidedDiffusionConfig) -> list[str]:
    """Two summary lines, so the user can compare them with the checkpoint's published flags."""
    model, schedule = converted.unet.config, converted.scheduler.config
    parameters = sum(param.numel() for param in converted.unet.parameters())
    rescaled = (f", network input t*{converted.timestep_scale:g} (rescale_timesteps)"
                if converted.timestep_scale != 1.0 else "")
    return [
        f"UNet2DModel: {parameters / 1e6:.1f}M parameters, {model.sample_size}x{model.sample_size}, "
        f"{model.in_channels}->{model.out_channels} channels, blocks {list(model.block_out_channels)}, "
        f"attention head dim {model.attention_head_dim}",
        f"DDPMScheduler: {schedule.num_train_timesteps} steps ({config.noise_schedule}{rescaled}), "
        f"variance {schedule.variance_type}, prediction {schedule.prediction_type}",
    ]


def convert_checkpoint(args: argparse.Namespace) -> None:
    """Convert args.checkpoint into args.out_dir and print what was written."""
    config = config_from_args(args)
    check_output_dir(args.out_dir, args.overwrite)  # before minutes of loading a large checkpoint
    converted = convert_guided_diffusion(args.checkpoint, config)
    written = save_converted(converted, args.out_dir, overwrite=args.overwrite)
    for line in describe(converted, config):
        print(line)
    for location in written:
        fs, path = open_location(location)
        print(f"wrote {location} ({fs.size(path):,} bytes)")
