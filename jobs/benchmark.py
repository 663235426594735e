"""Measure the certifier's speed against the published sampling loop, Ray Data and the hardware.

    python jobs/benchmark.py                          # digits, CPU or GPU, all sections (15-30 min on 2 cores)
    python jobs/benchmark.py --quick --skip-ray       # tiny sizes, random weights: a smoke test
    python jobs/benchmark.py --gpu-check              # ImageNet-size UNet + classifier, bf16, MFU (GPU)

Writes OUT/benchmark.json and OUT/benchmark.md and prints the table. Every figure is a ratio of two
runs made back to back in this process; the load average of the machine is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.app.cli import run_main
from pipeline.errors import UserError
from pipeline.models.precision import PRECISION_CHOICES, resolve_precision

TARGETS = {
    "fused_speedup": 1.5,
    "ray_efficiency": 0.90,
    "main_job_cached_s": 45.0,
    "main_job_first_run_s": 180.0,
    "ray_workers_over_actors": 4,
    "adaptive_times_fewer": 4.0,  # general mode: forward passes of fixed n / adaptive
    "target_radius_times_fewer": 20.0,  # target-radius mode, at R = 0.25 and 0.5
    "accuracy_images": 1,  # certified accuracy within this many images of fixed n's
    "gpu_mfu": 0.40,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="digits", help="data and models to benchmark (only digits; "
                        "ImageNet-size models: --gpu-check)")
    parser.add_argument("--out", default="outputs/benchmark", help="directory for benchmark.json / benchmark.md")
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
    parser.add_argument("--denoiser", help="digits denoiser directory (default: the cached embedded model)")
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
    parser.add_argument("--n-max", type=int, default=10_000, help="n of the fixed run = n_max of the adaptive run")
    parser.add_argument("--radius-tolerance", type=float, default=0.05,
                        help="adaptive: stop once the radius is within this of what n_max would give")
    parser.add_argument("--target-radius", type=float, action="append", default=None, metavar="R",
                        help="target-radius runs to compare (repeatable; default 0.25, 0.5, 0.75): each R alone, "
                             "then all together")
    parser.add_argument("--vote-cache", type=Path, help="adaptive vs fixed n: .npz of the votes drawn (read if "
                        "present, written after): re-evaluate the rules without re-running the network")
    parser.add_argument("--tolerance-sweep", default="0,0.01,0.02,0.1",
                        help="comma-separated further radius tolerances to evaluate on the same votes ('' for none)")
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
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def digits_models(args: argparse.Namespace, workdir: Path):
    """(denoiser, classifier, ModelSpec) — random weights are saved to `workdir` so Ray actors can load them."""
    from pipeline.models.denoiser import denoiser_from_parts, load_denoiser
    from pipeline.models.digits import (
        digits_classifier_dir,
        digits_denoiser_dir,
        load_digits_classifier,
        new_digits_classifier,
        new_digits_scheduler,
        new_digits_unet,
    )
    from pipeline.models.spec import ModelSpec

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
        denoiser_dir = Path(args.denoiser) if args.denoiser else digits_denoiser_dir()
        classifier_dir = digits_classifier_dir()
        denoiser, classifier = load_denoiser(denoiser_dir), load_digits_classifier(classifier_dir)
    spec = ModelSpec(str(denoiser_dir), "digits", str(classifier_dir), 10, in_chans=1, precision=args.precision)
    return denoiser, classifier, spec


def run_benchmark(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    from pipeline.perf import benchmark
    from pipeline.data.digits import load_digits_split
    from pipeline.sampling.kernel import FusedDenoiseClassify
    from pipeline.app.presets import get_preset

    if args.preset != "digits":
        raise UserError("the benchmark runs on --preset digits; for ImageNet-size models use --gpu-check")
    preset = get_preset(args.preset)
    split = load_digits_split()
    denoiser, classifier, spec = digits_models(args, workdir)
    batch_size = args.batch_size or preset.batch_size
    fused = FusedDenoiseClassify(denoiser, classifier, preset.num_classes, device=device, batch_size=batch_size,
                                 precision=args.precision)
    count = max(args.num_images, args.adaptive_images if not args.skip_adaptive else 0)
    everything = benchmark.Workload(split.test_images[:count], np.arange(count), split.test_labels[:count],
                                    preset.sigmas, args.n_select or preset.n_select, args.n, preset.alpha,
                                    args.seed)
    report: dict = {"machine": benchmark.machine_info(device), "settings": vars(args), "preset": preset.name,
                    "denoiser": spec.denoiser}
    if args.ray_efficiency:
        work = everything.subset(args.num_images)
        print(f"[benchmark] raw fused step vs Ray Data: {work.all_scales_samples} samples each", flush=True)
        raw_counts, raw_s = benchmark.raw_fused(fused, work)
        report["ray"] = benchmark.ray_pipeline(spec, work, fused.batch_size, fused.device.type == "cuda", raw_counts,
                                               raw_s, workdir, actor_counts=(torch.get_num_threads(),))
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        return report
    if not args.skip_throughput:
        report.update(throughput_sections(args, fused, spec, everything.subset(args.num_images), workdir))
    if args.skip_adaptive:
        report["adaptive"] = {"skipped": True}
    else:
        chosen = everything.subset(args.adaptive_images)
        adaptive_work = benchmark.Workload(chosen.images, chosen.image_ids, chosen.labels, chosen.sigmas,
                                           chosen.n_select, args.n_max, chosen.alpha, chosen.seed)
        print(f"[benchmark] adaptive vs fixed n={args.n_max} on {args.adaptive_images} images", flush=True)
        report["adaptive"] = benchmark.adaptive_vs_fixed(fused, adaptive_work, args.radius_tolerance,
                                                         args.tolerance_sweep, args.target_radius, args.vote_cache)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    return report


def throughput_sections(args: argparse.Namespace, fused, spec, work, workdir: Path) -> dict:
    from pipeline.perf import benchmark
    from pipeline.perf.tuning import tuned_copy

    print(f"[benchmark] fused step vs reference loop: {work.all_scales_samples} samples each", flush=True)
    tuned = tuned_copy(fused) if args.compile else None
    versus = benchmark.fused_vs_reference(fused, work, args.reference_batch or fused.batch_size, args.repeats, tuned)
    all_scales_counts = versus.pop("_fused_counts")
    print("[benchmark] early exit vs all scales", flush=True)
    sections = {
        "fused_vs_reference": versus,
        "early_exit": benchmark.early_exit(fused, work, all_scales_counts, versus["fused_s"]),
        "flops": benchmark.flops_section(fused, tuple(work.images.shape[1:]), work.sigmas[0],
                                         versus["fused_samples_per_s"], args.peak_tflops),
        "ray": {"skipped": True},
    }
    if not args.skip_ray:
        print("[benchmark] Ray Data pipeline, 1 and 2 actors", flush=True)
        sections["ray"] = benchmark.ray_pipeline(spec, work, fused.batch_size, fused.device.type == "cuda",
                                                 all_scales_counts, versus["fused_s"], workdir)
    return sections


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _gpu_rows(check: dict) -> list[str]:
    if check["mfu"] is not None:
        peak = f"dense bf16 peak {check['peak_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
    else:
        peak = "CPU" if check["device"] == "cpu" else "peak unknown: pass --peak-tflops"
    return [
        f"| {check['denoiser']} + {check['classifier']}, {check['dtype']}, batch {check['batch_size']}"
        f"{', compiled' if check['compiled'] else ''}: samples/s | {check['samples_per_s']:.1f} | |",
        f"| FLOPs per sample | {check['flops_per_sample'] / 1e9:.2f} GFLOP | |",
        f"| achieved | {check['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s | |",
        f"| MFU ({peak}) | {_pct(check['mfu'])} | ≥ {_pct(TARGETS['gpu_mfu'])} |",
    ]


def _throughput_rows(versus: dict, early: dict, flops: dict) -> list[str]:
    repeats = len(versus["times_s"]["reference"])
    shape = f"n={versus['n']}, {versus['images']} images × {len(versus['sigmas'])} scales, {repeats} repeat(s)"
    rows = [
        f"| fused step vs reference loop ({shape}): samples/s {versus['fused_samples_per_s']:.0f} vs "
        f"{versus['reference_samples_per_s']:.0f}; wall time {versus['fused_s']:.1f} s vs {versus['reference_s']:.1f} s"
        f" | {versus['fused_speedup']:.2f}× | ≥ {TARGETS['fused_speedup']}× |",
        f"| reference and fused agree on the top class of (image, scale) | "
        f"{_pct(versus['fused_top_class_agreement'])} | |",
    ]
    if "tuned_speedup" in versus:
        rows.append(
            f"| tuned fused step (torch.compile; compilation {versus['warm_up_s']['tuned']:.0f} s "
            f"excluded; {versus['tuned_votes_differing_from_fused']} vote(s) differ from eager) vs reference loop: "
            f"samples/s {versus['tuned_samples_per_s']:.0f} vs {versus['reference_samples_per_s']:.0f} | "
            f"{versus['tuned_speedup']:.2f}× | ≥ {TARGETS['fused_speedup']}× |")
    return rows + [
        f"| early exit vs --all-scales: forward passes saved | {_pct(early['forward_passes_saved'])} | |",
        f"| early exit vs --all-scales: wall time saved ({early['early_exit_s']:.1f} s vs {early['all_scales_s']:.1f} s;"
        f" same certificates: {early['same_certificates']}) | {_pct(early['wall_time_saved'])} | |",
        f"| FLOPs per sample (denoiser + classifier) | {flops['flops_per_sample'] / 1e6:.1f} MFLOP | |",
        f"| achieved FLOP/s of the fused step | {flops['achieved_flops_per_s'] / 1e9:.2f} GFLOP/s | |",
        f"| MFU | {_pct(flops['mfu']) if flops['mfu'] is not None else 'n/a (CPU)'} | |",
    ]


def _main_job_rows(job: dict) -> list[str]:
    rows = []
    for name, label, target in (("first_run", "empty model cache", "main_job_first_run_s"),
                                ("cached", "cached models", "main_job_cached_s")):
        run = job[name]
        phases = ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in run["phases_s"].items() if phase != "total")
        rows.append(f"| `{job['command'].strip()}`, {label}: whole command ({phases}) | {run['command_s']:.1f} s "
                    f"| ≤ {TARGETS[target]:.0f} s |")
        rows.append(f"| same: most Ray worker processes alive at once (2 actors) | {run['peak_ray_workers']} | "
                    f"≤ actors + {TARGETS['ray_workers_over_actors']} |")
    return rows


def _ray_rows(ray: dict) -> list[str]:
    """Efficiency is like for like where the actors use as many cores as the raw step's threads."""
    rows = []
    for actors, run in ray["by_actors"].items():
        matched = int(actors) == ray["matched_actors"]
        rows += [
            f"| Ray Data pipeline vs raw fused step ({ray['raw_fused_torch_threads']} thread(s)), {actors} actor(s) "
            f"({run['seconds']:.1f} s vs {ray['raw_fused_s']:.1f} s; counts identical: {run['counts_equal_raw']}) | "
            f"{_pct(run['efficiency'])} | {'≥ ' + _pct(TARGETS['ray_efficiency']) if matched else ''} |",
            f"| same, {actors} actor(s), without the per-execution overhead ({ray['per_execution_overhead_s']:.1f} s) | "
            f"{_pct(run['efficiency_without_execution_overhead'])} | |",
        ]
    rows.append(f"| Ray start-up (ray.init, excluded from the above) | {ray['ray_startup_s_excluded']:.1f} s | |")
    if ray["scaling_1_to_2_actors"] is not None:
        rows.append(f"| scaling from 1 to 2 actors | {ray['scaling_1_to_2_actors']:.2f}× | |")
    return rows


