"""The benchmark job's driver (jobs/benchmark.py): its flags, the digits models and settings every
section runs on, and which sections run; the sections themselves are pipeline/perf/benchmark.py and the
table pipeline/perf/benchmark_table.py.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.app.presets import get_preset
from pipeline.config import CONFIG_DEFAULTS, CertifyConfig
from pipeline.data.filesystems import open_location
from pipeline.errors import UserError
from pipeline.models.precision import PRECISION_CHOICES, resolve_precision
from pipeline.models.spec import ModelSpec, as_denoiser
from pipeline.perf.benchmark import (
    BenchmarkImages,
    adaptive_vs_fixed,
    early_exit,
    flops_section,
    fused_vs_reference,
    machine_info,
    main_job,
    raw_fused,
    ray_pipeline,
)
from pipeline.perf.benchmark_table import markdown
from pipeline.sampling.kernel import FusedDenoiseClassify, default_device
from pipeline.store.atomic import write_bytes
from pipeline.store.run_config import join

REPO_ROOT = Path(__file__).resolve().parents[2]  # --main-job runs jobs/certify.py from here

HELP = """Measure the certifier's speed against the published sampling loop, Ray Data and the hardware.

    python jobs/benchmark.py                          # digits, CPU or GPU, all sections (15-30 min on 2 cores)
    python jobs/benchmark.py --quick --skip-ray       # tiny sizes, random weights: a smoke test
    python jobs/benchmark.py --gpu-check              # ImageNet-size UNet + classifier, bf16, MFU (GPU)
    python jobs/benchmark.py --reduce-scale --driver-memory   # memory at ImageNet scale (about 5 min on 2 cores)

