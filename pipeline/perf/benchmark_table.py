"""The benchmark's headline table: each measured value of a benchmark report next to its target.

The report is the dict pipeline/app/benchmark.py writes to benchmark.json; every section it holds
gets its rows (sections that were skipped get none), then a line on the machine and its load.
"""

from __future__ import annotations

# What each figure is held to (docs/performance.md has the measurements against them).
TARGETS: dict[str, float] = {
    "fused_speedup": 1.5,
    "ray_efficiency": 0.90,
    "main_job_cached_s": 45.0,
    "main_job_first_run_s": 180.0,
    "ray_workers_over_actors": 4,
    "adaptive_times_fewer": 5.0,  # general mode: forward passes of fixed n / adaptive
    "target_radius_times_fewer": 50.0,  # target-radius mode, at R = 0.25 and 0.5 each
    "target_radii_times_fewer": 25.0,  # target-radius mode, R = 0.25, 0.5 and 0.75 in one run
    "accuracy_images": 1,  # certified accuracy within this many images of fixed n's
    "gpu_mfu": 0.40,
    "reduce_peak_rss_gb": 1.5,  # the streaming reduce of 50,000 images x 3 scales x 1,000 classes
    "reduce_wall_s": 20.0,  # the same, whole process, on 2 cores
    "driver_peak_ratio": 1.15,  # certify driver's peak RSS at 4,000 images over 2,000: flat
}


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


def _verdict(measured: float, target: float) -> str:
    return "met" if measured <= target else "missed"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


REDUCE_LABELS = {"in-memory": "in memory (every image's dense counts at once: the reduce before streaming)",
                 "streaming": "streaming, {group} images per group",
                 "job": "`python jobs/reduce.py COUNTS --out r.parquet` (streaming)"}


def _reduce_scale_rows(section: dict) -> list[str]:
    """Each way of reducing: wall time of the whole process, peak RSS and CPU seconds; the targets hold
    the streaming reduces (not the in-memory one, the "before")."""
    shape = (f"{section['images']:,} images × {section['scales']} scales × {section['classes']:,} classes "
             f"(n0=100, n=10,000)")
    rows = []
    for mode, run in section["by_mode"].items():
        label = REDUCE_LABELS[mode].format(group=f"{section['images_per_group']:,}")
        wall, peak = run["process_wall_s"], run["peak_rss_bytes"]
        measured = f"{wall:.1f} s; {_gb(peak)}; {run['process_cpu_s']:.1f} s"
        target = "" if mode == "in-memory" else (
            f"≤ {TARGETS['reduce_wall_s']:.0f} s ({_verdict(wall, TARGETS['reduce_wall_s'])}); "
            f"≤ {TARGETS['reduce_peak_rss_gb']} GB ({_verdict(peak / 1e9, TARGETS['reduce_peak_rss_gb'])})")
        rows.append(f"| reduce of {shape}, {label}: wall time; peak RSS; CPU time | {measured} | {target} |")
    rows.append(f"| reduce: every way gives the same certificates | {section['same_results']} | True |")
    return rows


def _driver_memory_rows(section: dict) -> list[str]:
    """The certify driver's peak at each number of images, and the largest run's over the smallest's."""
    shape = "×".join(str(size) for size in section["image_shape"])
    setting = (f"{section['classes']:,} classes, tiny random models, {shape} images, n_select={section['n_select']}, "
               f"n={section['n']}, {section['strategy'].replace('_', ' ')}")
    rows = []
    for images, run in section["by_images"].items():
        rows.append(f"| certify driver ({setting}), {int(images):,} images: peak RSS; wall time | "
                    f"{_gb(run['peak_rss_bytes'])}; {run['process_wall_s']:.0f} s | |")
    sizes = list(section["by_images"])
    growth = section["by_images"][sizes[-1]]["peak_rss_bytes"] - section["by_images"][sizes[0]]["peak_rss_bytes"]
    rows.append(f"| certify driver: peak RSS at {int(sizes[-1]):,} images over {int(sizes[0]):,} "
                f"({growth / 1e6:+.0f} MB) | {section['peak_ratio']:.3f} | ≤ {TARGETS['driver_peak_ratio']} "
                f"({_verdict(section['peak_ratio'], TARGETS['driver_peak_ratio'])}) |")
    return rows


def _times_fewer(run: dict) -> str:
    return f"{run['times_fewer_forward_passes']:.1f}×"


def _images(fixed: dict, run: dict, radius: str) -> str:
    before, after = fixed["certified_images"][radius], run["certified_images"][radius]
    return f"{before} → {after} ({after - before:+d})"