def _times_fewer(run: dict) -> str:
    return f"{run['times_fewer_forward_passes']:.1f}×"


def _images(fixed: dict, run: dict, radius: str) -> str:
    before, after = fixed["certified_images"][radius], run["certified_images"][radius]
    return f"{before} → {after} ({after - before:+d})"


def _adaptive_rows(adaptive: dict) -> list[str]:
    """Forward passes as "× fewer than fixed n" and certified images out of `images`, next to the targets."""
    fixed, general, images = adaptive["fixed"], adaptive["adaptive"], adaptive["images"]
    within = f"within {TARGETS['accuracy_images']} image"
    rows = [f"| fixed n={adaptive['n_max']} (Clopper-Pearson, early exit), {images} images: forward passes; wall time "
            f"({fixed['wall_s_source']}) | {fixed['forward_passes']:,}; {fixed['wall_s']:.0f} s | |",
            f"| general adaptive (radius tolerance {adaptive['radius_tolerance']:g}): forward passes "
            f"({general['forward_passes']:,}); wall time (estimated) {general['wall_s_estimated']:.0f} s | "
            f"{_times_fewer(general)} fewer | ≥ {TARGETS['adaptive_times_fewer']:g}× |"]
    for radius in fixed["certified_images"]:
        if float(radius) <= 0.75:
            rows.append(f"| general adaptive: certified images at r={radius} (fixed → adaptive) | "
                        f"{_images(fixed, general, radius)} | {within} |")
    rows.append(f"| general adaptive: ACR (fixed → adaptive) | {fixed['acr']:.3f} → {general['acr']:.3f} | |")
    for name, run in adaptive["target_radius"].items():
        radii = name.split(",")
        target = (f"≥ {TARGETS['target_radius_times_fewer']:g}×" if len(radii) == 1 and float(name) in (0.25, 0.5)
                  else "")
        rows.append(f"| --target-radius {' '.join(radii)}: forward passes ({run['forward_passes']:,}); wall time "
                    f"(estimated) {run['wall_s_estimated']:.0f} s | {_times_fewer(run)} fewer | {target} |")
        for radius in radii:
            rows.append(f"| --target-radius {' '.join(radii)}: certified images at r={radius} (fixed → target) | "
                        f"{_images(fixed, run, radius)} | {within if target else ''} |")
    for tolerance, other in adaptive["tolerance_sweep"].items():
        images_at = " / ".join(str(other["certified_images"][r]) for r in ("0", "0.25", "0.5", "0.75"))
        rows.append(f"| radius tolerance {tolerance}: × fewer forward passes; certified images at r=0 / 0.25 / 0.5 / "
                    f"0.75; ACR | {_times_fewer(other)}; {images_at}; {other['acr']:.3f} | |")
    return rows


