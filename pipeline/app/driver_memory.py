"""The certify driver's peak memory as a run grows: a 1,000-class run of tiny random-weight models on
small synthetic images, certified with `pipeline.certify_dataset`'s driver (`run_dataset`), once per
number of images, each in a fresh process whose own peak resident memory is measured.

What grows with the images in the driver is the run's bookkeeping: the index of the counts shards, the
end-of-run reduce and the results. The reduce reads the counts group of images by group
(store/counts.py), so the peak should not grow with the run; the dense counts of every image at once
(ImageNet's 3 scales x 1,000 classes, both phases: 48 kB per image) would add 96 MB per 2,000 images.
The images are generated inside Ray Data's tasks from their ids, so the driver never holds them (a
dataset a user builds in the driver, with ray.data.from_numpy, would be theirs to hold). The Ray actors
are other processes: their memory is not the driver's and is not measured.

    python -m pipeline.app.driver_memory OUT --images 2000      # one run, one JSON line
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.app.dataset_run import run_dataset
from pipeline.config import CertifyConfig
from pipeline.models.spec import ModelFactory
from pipeline.perf.reduce_scale import IMAGENET_CLASSES, IMAGENET_SIGMAS, measure_python

#: (channels, height, width) of the synthetic images: RGB and small, so a run of thousands of images
#: samples in a minute or two on 2 cores.
IMAGE_SHAPE = (3, 8, 8)
DRIVER_IMAGES = (2000, 4000)


def tiny_models() -> tuple[tuple[torch.nn.Module, object], torch.nn.Module]:
    """The factory each actor (and the driver's model check) calls: a two-level UNet of 8 and 16 channels
    and a linear classifier with ImageNet's 1,000 logits, random weights seeded so every copy is the same."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    channels, size = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(IMAGE_SHAPE)), IMAGENET_CLASSES))
    return (unet, scheduler), classifier


def _images_of(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of ray.data.range as the certify columns: each image drawn from a generator seeded by its id."""
    ids = batch["id"].astype(np.int64)
    images = np.stack([np.random.default_rng(int(i)).random(IMAGE_SHAPE, dtype=np.float32) for i in ids])
    return {"image_id": ids, "label": ids % IMAGENET_CLASSES, "image": images}


def synthetic_dataset(num_images: int) -> Any:
    """A ray.data.Dataset of `num_images` synthetic images (ids 0..num_images-1), made in Ray's tasks."""
    import ray.data

    return ray.data.range(num_images).map_batches(_images_of, batch_format="numpy")


def certify_synthetic(out: str, num_images: int, n_select: int, n: int, strategy: str) -> dict:
    """One run into `out`: its images, certificates and seconds."""
    config = CertifyConfig(IMAGENET_SIGMAS, n_select=n_select, n=n, strategy=strategy)
    start = time.perf_counter()
    results = run_dataset(synthetic_dataset(num_images), ModelFactory(tiny_models, IMAGENET_CLASSES), config, out,
                          image_ids=np.arange(num_images), num_actors=None, images_per_batch=16, batch_size=1024,
                          device="cpu", precision="fp32", resume=False, overwrite=False)
    return {"images": results.num_rows, "certified": int((results["prediction"].to_numpy() >= 0).sum()),
            "run_s": time.perf_counter() - start}


def driver_memory_section(workdir: Path, sizes: Sequence[int] = DRIVER_IMAGES, n_select: int = 8, n: int = 32,
                          strategy: str = "early_exit", timeout_s: float | None = None) -> dict:
    """The driver's peak RSS, wall time and CPU seconds at each number of images (a fresh process and
    run directory each), and the peak of the largest run over the smallest's."""
    workdir.mkdir(parents=True, exist_ok=True)
    runs = {}
    for size in sizes:
        print(f"[benchmark] certify driver memory: {size} images", flush=True)
        measured = measure_python(["-m", "pipeline.app.driver_memory", str(workdir / f"run-{size}"), "--images",
                                   str(size), "--n-select", str(n_select), "--n", str(n), "--strategy", strategy],
                                  timeout_s)
        runs[str(size)] = {**json.loads(measured.stdout.strip().splitlines()[-1]), "process_wall_s": measured.wall_s,
                           "process_cpu_s": measured.cpu_s, "peak_rss_bytes": measured.peak_rss_bytes}
    first, last = runs[str(sizes[0])], runs[str(sizes[-1])]
    return {"classes": IMAGENET_CLASSES, "image_shape": list(IMAGE_SHAPE), "sigmas": list(IMAGENET_SIGMAS),
            "n_select": n_select, "n": n, "strategy": strategy, "by_images": runs,
            "peak_ratio": last["peak_rss_bytes"] / first["peak_rss_bytes"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", help="the run's directory (must not exist yet)")
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--n-select", type=int, default=8)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--strategy", choices=("early_exit", "all_scales"), default="early_exit")
    args = parser.parse_args(argv)
    print(json.dumps(certify_synthetic(args.out, args.images, args.n_select, args.n, args.strategy)))


if __name__ == "__main__":
    main()
