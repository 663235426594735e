"""The reduce at ImageNet scale: synthetic counts of ImageNet's shape, and the wall time and peak memory
of reducing them in memory (every image's dense counts at once), group by group of images, or with
`jobs/reduce.py` as users run it.

The counts are what a certify run of the whole validation set writes (50,000 images, 3 scales, 1,000
classes, n_select=100, n=10,000, one shard per 16-image actor batch), with votes concentrated on a few
classes like a real classifier's: most of each row is zeros, so the Parquet is small while the dense
(images, scales, classes) arrays of both phases are 2.4 GB. Each measurement runs in a fresh process so
that its peak resident memory is its own (`measure_python`).

    python -m pipeline.perf.reduce_scale generate /tmp/counts --images 50000
    python -m pipeline.perf.reduce_scale reduce /tmp/counts --mode streaming
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.config import CertifyConfig
from pipeline.stats.cascade import certify_cascade
from pipeline.store.atomic import read_parquet, write_bytes
from pipeline.store.counts import (
    DEFAULT_IMAGES_PER_GROUP,
    CountsArrays,
    counts_table,
    counts_to_arrays,
    index_counts,
    read_counts,
)
from pipeline.store.shards import shard_name, write_shard

IMAGENET_SIGMAS = (1.0, 0.5, 0.25)
IMAGENET_CLASSES = 1000
#: Classes other than the dominant one that receive votes in a synthetic row.
RUNNER_UP_CLASSES = 4
#: Noise spreads a few votes over many classes: this many at sigma 1 (proportionally fewer below), sharing
#: TAIL_MASS of the votes not given to the favoured class.
TAIL_CLASSES_AT_SIGMA_1 = 400
TAIL_MASS = 0.3
REDUCE_MODES = ("in-memory", "streaming")


def write_synthetic_counts(location: str, num_images: int = 50_000, *, sigmas: Sequence[float] = IMAGENET_SIGMAS,
                           num_classes: int = IMAGENET_CLASSES, n_select: int = 100, n: int = 10_000,
                           images_per_shard: int = 16, seed: int = 0) -> int:
    """Write counts shards for images 0..num_images-1 at every scale under `location` (a directory or
    URL) and return how many. Deterministic in `seed`; one shard is in memory at a time.

    Each image has a label and a class the "model" favours (the label for 80 % of images); at scale
    sigma that class gets a share that shrinks as sigma grows; the rest of the votes go mostly to a few
    runner-up classes and thinly to a tail of classes that widens with sigma, as a real classifier's do."""
    sigmas = tuple(sorted((float(s) for s in sigmas), reverse=True))
    starts = range(0, num_images, images_per_shard)
    for shard, start in enumerate(starts):
        ids = np.arange(start, min(start + images_per_shard, num_images), dtype=np.int64)
        table = _synthetic_shard(np.random.default_rng([seed, shard]), ids, sigmas, num_classes, n_select, n)
        write_shard(table, location, shard_name(sigmas, ids))
    return len(starts)


def _synthetic_shard(rng: np.random.Generator, ids: np.ndarray, sigmas: tuple[float, ...], num_classes: int,
                     n_select: int, n: int):
    labels = rng.integers(num_classes, size=len(ids))
    favoured = np.where(rng.random(len(ids)) < 0.8, labels, rng.integers(num_classes, size=len(ids)))
    strength = rng.uniform(0.3, 1.0, size=len(ids))
    rows = [(i, s) for i in range(len(ids)) for s in range(len(sigmas))]
    probabilities = np.zeros((len(rows), num_classes))
    for row, (image, scale) in enumerate(rows):
        share = strength[image] ** (1.0 + sigmas[scale])
        tail = max(1, int(TAIL_CLASSES_AT_SIGMA_1 * sigmas[scale]))
        others = rng.choice(num_classes, size=min(num_classes, RUNNER_UP_CLASSES + tail), replace=False)
        weights = np.concatenate([rng.dirichlet(np.ones(RUNNER_UP_CLASSES)) * (1.0 - TAIL_MASS),
                                  rng.dirichlet(np.ones(tail)) * TAIL_MASS])[:len(others)]  # few classes: fewer
        probabilities[row, others] = (1.0 - share) * weights
        probabilities[row, favoured[image]] += share
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    image_of_row = np.array([image for image, _ in rows])
    return counts_table(ids[image_of_row], labels[image_of_row], np.array([sigmas[s] for _, s in rows]),
                        rng.multinomial(n_select, probabilities), rng.multinomial(n, probabilities))