Writes OUT/benchmark.json and OUT/benchmark.md and prints the table. Every figure is a ratio of two
runs made back to back in this process; the load average of the machine is recorded with them.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=HELP.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=HELP)
    parser.add_argument("--preset", default="digits", help="data and models to benchmark (only digits; "
                        "ImageNet-size models: --gpu-check)")
    parser.add_argument("--out", default="outputs/benchmark",
                        help="directory for benchmark.json / benchmark.md (a local path or an fsspec URL)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="arithmetic of every timed section, as certify's --precision (auto: bf16 on GPUs "
                             "and on CPUs with native bf16)")
    parser.add_argument("--num-images", type=int, default=8, help="images for the throughput sections")
    parser.add_argument("--n", type=int, default=1000, help="estimation samples per image and scale")
    parser.add_argument("--n-select", type=int, help="selection samples (preset default)")
    parser.add_argument("--batch-size", type=int, help="samples per fused forward (preset default); the "
                        "reference loop uses the same batch unless --reference-batch")
    parser.add_argument("--reference-batch", type=int, help="batch of the reference-style loop")
    parser.add_argument("--repeats", type=int, default=1, help="timed repetitions of fused vs reference (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads in this process (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--denoiser", help="digits denoiser directory, a local path or an fsspec URL (default: the "
                        "cached embedded model)")
    parser.add_argument("--random-models", action="store_true",
                        help="randomly initialised digits architectures (throughput only; no cache needed)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and random models: checks that every section runs, not speed")
    parser.add_argument("--skip-ray", action="store_true", help="skip the Ray Data sections")
    parser.add_argument("--main-job", action="store_true",
                        help="only time `python jobs/certify.py` from an empty model cache, then cached "
                             "(about 5 minutes on 2 cores; run it on an idle machine)")
    parser.add_argument("--ray-efficiency", action="store_true",
                        help="only the Ray Data pipeline against the raw fused step on all scales, with as many "
                             "single-threaded actors as --threads (the target's workload: --num-images 100 "
                             "--n 10000; about 30 minutes with --threads 2 on 2 cores)")
    parser.add_argument("--skip-adaptive", action="store_true", help="skip adaptive vs fixed n")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="skip fused vs reference, early exit, FLOPs and Ray (run adaptive vs fixed n only)")
    parser.add_argument("--adaptive-images", type=int, default=100, help="images for adaptive vs fixed n")
    parser.add_argument("--adaptive-first-image", type=int, default=0, metavar="K",
                        help="adaptive vs fixed n on the digits test images K, K+1, … (default 0: the images "
                             "the rules were tuned on; 100 holds out a second set)")
    parser.add_argument("--n-max", type=int, default=10_000, help="n of the fixed run = n_max of the adaptive run")
    parser.add_argument("--radius-tolerance", type=float, default=CONFIG_DEFAULTS["radius_tolerance"],
                        help="adaptive: stop once the radius is within this of what n_max would give "
                             "(default %(default)s)")
    parser.add_argument("--target-radius", type=float, action="append", default=None, metavar="R",
                        help="target-radius runs to compare (repeatable; default 0.25, 0.5, 0.75): each R alone, "
                             "then all together")
    parser.add_argument("--vote-cache", help="adaptive vs fixed n: .npz of the votes drawn, a local path or an fsspec "
                        "URL (read if present, written after): re-evaluate the rules without re-running the network; a file "
                        "drawn with other settings or another --precision is refused")
    parser.add_argument("--tolerance-sweep", default="0,0.01,0.02,0.1",
                        help="comma-separated further radius tolerances to evaluate on the same votes ('' for none)")
    memory = parser.add_argument_group("memory at ImageNet scale (each measured in a fresh process; together or alone)")
    memory.add_argument("--reduce-scale", action="store_true",
                        help="only the reduce of synthetic ImageNet-shaped counts (--reduce-images images x 3 scales "
                             "x 1,000 classes, n0=100, n=10,000) in memory (every image at once: the reduce before "
                             "streaming), group by group, and with jobs/reduce.py: wall time, peak RSS, CPU seconds, "
                             "same results (50,000 images on 2 cores: about 1 min to write the counts once, then "
                             "about 1 min; the in-memory reduce needs about 8 GB of memory)")
    memory.add_argument("--reduce-images", type=int, default=50_000,
                        help="images of the synthetic counts (default 50,000)")
    memory.add_argument("--reduce-counts", help="where the synthetic counts are written (an empty directory or "
                        "fsspec URL); a later run with the same --reduce-images reuses them (default: a temporary "
                        "directory, removed afterwards)")
    memory.add_argument("--driver-memory", action="store_true",
                        help="only the certify driver's peak RSS (pipeline.certify_dataset's driver process, Ray "
                             "actors excluded) on 1,000-class runs of tiny random models and 3x8x8 images at each "
                             "of --driver-images (2,000 and 4,000: 2-3 min on 2 cores)")
    memory.add_argument("--driver-images", default="2000,4000",
                        help="comma-separated numbers of images, ascending (default 2000,4000); the ratio is the "
                             "last run's peak over the first's")
    gpu = parser.add_argument_group("GPU")
    gpu.add_argument("--gpu-check", action="store_true",
                     help="only time an ImageNet-size guided-diffusion UNet + timm classifier (random weights)")
    gpu.add_argument("--finetune-memory", action="store_true",
                     help="with --gpu-check: also the peak memory of ImageNet fine-tuning steps (ADM-256 layout, "
                          "LoRA rank 16, batch --finetune-batch, gradient checkpointing, bf16)")
    gpu.add_argument("--finetune-batch", type=int, default=8, help="images per step for --finetune-memory (default 8)")
    gpu.add_argument("--tiny", action="store_true", help="--gpu-check with a 32x32 UNet (runs on CPU)")
    gpu.add_argument("--gpu-classifier", default="resnet50", help="timm classifier for --gpu-check")
    gpu.add_argument("--compile", action="store_true",
                     help="also time a tuned fused step: torch.compile (compilation excluded; "
                          "up to minutes on a CPU); with --gpu-check: compile the checked step")
    gpu.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s for MFU (default: known GPUs)")
    return parser


