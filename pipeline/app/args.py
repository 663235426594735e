"""Command-line interface shared by jobs/certify.py and jobs/certify_imagenet.py."""

from __future__ import annotations

import argparse

from pipeline.app.certify import CertifyRequest
from pipeline.app.presets import DATASET_PRESETS, get_preset, parse_sigmas
from pipeline.config import ALPHA_MODES, CONFIG_DEFAULTS, ROUTINGS, CertifyConfig, Task
from pipeline.errors import UserError
from pipeline.sampling.kernel import default_device
from pipeline.distributed.run import ExecutionConfig
from pipeline.app.workload import DEFAULT_PREPROCESS, DataOptions, ModelOptions
from pipeline.data.decode import PREPROCESSING
from pipeline.models.classifier import INTERPOLATIONS
from pipeline.models.denoiser import DENOISER_FITS
from pipeline.models.precision import PRECISION_CHOICES, resolve_precision

EPILOG = """\
outputs (OUT):
  counts/part-*.parquet  one row per (image_id, sigma): select_counts, estimate_counts (resumable shards)
  results.parquet        image_id, label, prediction (-1 = abstain), radius, sigma (deciding scale), correct
  report.md, certified_accuracy.png, run_config.json

query:  duckdb -c "SELECT avg(correct::INT) FROM 'OUT/results.parquet' WHERE radius >= 0.5"

guarantee (union mode, docs/statistics.md): each image's certificate is wrong with probability at most
--alpha over that image's sampling noise, whatever the routing; a run of M images has at most alpha*M
wrong certificates in expectation. It is NOT a joint guarantee over the run: --family-wise runs every
image at alpha/M, so that all M certificates hold together with probability at least 1 - alpha.
"""


def preset_defaults() -> str:
    """The presets' values as a table for --help: what a run certifies when no flag overrides them."""
    lines = ["preset defaults (each can be overridden by its flag):"]
    for p in DATASET_PRESETS.values():
        images = "all" if p.num_images is None else str(p.num_images)
        lines.append(f"  {p.name:<9} --sigmas {','.join(f'{s:g}' for s in p.sigmas)}  --n-select {p.n_select}  "
                     f"--n {p.n}  --alpha {p.alpha:g}  --skip {p.skip}  --num-images {images}  "
                     f"--batch-size {p.batch_size}  ({p.num_classes} classes)")
    return "\n".join(lines)