def _certificate_bytes(image_ids: np.ndarray, prediction: np.ndarray, radius: np.ndarray) -> bytes:
    """(image_id, prediction, radius) of each image as fixed-width records: the same bytes however the
    images are grouped, so a digest fed group by group equals one fed everything at once."""
    return np.rec.fromarrays([image_ids, prediction, radius],
                             dtype=[("image_id", "<i8"), ("prediction", "<i8"), ("radius", "<f8")]).tobytes()


def certify_groups(groups: Iterator[CountsArrays], config: CertifyConfig) -> dict:
    """Certify each group with the cascade; the number of images and certificates, and a digest of
    every (image_id, prediction, radius) in order, so that two reduces can be compared exactly."""
    digest, images, certified = hashlib.sha256(), 0, 0
    for arrays in groups:
        result = certify_cascade(arrays.select_counts, arrays.estimate_counts, arrays.sigmas, config.rule)
        digest.update(_certificate_bytes(arrays.image_ids, result.prediction, result.radius))
        images += len(arrays.image_ids)
        certified += int((result.prediction >= 0).sum())
    return {"images": images, "certified": certified, "results_sha256": digest.hexdigest()}


def results_summary(results: pa.Table) -> dict:
    """`certify_groups`' summary of a results table (results.parquet), images in ascending id order."""
    results = results.sort_by("image_id")
    prediction = results["prediction"].to_numpy()
    digest = hashlib.sha256(_certificate_bytes(results["image_id"].to_numpy(), prediction,
                                               results["radius"].to_numpy()))
    return {"images": results.num_rows, "certified": int((prediction >= 0).sum()),
            "results_sha256": digest.hexdigest()}


def reduce_counts_location(location: str, mode: str, config: CertifyConfig,
                           images_per_group: int = DEFAULT_IMAGES_PER_GROUP) -> dict:
    """Reduce the counts at `location`: "in-memory" reads every row, pivots them into the dense arrays
    of all images and certifies them at once (the reduce before streaming); "streaming" does the same
    group of `images_per_group` images at a time."""
    if mode == "in-memory":
        groups = iter([counts_to_arrays(read_counts(location), config.sigmas)])
    elif mode == "streaming":
        groups = index_counts(location).groups(images_per_group, config.sigmas)
    else:
        raise ValueError(f"mode must be one of {', '.join(REDUCE_MODES)}, got {mode!r}")
    return certify_groups(groups, config)


@dataclass(frozen=True)
class ProcessMeasurement:
    """A finished Python process: its wall time (interpreter start-up and imports included), its own
    peak resident memory and CPU seconds (user + system: less sensitive than wall time to other load on
    the machine), and its standard output."""

    wall_s: float
    peak_rss_bytes: int
    cpu_s: float
    stdout: str


# Runs `-m module args...`, `-c code args...` or `script.py args...` like the interpreter would, and at
# exit writes the process's peak resident memory (VmHWM; ru_maxrss where /proc is missing) and CPU
# seconds to $MDDS_PEAK_RSS_FILE.
_PEAK_REPORTING_MAIN = """
import atexit, json, os, resource, runpy, sys

def _report(path=os.environ.pop("MDDS_PEAK_RSS_FILE")):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        kib = usage.ru_maxrss
    with open(path, "w") as out:
        json.dump({"peak_rss_bytes": kib * 1024, "cpu_s": usage.ru_utime + usage.ru_stime}, out)

atexit.register(_report)
kind, target, *sys.argv[1:] = sys.argv[1:]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
elif kind == "-c":
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv[0] = target
    runpy.run_path(target, run_name="__main__")
"""


def measure_python(args: Sequence[str], timeout_s: float | None = None) -> ProcessMeasurement:
    """Run `python -m module ...`, `python -c code ...` or `python script.py ...` (`args` without the
    interpreter) in a fresh interpreter and measure it. The peak is read by the process itself at exit:
    the rusage a parent gets (wait4, RUSAGE_CHILDREN) is useless here, because Linux carries the parent's
    peak into a child across fork and exec, so any child of a 1 GB benchmark process would report at
    least 1 GB."""
    script = len(args) >= 1 and str(args[0]).endswith(".py")
    if not script and (len(args) < 2 or args[0] not in ("-m", "-c")):
        raise ValueError(f"args must start with -m MODULE, -c CODE or a script.py, got {list(args)[:2]}")
    with tempfile.TemporaryDirectory() as scratch:
        peak_file = f"{scratch}/peak_rss"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _PEAK_REPORTING_MAIN, *(["script"] if script else []), *args],
                              capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "MDDS_PEAK_RSS_FILE": peak_file})
        wall_s = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"python {' '.join(map(str, args[:2]))} exited with {done.returncode}: "
                               f"{done.stderr.strip()[-2000:]}")
        with open(peak_file) as peak:
            return ProcessMeasurement(wall_s=wall_s, stdout=done.stdout, **json.load(peak))