def markdown(report: dict) -> str:
    """The headline table: each measured value next to its target, then the machine and its load."""
    lines = ["| measurement | measured | target |", "|---|---|---|"]
    if "gpu_check" in report:
        lines += _gpu_rows(report["gpu_check"])
    if "finetune_memory" in report:
        memory = report["finetune_memory"]
        peak = "n/a (CPU)" if memory["peak_memory_gib"] is None else f"{memory['peak_memory_gib']:.1f} GiB"
        lines.append(f"| fine-tuning step, {memory['denoiser']}, LoRA rank {memory['lora_rank']}, batch "
                     f"{memory['batch_size']}, {memory['precision']}: peak memory; s/step | {peak}; "
                     f"{memory['seconds_per_step_after_first']:.2f} | fits 80 GB |")
    if "main_job" in report:
        lines += _main_job_rows(report["main_job"])
    if "fused_vs_reference" in report:
        lines += _throughput_rows(report["fused_vs_reference"], report["early_exit"], report["flops"])
    if "ray" in report and not report["ray"].get("skipped"):
        lines += _ray_rows(report["ray"])
    if "adaptive" in report and not report["adaptive"].get("skipped"):
        lines += _adaptive_rows(report["adaptive"])
    machine = report["machine"]
    load, end = machine["load_average_1_5_15_min"], machine.get("load_average_at_end")
    lines += ["", f"Machine: {machine['device']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
              f"{machine['torch_threads']} torch thread(s); load average (1/5/15 min) at start "
              f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}" + (f", at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}"
                                                             if end else "")]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = build_parser().parse_args()
    if args.quick:
        args.num_images, args.n, args.n_select = 2, 64, 16
        args.adaptive_images, args.n_max, args.random_models = 2, 256, True
        args.batch_size = args.batch_size or 128
    for name in ("num_images", "n", "adaptive_images", "n_max", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    args.target_radius = tuple(sorted(set(args.target_radius or (0.25, 0.5, 0.75))))
    try:
        args.tolerance_sweep = [float(t) for t in args.tolerance_sweep.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--tolerance-sweep must be comma-separated numbers, got {args.tolerance_sweep!r}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.precision = resolve_precision(args.precision, device.type == "cuda")
    if args.gpu_check and device.type != "cuda" and not args.tiny:
        raise UserError("--gpu-check times ImageNet-size models and needs a GPU; add --tiny to run its code path on CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mdds-benchmark-") as tmp:
        if args.main_job:
            from pipeline.perf.benchmark import machine_info, main_job

            report = {"machine": machine_info(device), "settings": vars(args),
                      "main_job": main_job(Path(__file__).resolve().parents[1], Path(tmp))}
        elif args.gpu_check:
            from pipeline.perf.benchmark import machine_info
            from pipeline.perf.gpu_check import GpuCheckSettings, run_gpu_check

            settings = GpuCheckSettings(classifier=args.gpu_classifier, tiny=args.tiny, compile=args.compile,
                                        batch_size=args.batch_size, peak_tflops=args.peak_tflops,
                                        timed_batches=2 if args.quick else 4)
            report = {"machine": machine_info(device), "settings": vars(args),
                      "gpu_check": run_gpu_check(settings, device)}
            if args.finetune_memory:
                from pipeline.perf.gpu_check import FinetuneMemorySettings, run_finetune_memory_check

                report["finetune_memory"] = run_finetune_memory_check(
                    FinetuneMemorySettings(classifier=args.gpu_classifier, tiny=args.tiny,
                                           batch_size=args.finetune_batch), device)
        else:
            report = run_benchmark(args, device, Path(tmp))
    (out / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (out / "benchmark.md").write_text(table)
    print(table)


if __name__ == "__main__":
    run_main(main)