def build_parser(default_preset: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=preset_defaults() + "\n\n" + EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset,
                        help="named defaults: " + "; ".join(f"{p.name}: {p.description}" for p in DATASET_PRESETS.values())
                        + f" (default: {default_preset})")
    parser.add_argument("--out", default=None, help="output directory or fsspec URL (s3://, gs://); "
                        "default: outputs/<preset>")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out, skipping every (image, sigma) already on disk")
    stats = parser.add_argument_group("certification")
    stats.add_argument("--sigmas", help="comma-separated noise scales, e.g. 1.0,0.5,0.25 (preset default)")
    stats.add_argument("--n-select", type=int, help="selection samples per image and scale (N0)")
    stats.add_argument("--n", type=int, help="estimation samples per image and scale (N)")
    stats.add_argument("--alpha", type=float,
                       help="failure probability of each image's certificate (per image; see --family-wise)")
    stats.add_argument("--family-wise", action="store_true",
                       help="run every image at alpha/M (M = images certified) so that all certificates of "
                            "the run hold jointly with probability >= 1 - alpha")
    stats.add_argument("--alpha-mode", choices=ALPHA_MODES, default="union",
                       help="union (default): alpha split over the 2K-1 intervals an image's certificate can "
                            "use (K lower bounds, K-1 exact cap families), valid for every --routing; "
                            "reference: alpha/k at stage k with Goodman caps, as the published code (no "
                            "guarantee; routing cascade only)")
    stats.add_argument("--p0", type=float, default=0.5, help="probability threshold, >= 0.5 (default 0.5)")
    stats.add_argument("--routing", choices=ROUTINGS, default=None,
                       help="which scales an image visits and which one speaks (union mode): cascade = as "
                            "published, an undecided scale abstains; continue (default) = a scale that does "
                            "not certify passes the image on, the first positive capped radius is issued; "
                            "best = every scale is sampled, the largest positive capped radius is issued. "
                            "Reference mode is always cascade")
    stats.add_argument("--all-scales", action="store_true",
                       help="sample every scale for every image (single-scale baselines in the report) "
                            "instead of early exit")
    stats.add_argument("--adaptive", action="store_true",
                       help="sample each (image, scale) in rounds up to --n and stop once its decision is "
                            "settled; confidence sequences keep the certificate valid at --alpha")
    stats.add_argument("--radius-tolerance", type=float, default=CONFIG_DEFAULTS["radius_tolerance"],
                       help="--adaptive: stop once the radius is within this of what --n samples would give "
                            "(default %(default)s)")
    stats.add_argument("--target-radius", type=float, action="append", default=[], metavar="R",
                       help="--adaptive: only ask whether each image is certified at radius R (repeatable); "
                            "stop as soon as every R is proven or out of reach. The radius reported is the "
                            "largest R proven; images with none abstain")
    stats.add_argument("--adaptive-select", type=int, default=CONFIG_DEFAULTS["adaptive_select"], metavar="N",
                       help="--adaptive: selection samples per consulted (image, scale), the first N of "
                            "--n-select's (default %(default)s)")
    stats.add_argument("--seed", type=int, default=0, help="noise seed; counts depend only on it, not on batching")
    data = parser.add_argument_group("data and models")
    data.add_argument("--data", help="dataset location (cifar10: cifar-10-batches-py dir; imagenet: class-folder "
                      "tree or Parquet of image bytes; local path or fsspec URL)")
    data.add_argument("--num-images", type=int, help="certify at most this many images (after --skip)")
    data.add_argument("--skip", type=int, help="certify every k-th image (preset default)")
    data.add_argument("--start", type=int, default=0, help="first image index")
    data.add_argument("--on-bad-image", choices=("fail", "skip"), default="fail",
                      help="unreadable image files: fail, or skip with a warning and list them in the report")
    add_model_arguments(data)
    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, help="samples per fused forward pass (preset default)")
    run.add_argument("--images-per-batch", type=int, default=16,
                     help="images per actor batch, at most (default 16; fewer when a run has too few images "
                          "to keep every actor busy). The actor runs the batch's whole cascade, so later "
                          "scales see only the images routed there: 16 images keep every stage's forwards "
                          "full at the presets' n, while a preempted batch loses little")
    run.add_argument("--num-actors", type=int, default=None,
                     help="parallel model copies (default: one per GPU; without GPUs one per CPU core, "
                          "each on one thread, minus one core for Ray Data's read tasks unless the data is "
                          "the in-memory digits set)")
    run.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                     help="auto: one GPU per actor if this machine or the cluster has GPUs now (default); "
                          "cuda: always ask one GPU per actor, which makes an autoscaling cluster whose GPU "
                          "workers start at 0 launch them (give --num-actors too); cpu: no GPUs")
    run.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                     help="arithmetic of the denoiser and classifier: bf16 autocast or exact fp32. auto "
                          "(default): bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX, about 2x "
                          "faster there), fp32 elsewhere. The counts depend on it: --resume keeps a run's own")
    return parser



def add_model_arguments(data: argparse._ArgumentGroup) -> None:
    """The preprocessing and model flags, shared by certification and fine-tuning so that a denoiser is
    fine-tuned on exactly the inputs it will certify (same loaders, fit and classifier resize)."""
    data.add_argument("--preprocess", choices=tuple(PREPROCESSING), metavar="|".join(PREPROCESSING),
                      help="image files (imagenet preset) to the certified 224x224 input: "
                      + "; ".join(p.describe() for p in PREPROCESSING.values())
                      + f" (default {DEFAULT_PREPROCESS})")
    data.add_argument("--denoiser", help="diffusers UNet2DModel + DDPMScheduler directory, local or fsspec URL "
                      "(guided-diffusion .pt checkpoints: convert with jobs/convert_guided_diffusion.py; digits: "
                      "default the cached embedded model, or e.g. a fine-tuned one from jobs/finetune_diffusion.py)")
    data.add_argument("--denoiser-fit", choices=DENOISER_FITS, metavar="|".join(DENOISER_FITS),
                      help="images whose size is not the UNet's: pad (reflection-pad to its size, crop back; the "
                      "published multi-scale code; default), native (run the UNet at the image size, a multiple "
                      "of its downsampling; Carlini et al.), resize (bilinear; changes the noise statistics)")
    data.add_argument("--classifier", help="timm model name (with --classifier-weights; input size, "
                      "interpolation and normalization from timm's data config), hf:DIR or a directory with "
                      "config.json (a Hugging Face transformers image classifier, save_pretrained with its "
                      "image processor; loaded offline), or a TorchScript .pt/.ts/.jit file that takes "
                      "[0,1] images and returns one logit per class, or py:package.module:function, a factory of your own, "
                      "importable on every node (installed or on PYTHONPATH), called with no arguments and returning a "
                      "torch.nn.Module that maps [0,1] images to one logit per class")
    data.add_argument("--classifier-interpolation", choices=INTERPOLATIONS, metavar="|".join(INTERPOLATIONS),
                      help="resize of the denoised image to the classifier's input size (antialiased; default: "
                      "the classifier's own config, bicubic for timm's BEiT/ViT)")
    data.add_argument("--classifier-weights", help="timm classifier weights (.safetensors or torch state dict), "
                      "local or fsspec URL")