def measure_reduce(location: str, mode: str, config: CertifyConfig, images_per_group: int = DEFAULT_IMAGES_PER_GROUP,
                   timeout_s: float | None = None) -> dict:
    """`reduce_counts_location` in a fresh process: its result, the reduce's own seconds (reading,
    pivoting, certifying), the process's wall time, CPU seconds and peak RSS."""
    measured = measure_python(["-m", "pipeline.perf.reduce_scale", "reduce", location, "--mode", mode,
                               "--images-per-group", str(images_per_group), "--config", json.dumps(config.to_dict())],
                              timeout_s)
    return {**json.loads(measured.stdout.strip().splitlines()[-1]), "process_wall_s": measured.wall_s,
            "process_cpu_s": measured.cpu_s, "peak_rss_bytes": measured.peak_rss_bytes}


def measure_reduce_job(script: str, location: str, timeout_s: float | None = None) -> dict:
    """`python script LOCATION --out results.parquet` (the reduce job, jobs/reduce.py, as users run it:
    indexing, streaming, the cascade under the counts' default settings, writing the results) in a fresh
    process: the summary of the results it wrote, the process's wall time, CPU seconds and peak RSS.
    The synthetic counts carry no run settings, so the job's defaults apply: union mode, alpha 0.001,
    routing continue, as `CertifyConfig`'s defaults that the other modes use."""
    with tempfile.TemporaryDirectory() as scratch:
        out = f"{scratch}/results.parquet"
        measured = measure_python([script, location, "--out", out], timeout_s)
        summary = results_summary(read_parquet(out))
    return {**summary, "process_wall_s": measured.wall_s, "process_cpu_s": measured.cpu_s,
            "peak_rss_bytes": measured.peak_rss_bytes}


def reduce_scale_section(location: str, num_images: int = 50_000, images_per_group: int = DEFAULT_IMAGES_PER_GROUP,
                         modes: Sequence[str] = REDUCE_MODES, seed: int = 0, reduce_job: str | None = None) -> dict:
    """The benchmark's reduce-at-scale section: write synthetic ImageNet-shaped counts for `num_images`
    images under `location` (unless a previous call left them there), reduce them each way in a fresh
    process (and with the script `reduce_job`, jobs/reduce.py, when given) and say whether every
    certificate agrees."""
    config = CertifyConfig(sigmas=IMAGENET_SIGMAS, n_select=100, n=10_000)
    marker = f"{location.rstrip('/')}/_synthetic.json"
    fs, path = fsspec.core.url_to_fs(marker)
    root = path.rsplit("/", 1)[0]
    wanted = {"images": num_images, "seed": seed}
    if not fs.exists(path) or json.loads(fs.cat_file(path)) != wanted:
        if fs.exists(path):  # an earlier synthetic set of another size: its shards would mix with the new ones
            fs.rm(root, recursive=True)
        elif fs.exists(root) and fs.ls(root):
            raise ValueError(f"{location} holds files that are not synthetic counts; name an empty location")
        start = time.perf_counter()
        shards = write_synthetic_counts(location, num_images, seed=seed)
        write_bytes(marker, json.dumps(wanted).encode())
        print(f"wrote {shards} synthetic shards in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    runs = {mode: measure_reduce(location, mode, config, images_per_group) for mode in modes}
    if reduce_job is not None:
        runs["job"] = {**measure_reduce_job(reduce_job, location), "script": reduce_job}
    digests = {run["results_sha256"] for run in runs.values()}
    return {"images": num_images, "scales": len(config.sigmas), "classes": IMAGENET_CLASSES,
            "images_per_group": images_per_group, "by_mode": runs, "same_results": len(digests) == 1}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="write synthetic ImageNet-shaped counts")
    generate.add_argument("location")
    generate.add_argument("--images", type=int, default=50_000)
    generate.add_argument("--seed", type=int, default=0)
    reduce = commands.add_parser("reduce", help="reduce counts once and print one JSON line")
    reduce.add_argument("location")
    reduce.add_argument("--mode", choices=REDUCE_MODES, required=True)
    reduce.add_argument("--images-per-group", type=int, default=DEFAULT_IMAGES_PER_GROUP)
    reduce.add_argument("--config", help="CertifyConfig.to_dict() as JSON (default: ImageNet's scales)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        print(f"wrote {write_synthetic_counts(args.location, args.images, seed=args.seed)} shards")
        return
    config = (CertifyConfig.from_dict(json.loads(args.config)) if args.config
              else CertifyConfig(sigmas=IMAGENET_SIGMAS))
    start = time.perf_counter()
    outcome = reduce_counts_location(args.location, args.mode, config, args.images_per_group)
    print(json.dumps({**outcome, "mode": args.mode, "reduce_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