def _cost_row(name: str, run: dict, adaptive: dict) -> str:
    """Forward passes per image at each scale, and the projected A100 GPU-hours of the ImageNet protocol."""
    sigmas, projection = adaptive["sigmas"], adaptive["projection"]
    by_scale = " / ".join(f"{passes:,.1f}" for passes in run["forward_passes_per_image_by_scale"])
    return (f"| {name}: forward passes per image at σ = {' / '.join(f'{s:g}' for s in sigmas)}; projected A100 "
            f"GPU-hours for {projection['images']:,} ImageNet images at "
            f"{32 * projection['a100_seconds_per_forward']:g} s per 32 (Carlini et al.) | {by_scale}; "
            f"{run['projected_a100_gpu_hours']:,.1f} h | |")


def _bound_row(name: str, run: dict) -> str:
    """What limits the row: the fewest forward passes any valid sequential test could spend
    (pipeline/perf/benchmark.py, `fewest_forward_passes`)."""
    bound = run["fewest_forward_passes"]
    return (f"| {name}: fewest forward passes any valid sequential test at level {bound['level']:.2g} could spend, "
            f"certifying all but one of fixed n's images (Wald's bound at fixed n's vote rates; image "
            f"{bound['left_out_image']} left out) | {bound['forward_passes']:,.0f}: at most "
            f"{bound['times_fewer_at_most']:.1f}× fewer | |")


def _adaptive_rows(adaptive: dict) -> list[str]:
    """Forward passes as "× fewer than fixed n" and certified images out of `images`, next to the targets;
    each run's forward passes per image at each scale and their projected GPU-hours."""
    fixed, general, images = adaptive["fixed"], adaptive["adaptive"], adaptive["images"]
    held_to = adaptive["general_mode_radii"]  # where the general mode is held to fixed n's certified images
    within = f"within {TARGETS['accuracy_images']} image"
    first = adaptive.get("first_image", 0)
    chosen = f"{images} images" + (f" from test image {first}" if first else "")
    rows = [f"| fixed n={adaptive['n_max']} (Clopper-Pearson, early exit), {chosen}: forward passes; wall time "
            f"({fixed['wall_s_source']}) | {fixed['forward_passes']:,}; {fixed['wall_s']:.0f} s | |",
            f"| general adaptive (radius tolerance {adaptive['radius_tolerance']:g}): forward passes "
            f"({general['forward_passes']:,}); wall time (estimated) {general['wall_s_estimated']:.0f} s | "
            f"{_times_fewer(general)} fewer | ≥ {TARGETS['adaptive_times_fewer']:g}× |",
            _bound_row("general adaptive", general), _cost_row(f"fixed n={adaptive['n_max']}", fixed, adaptive), _cost_row("general adaptive", general, adaptive)]
    for radius in held_to:
        rows.append(f"| general adaptive: certified images at r={radius} (fixed → adaptive) | "
                    f"{_images(fixed, general, radius)} | {within} |")
    rows.append(f"| general adaptive: ACR (fixed → adaptive) | {fixed['acr']:.3f} → {general['acr']:.3f} | |")
    for name, run in adaptive["target_radius"].items():
        radii = name.split(",")
        target = (f"≥ {TARGETS['target_radius_times_fewer']:g}×" if len(radii) == 1 and float(name) in (0.25, 0.5)
                  else f"≥ {TARGETS['target_radii_times_fewer']:g}×" if radii == ["0.25", "0.5", "0.75"] else "")
        rows.append(f"| --target-radius {' '.join(radii)}: forward passes ({run['forward_passes']:,}); wall time "
                    f"(estimated) {run['wall_s_estimated']:.0f} s | {_times_fewer(run)} fewer | {target} |")
        rows.append(_bound_row(f"--target-radius {' '.join(radii)}", run))
        rows.append(_cost_row(f"--target-radius {' '.join(radii)}", run, adaptive))
        for radius in radii:
            rows.append(f"| --target-radius {' '.join(radii)}: certified images at r={radius} (fixed → target) | "
                        f"{_images(fixed, run, radius)} | {within if target else ''} |")
    for tolerance, other in adaptive["tolerance_sweep"].items():
        images_at = " / ".join(str(other["certified_images"][r]) for r in held_to)
        rows.append(f"| radius tolerance {tolerance}: × fewer forward passes; certified images at r={' / '.join(held_to)}"
                    f"; ACR | {_times_fewer(other)}; {images_at}; {other['acr']:.3f} | |")
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
    if "reduce_scale" in report:
        lines += _reduce_scale_rows(report["reduce_scale"])
    if "driver_memory" in report:
        lines += _driver_memory_rows(report["driver_memory"])
    machine = report["machine"]
    load, end = machine["load_average_1_5_15_min"], machine.get("load_average_at_end")
    lines += ["", f"Machine: {machine['device']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
              f"{machine['torch_threads']} torch thread(s); load average (1/5/15 min) at start "
              f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}" + (f", at end {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}"
                                                             if end else "")]
    return "\n".join(lines) + "\n"