def request_from_args(args: argparse.Namespace, task: Task = "certify") -> CertifyRequest:
    """The parsed flags as a request: the preset fills what no flag gives, CertifyConfig checks the
    certification settings (its errors name the flags, app/cli.py)."""
    preset = get_preset(args.preset)
    if args.adaptive and args.all_scales:
        raise UserError("--adaptive works with early exit and union alpha only (drop --all-scales / --alpha-mode)")
    config = CertifyConfig(
        sigmas=parse_sigmas(args.sigmas) if args.sigmas else preset.sigmas,
        n_select=0 if task == "predict" else args.n_select if args.n_select is not None else preset.n_select,
        n=args.n if args.n is not None else preset.n,
        alpha=args.alpha if args.alpha is not None else preset.alpha,
        family_wise=args.family_wise,
        alpha_mode=args.alpha_mode,
        p0=args.p0,
        routing=args.routing,
        strategy="adaptive" if args.adaptive else "all_scales" if args.all_scales else "early_exit",
        radius_tolerance=args.radius_tolerance,
        target_radii=tuple(args.target_radius),
        adaptive_select=args.adaptive_select,
        task=task,
        seed=args.seed,
    )
    if args.images_per_batch < 1:
        raise UserError(f"--images-per-batch must be >= 1, got {args.images_per_batch}")
    gpu = use_gpu(args.device)
    return CertifyRequest(
        preset=preset,
        config=config,
        execution=ExecutionConfig(
            num_actors=num_actors_for(args.num_actors, gpu, reads_files=preset.name != "digits"),
            images_per_batch=args.images_per_batch,
            batch_size=args.batch_size if args.batch_size is not None else preset.batch_size,
            use_gpu=gpu,
        ),
        data=DataOptions(
            data=args.data,
            num_images=args.num_images if args.num_images is not None else preset.num_images,
            skip=args.skip if args.skip is not None else preset.skip,
            start=args.start,
            on_bad_image=args.on_bad_image,
            preprocess=args.preprocess,
        ),
        models=ModelOptions(args.denoiser, args.classifier, args.classifier_weights, args.denoiser_fit or "pad",
                            args.classifier_interpolation, resolve_precision(args.precision, gpu)),
        out=args.out or f"outputs/{preset.name}" + ("-predict" if task == "predict" else ""),
        overwrite=args.overwrite,
        resume=args.resume,
    )


def num_actors_for(requested: int | None, use_gpu: bool, reads_files: bool) -> int:
    """`--num-actors`, checked, or its default: one actor per GPU; without GPUs one single-threaded actor
    per core, which beats one copy using every core (1.5× on 2 cores). When Ray Data tasks read files
    (every preset but the in-memory digits), one core stays free: actors on every core starve the reads
    for good."""
    if requested is not None and requested < 1:
        raise UserError(f"--num-actors must be >= 1, got {requested}")
    if use_gpu:
        return requested or max(1, _cluster_resource("GPU"))
    cores = max(1, _cluster_resource("CPU"))
    if not reads_files:
        return requested or cores
    if requested is not None and cores > 1 and requested > cores - 1:
        raise UserError(f"--num-actors {requested} on CPU would take all {cores} cores and starve Ray Data's "
                        f"read tasks; use at most {cores - 1}")
    return requested or max(1, cores - 1)


def _cluster_resource(name: str) -> int:
    """GPUs or CPU cores of the cluster this job joins (RAY_ADDRESS), else of this machine."""
    import os

    if not os.environ.get("RAY_ADDRESS"):
        if name == "GPU":
            import torch

            return torch.cuda.device_count()
        return len(os.sched_getaffinity(0))
    import ray

    from pipeline.distributed.ray_init import init_ray

    init_ray()
    return int(ray.cluster_resources().get(name, 0))


def use_gpu(device: str) -> bool:
    """Whether each actor asks Ray for one GPU. `auto` sees only the GPUs present now, not the ones an
    autoscaler would add on demand, hence `cuda`."""
    import os

    if device == "cpu":
        return False
    if device == "cuda":
        if not os.environ.get("RAY_ADDRESS") and default_device().type != "cuda":
            raise UserError("--device cuda: this machine has no GPU and no cluster is named by RAY_ADDRESS "
                            "(submit with `ray job submit`, or use --device auto)")
        return True
    return default_device().type == "cuda" or _cluster_resource("GPU") > 0