def resolve_device(choice: str) -> torch.device:
    """--device: auto is the kernel's default device; cuda must be visible in this process (every
    section runs here, not on a cluster)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    return default_device() if choice == "auto" else torch.device(choice)


def digits_models(args: argparse.Namespace, workdir: Path) -> tuple[torch.nn.Module, torch.nn.Module, ModelSpec]:
    """(denoiser, classifier, ModelSpec) — random weights are saved to `workdir` so Ray actors can load them."""
    from pipeline.models.denoiser import denoiser_from_parts
    from pipeline.models.digits import (
        digits_classifier_dir,
        digits_denoiser_dir,
        load_digits_classifier,
        new_digits_classifier,
        new_digits_scheduler,
        new_digits_unet,
    )

    if args.random_models:
        from safetensors.torch import save_file

        torch.manual_seed(args.seed)
        unet, scheduler, classifier = new_digits_unet(), new_digits_scheduler(), new_digits_classifier().eval()
        denoiser_dir, classifier_dir = workdir / "denoiser", workdir / "classifier"
        unet.save_pretrained(denoiser_dir, safe_serialization=True)
        scheduler.save_pretrained(denoiser_dir)
        classifier_dir.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in classifier.network.state_dict().items()},
                  str(classifier_dir / "classifier.safetensors"))
        denoiser = denoiser_from_parts(unet.eval(), scheduler)
    else:
        denoiser_dir = args.denoiser or digits_denoiser_dir()  # a URL is copied to a scratch folder to load
        classifier_dir = digits_classifier_dir()
        denoiser, classifier = as_denoiser(denoiser_dir), load_digits_classifier(classifier_dir)
    spec = ModelSpec(str(denoiser_dir), "digits", str(classifier_dir), 10, in_chans=1, precision=args.precision)
    return denoiser, classifier, spec


def run_benchmark(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """The digits sections: fused vs reference, early exit, FLOPs and Ray (unless skipped), then adaptive
    vs fixed n; or, with --ray-efficiency, only Ray Data against the raw fused step."""
    from pipeline.data.digits import load_digits_split

    if args.preset != "digits":
        raise UserError("the benchmark runs on --preset digits; for ImageNet-size models use --gpu-check")
    preset = get_preset(args.preset)
    split = load_digits_split()
    ids = np.arange(args.adaptive_first_image, args.adaptive_first_image + args.adaptive_images)
    if not args.skip_adaptive and ids[-1] >= len(split.test_labels):
        raise UserError(f"--adaptive-first-image {args.adaptive_first_image} + --adaptive-images "
                        f"{args.adaptive_images} goes past the {len(split.test_labels)} digits test images")
    denoiser, classifier, spec = digits_models(args, workdir)
    batch_size = args.batch_size or preset.batch_size
    fused = FusedDenoiseClassify(denoiser, classifier, preset.num_classes, device=device, batch_size=batch_size,
                                 precision=args.precision)
    # The published cascade routing (not the CLI's continue default): what the targets were set on.
    config = CertifyConfig(preset.sigmas, n_select=args.n_select or preset.n_select, n=args.n, alpha=preset.alpha,
                           routing="cascade", seed=args.seed)
    count = args.num_images  # the throughput sections' images: the first ones
    first_images = BenchmarkImages(split.test_images[:count], np.arange(count), split.test_labels[:count], config)
    report: dict = {"machine": machine_info(device), "settings": vars(args), "preset": preset.name,
                    "denoiser": spec.denoiser}
    if args.ray_efficiency:
        work = first_images
        print(f"[benchmark] raw fused step vs Ray Data: {work.all_scales_samples} samples each", flush=True)
        raw_counts, raw_s = raw_fused(fused, work)
        report["ray"] = ray_pipeline(spec, work, fused.batch_size, fused.device.type == "cuda", raw_counts,
                                     raw_s, workdir, actor_counts=(torch.get_num_threads(),))
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        return report
    if not args.skip_throughput:
        report.update(throughput_sections(args, fused, spec, first_images, workdir))
    if args.skip_adaptive:
        report["adaptive"] = {"skipped": True}
    else:
        chosen = BenchmarkImages(split.test_images[ids], ids, split.test_labels[ids], config)
        adaptive_work = replace(chosen, config=chosen.config.replace(n=args.n_max))
        print(f"[benchmark] adaptive vs fixed n={args.n_max} on {args.adaptive_images} images from test image "
              f"{args.adaptive_first_image}", flush=True)
        with local_vote_cache(args.vote_cache, workdir) as vote_cache:
            report["adaptive"] = adaptive_vs_fixed(fused, adaptive_work, args.radius_tolerance,
                                                   args.tolerance_sweep, args.target_radius, vote_cache)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


@contextmanager
def local_vote_cache(location: str | None, workdir: Path) -> Iterator[Path | None]:
    """--vote-cache as the local file the adaptive section reads and writes (numpy's .npz, with its
    settings record NAME.json beside it): a local path as given; for a URL, its two files are copied into
    `workdir` when present and copied back once the section has written them."""
    if location is None or "://" not in location:
        yield None if location is None else Path(location)
        return
    fs, path = open_location(location)
    local = workdir / "vote-cache" / posixpath.basename(path)
    local.parent.mkdir()
    copies = {f"{location}{suffix}": local.with_name(local.name + suffix) for suffix in ("", ".json")}
    for url, copy in copies.items():
        if fs.exists(url):
            fs.get(url, str(copy))
    yield local
    for url, copy in copies.items():
        if copy.is_file():
            write_bytes(url, copy.read_bytes())


def throughput_sections(args: argparse.Namespace, fused: FusedDenoiseClassify, spec: ModelSpec,
                        work: BenchmarkImages, workdir: Path) -> dict:
    """Fused step vs the reference loop (and a compiled copy with --compile), early exit vs all scales,
    FLOPs, and Ray Data unless --skip-ray."""
    from pipeline.perf.tuning import tuned_copy

    print(f"[benchmark] fused step vs reference loop: {work.all_scales_samples} samples each", flush=True)
    tuned = tuned_copy(fused) if args.compile else None
    versus = fused_vs_reference(fused, work, args.reference_batch or fused.batch_size, args.repeats, tuned)
    all_scales_counts = versus.pop("_fused_counts")
    print("[benchmark] early exit vs all scales", flush=True)
    report = {
        "fused_vs_reference": versus,
        "early_exit": early_exit(fused, work, all_scales_counts, versus["fused_s"]),
        "flops": flops_section(fused, tuple(work.images.shape[1:]), work.config.sigmas[0],
                               versus["fused_samples_per_s"], args.peak_tflops),
        "ray": {"skipped": True},
    }
    if not args.skip_ray:
        print("[benchmark] Ray Data pipeline, 1 and 2 actors", flush=True)
        report["ray"] = ray_pipeline(spec, work, fused.batch_size, fused.device.type == "cuda", all_scales_counts,
                                     versus["fused_s"], workdir)
    return report


def settle_arguments(args: argparse.Namespace) -> None:
    """--quick's sizes, the range checks and the parsed --target-radius / --tolerance-sweep, in place
    (benchmark.json records the arguments as the sections saw them)."""
    if args.quick:
        args.num_images, args.n, args.n_select = 2, 64, 16
        args.adaptive_images, args.n_max, args.random_models = 2, 256, True
        args.batch_size = args.batch_size or 128
        args.reduce_images, args.driver_images = 200, "16,32"
    for name in ("num_images", "n", "adaptive_images", "n_max", "repeats", "reduce_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.adaptive_first_image < 0:
        raise UserError("--adaptive-first-image must be >= 0")
    try:
        args.driver_images = tuple(int(size) for size in str(args.driver_images).split(","))
    except ValueError:
        raise UserError(f"--driver-images must be comma-separated integers, got {args.driver_images!r}") from None
    if len(args.driver_images) < 2 or min(args.driver_images) < 1 or list(args.driver_images) != sorted(
            set(args.driver_images)):
        raise UserError(f"--driver-images needs two or more ascending sizes >= 1, got {args.driver_images}")
    args.target_radius = tuple(sorted(set(args.target_radius or (0.25, 0.5, 0.75))))
    for location in (args.out, args.vote_cache, args.reduce_counts):  # a bad URL fails now, not after the sections
        if location is not None:
            open_location(location)
    try:
        args.tolerance_sweep = [float(t) for t in args.tolerance_sweep.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--tolerance-sweep must be comma-separated numbers, got {args.tolerance_sweep!r}") from None


def gpu_sections(args: argparse.Namespace, device: torch.device) -> dict:
    """--gpu-check: an ImageNet-size UNet + timm classifier, and with --finetune-memory the peak memory
    of fine-tuning steps."""
    from pipeline.perf.gpu_check import (
        FinetuneMemorySettings,
        GpuCheckSettings,
        run_finetune_memory_check,
        run_gpu_check,
    )

    settings = GpuCheckSettings(classifier=args.gpu_classifier, tiny=args.tiny, compile=args.compile,
                                batch_size=args.batch_size, peak_tflops=args.peak_tflops,
                                timed_batches=2 if args.quick else 4)
    report = {"machine": machine_info(device), "settings": vars(args), "gpu_check": run_gpu_check(settings, device)}
    if args.finetune_memory:
        report["finetune_memory"] = run_finetune_memory_check(
            FinetuneMemorySettings(classifier=args.gpu_classifier, tiny=args.tiny, batch_size=args.finetune_batch),
            device)
    return report


def memory_sections(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """--reduce-scale and/or --driver-memory: the reduce of ImageNet-shaped counts each way, and the
    certify driver's peak memory as the number of images grows."""
    from pipeline.app.driver_memory import driver_memory_section
    from pipeline.perf.reduce_scale import reduce_scale_section

    report: dict = {"machine": machine_info(device), "settings": vars(args)}
    if args.reduce_scale:
        print(f"[benchmark] reduce of {args.reduce_images} images x 3 scales x 1,000 classes", flush=True)
        counts = args.reduce_counts or str(workdir / "reduce-counts")
        report["reduce_scale"] = reduce_scale_section(counts, args.reduce_images, seed=args.seed,
                                                      reduce_job=str(REPO_ROOT / "jobs" / "reduce.py"))
    if args.driver_memory:
        report["driver_memory"] = driver_memory_section(workdir / "driver-memory", args.driver_images)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


def benchmark(args: argparse.Namespace) -> str:
    """Run the sections the flags ask for, write OUT/benchmark.json and OUT/benchmark.md; returns the table."""
    settle_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, device.type == "cuda")
    if args.gpu_check and device.type != "cuda" and not args.tiny:
        raise UserError("--gpu-check times ImageNet-size models and needs a GPU; add --tiny to run its code path "
                        "on CPU")
    with tempfile.TemporaryDirectory(prefix="mdds-benchmark-") as tmp:
        if args.main_job:
            report = {"machine": machine_info(device), "settings": vars(args),
                      "main_job": main_job(REPO_ROOT, Path(tmp))}
        elif args.gpu_check:
            report = gpu_sections(args, device)
        elif args.reduce_scale or args.driver_memory:
            report = memory_sections(args, device, Path(tmp))
        else:
            report = run_benchmark(args, device, Path(tmp))
    write_bytes(join(args.out, "benchmark.json"), json.dumps(report, indent=2, default=str).encode())
    table = markdown(report)
    write_bytes(join(args.out, "benchmark.md"), table.encode())
    return table
