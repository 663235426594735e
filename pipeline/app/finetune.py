"""The fine-tuning job's driver: per-preset defaults, flags, the data and models (certification's own
readers and loaders), the run record that --resume reads, and the export.

A fresh run takes each preset's defaults, overridden by the flags given. A resumed run keeps the settings
stored in OUT/run.json: a flag that differs from them is refused (changing the objective mid-run would
not be a resume), except --epochs, which may be raised.
"""

from __future__ import annotations

import argparse
import json
import math
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.app.args import add_model_arguments, use_gpu
from pipeline.app.cli import prepare_out_dir
from pipeline.app.presets import get_preset, parse_sigmas
from pipeline.app.workload import DataOptions, ModelOptions, Workload, build_workload
from pipeline.errors import UserError
from pipeline.finetune.loss import LossSettings
from pipeline.finetune.train_loop import FinetuneSettings, ProbeSet
from pipeline.finetune.weights import LORA_TARGETS, LoraSettings
from pipeline.models.precision import PRECISION_CHOICES

RUN_RECORD = "run.json"
DENOISER_SUBDIR = "denoiser"
HISTORY_FILE = "history.json"
ROWS_PER_BLOCK = 512  # training blocks: enough of them for every worker's shard to stream

FINETUNE_COMMON_DEFAULTS: dict[str, Any] = {
    "lambda_cls": 1.0, "eta_anti": 1.0, "num_denoisings": 2, "recoverable_loss": "ce", "seed": 0,
    "lora_alpha": None, "lora_targets": ",".join(LORA_TARGETS), "denoiser_fit": "pad",
    "precision": "auto", "gradient_checkpointing": "auto",
}
# Per data set. digits: about 4 minutes on 2 CPU cores (pipeline/finetune/RESULTS.md). cifar10: the
# 52M-parameter improved-diffusion UNet is small enough to train whole. imagenet: the 552M-parameter
# 256x256 ADM gets LoRA adapters and gradient checkpointing; batch 8 per GPU with M = 2 denoisings is
# meant to fit an 80 GB GPU in bf16, an estimate not yet measured on one (docs/finetuning.md).
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 8, "batch_size": 32, "lr": 2e-4, "lora_rank": 0, "checkpoint_every": 0,
               "probe_images": 64, "probe_samples": 16},
    "cifar10": {"epochs": 1, "batch_size": 32, "lr": 1e-4, "lora_rank": 0, "checkpoint_every": 500,
                "probe_images": 256, "probe_samples": 16},
    "imagenet": {"epochs": 1, "batch_size": 8, "lr": 1e-4, "lora_rank": 16, "checkpoint_every": 250,
                 "probe_images": 100, "probe_samples": 8},
}
# Flags that shape the run. argparse leaves them None when not given, so --resume can tell a repeated
# flag from a changed one.
RUN_FLAGS = (*FINETUNE_COMMON_DEFAULTS, *FINETUNE_PRESETS["digits"], "sigmas", "data", "preprocess", "denoiser",
             "classifier", "classifier_weights", "classifier_interpolation")

DESCRIPTION = """\
Fine-tune the diffusion denoiser for the multi-scale cascade with Ray Train (docs/finetuning.md).

The classifier stays frozen; the UNet (or a LoRA adapter on it) learns to denoise so that recoverable
inputs are classified correctly and non-recoverable ones get denoisings that disagree, which makes the
smoothed classifier abstain (or fall through to a lower scale) instead of certifying a wrong class.
Data, denoiser and classifier are given as to the certification jobs; docs/finetuning.md has the
ImageNet cluster run.

    python jobs/finetune_diffusion.py --num-workers 2                  # digits, CPU, a few minutes
    python jobs/finetune_diffusion.py --out outputs/finetune-digits --resume --epochs 12
    python jobs/certify.py --all-scales --denoiser outputs/finetune-digits/denoiser
    python jobs/finetune_diffusion.py --preset cifar10 --data DIR/cifar-10-batches-py \\
        --denoiser models/cifar10-improved --classifier hf:models/vit-cifar10 --device cuda"""

EPILOG = """\
outputs (OUT):
  denoiser/      the fine-tuned denoiser (UNet2DModel + DDPMScheduler, LoRA merged) for --denoiser of
                 jobs/certify.py and jobs/certify_imagenet.py; finetune.json names the base and the run
  history.json   per epoch: loss terms, fraction of recoverable inputs, probe metrics
  run.json       settings and the Ray Train run name (what --resume reads)
  STORAGE/NAME/  Ray Train checkpoints (--storage-path, default OUT/ray_results): weights.safetensors
                 (whole UNet, or only the LoRA tensors), optimizer.pt, training.json

probe metrics (every epoch, held-out images, fixed noise):
  probe_accuracy_sigmaS         smoothed accuracy: majority of --probe-samples denoisings at scale S
  probe_confident_wrong_sigmaS  share whose wrong winning class has more than half the votes,
                                i.e. what a certificate could claim wrongly; fine-tuning aims to lower it
  held-out images: digits and cifar10 the first --probe-images of the test split; imagenet
  --probe-images evenly spaced images of --data, left out of training
"""


def preset_table() -> str:
    lines = ["preset defaults (each can be overridden by its flag; all presets: "
             f"--lora-targets {FINETUNE_COMMON_DEFAULTS['lora_targets']}, --num-denoisings 2, --lambda-cls 1, "
             "--eta-anti 1; --precision and --gradient-checkpointing auto = bf16 and on with GPUs):"]
    for name, d in FINETUNE_PRESETS.items():
        preset = get_preset(name)
        lines.append(f"  {name:<9} --sigmas {','.join(f'{s:g}' for s in preset.sigmas)}  --epochs {d['epochs']}  "
                     f"--batch-size {d['batch_size']}  --lr {d['lr']:g}  --lora-rank {d['lora_rank']}  "
                     f"--checkpoint-every {d['checkpoint_every']}  --probe-images {d['probe_images']}  "
                     f"--probe-samples {d['probe_samples']}")
    return "\n".join(lines)


def build_parser(description: str = DESCRIPTION) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, epilog=preset_table() + "\n\n" + EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(FINETUNE_PRESETS), default="digits",
                        help="data set and defaults: digits (embedded, models cached on first use), cifar10, "
                             "imagenet (default digits)")
    parser.add_argument("--out", help="local output directory (default outputs/finetune-<preset>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (weights, optimizer state, "
                             "step); --epochs may be raised, other flags must match the run")
    parser.add_argument("--storage-path", default=None,
                        help="Ray Train checkpoint storage: a local path or any fsspec URL (s3://, gs://, "
                             "abfs://) every worker can write; default OUT/ray_results")
    parser.add_argument("--export-to", default=None,
                        help="also copy the exported denoiser to this fsspec URL (s3://, gs://), where a "
                             "cluster's certification actors can read it; OUT itself is on the driver's node")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="data-parallel workers, each on its own shard of the data, one GPU each with "
                             "GPUs (default 2)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: a GPU per worker if this node or the cluster has GPUs; cuda: insist (GPU "
                             "worker groups scaled to zero); cpu (default auto)")

    data = parser.add_argument_group("data and models (as jobs/certify.py takes them)")
    data.add_argument("--data", help="training images: cifar10 the cifar-10-batches-py directory (data_batch_*), "
                                     "imagenet a class-folder tree (train/<wnid>/*.JPEG) or a Parquet of image bytes")
    add_model_arguments(data)

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, help="passes over the training images")
    training.add_argument("--batch-size", type=int, help="images per worker per step")
    training.add_argument("--lr", type=float, help="AdamW learning rate")
    training.add_argument("--lora-rank", type=int, help="LoRA rank on the UNet's convolutions and attention; "
                                                        "0 = full fine-tuning")
    training.add_argument("--lora-alpha", type=float, help="LoRA alpha (scale alpha/rank; default the rank)")
    training.add_argument("--lora-targets", help="comma-separated module-name suffixes that get adapters")
    training.add_argument("--checkpoint-every", type=int,
                          help="optimizer steps between checkpoints (0: at epoch ends only)")
    training.add_argument("--precision", choices=PRECISION_CHOICES,
                          help="bf16 autocast with the frozen classifier in bf16, or fp32 (auto: bf16 on GPU)")
    training.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"),
                          help="recompute the UNet's activations in backward (auto: on with GPUs)")
    training.add_argument("--seed", type=int, help="noise and shuffling seed (default 0)")

    objective = parser.add_argument_group("objective: L = L_diff + lambda (L_recoverable + eta L_anti)")
    objective.add_argument("--sigmas", help="scales a training noise level is drawn from (the preset's)")
    objective.add_argument("--num-denoisings", type=int, help="M >= 2 denoisings per image and step")
    objective.add_argument("--lambda-cls", type=float, help="weight lambda of the classifier terms")
    objective.add_argument("--eta-anti", type=float, help="weight eta of anti-consistency on non-recoverable inputs")
    objective.add_argument("--recoverable-loss", choices=("ce", "brier"), help="loss on recoverable inputs")

    probe = parser.add_argument_group("probe (reported every epoch)")
    probe.add_argument("--probe-images", type=int, help="held-out images (see below)")
    probe.add_argument("--probe-samples", type=int, help="denoisings per image and scale")
    return parser


def resolve_flags(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's flags and, when resuming, its stored record (see the module docstring)."""
    given = {name: getattr(args, name) for name in RUN_FLAGS if getattr(args, name, None) is not None}
    if "sigmas" in given:
        given["sigmas"] = list(parse_sigmas(given["sigmas"]))
    if not args.resume:
        defaults = {**FINETUNE_COMMON_DEFAULTS, **FINETUNE_PRESETS[args.preset],
                    "sigmas": list(get_preset(args.preset).sigmas)}
        return {name: None for name in RUN_FLAGS} | defaults | given, None
    record_path = out / RUN_RECORD
    if not record_path.is_file():
        raise UserError(f"--resume: {out} holds no fine-tuning run ({RUN_RECORD} missing)")
    record = json.loads(record_path.read_text())
    flags = dict(record["flags"])
    if args.preset != record["preset"]:
        raise UserError(f"--resume: the run in {out} is preset {record['preset']}, not {args.preset}")
    for name, value in given.items():
        if name != "epochs" and value != flags[name]:
            raise UserError(f"--resume keeps the run's settings: --{name.replace('_', '-')} {value} differs from "
                            f"the run's {flags[name]}; start a new --out to change it")
    flags["epochs"] = given.get("epochs", flags["epochs"])
    return flags, record


def check_ranges(flags: dict[str, Any], num_workers: int) -> None:
    for name in ("epochs", "batch_size", "probe_images", "probe_samples"):
        if flags[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {flags[name]}")
    if num_workers < 1:
        raise UserError(f"--num-workers must be at least 1, got {num_workers}")
    if not flags["lr"] > 0:
        raise UserError(f"--lr must be positive, got {flags['lr']}")
    if flags["lora_rank"] < 0:
        raise UserError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {flags['lora_rank']}")
    if flags["checkpoint_every"] < 0:
        raise UserError(f"--checkpoint-every must be >= 0 (0 = at epoch ends), got {flags['checkpoint_every']}")


def load_workloads(preset_name: str, flags: dict[str, Any]) -> tuple[Workload, Workload | None]:
    """The training images and, for the presets with a test split, the held-out probe images; both
    through certification's readers, with the models loaded and checked once in the driver, so a bad
    path or a model that does not fit the data fails as one line before any worker starts."""
    preset = get_preset(preset_name)
    models = ModelOptions(flags["denoiser"], flags["classifier"], flags["classifier_weights"],
                          flags["denoiser_fit"], flags["classifier_interpolation"])
    train = build_workload(preset, DataOptions(flags["data"], preprocess=flags["preprocess"], split="train"), models)
    if preset_name == "imagenet":
        return train, None
    probe = build_workload(preset, DataOptions(flags["data"], num_images=flags["probe_images"], split="test"), models)
    return train, probe


def split_probe(train: Workload, probe: Workload | None, probe_images: int,
                num_workers: int) -> tuple[Any, int, ProbeSet]:
    """(training dataset, its rows, probe set): the probe from the test split, or held out of the
    training images (evenly spaced ids) when the data set has none."""
    ids = train.image_ids
    if probe is None:
        if len(ids) <= probe_images:
            raise UserError(f"--data has {len(ids)} images; holding out --probe-images {probe_images} leaves none "
                            "to train on")
        held_out = ids[np.unique(np.linspace(0, len(ids) - 1, probe_images).round().astype(int))]
        ids = np.setdiff1d(ids, held_out)
        rows = train.dataset_for(held_out, 1).take_all()
    else:
        rows = probe.dataset_for(probe.image_ids, 1).take_all()
    rows.sort(key=lambda row: row["image_id"])
    probe_set = ProbeSet(np.stack([row["image"] for row in rows]).astype(np.float32),
                         np.array([row["label"] for row in rows], dtype=np.int64))
    blocks = max(4 * num_workers, math.ceil(len(ids) / ROWS_PER_BLOCK))
    return train.dataset_for(ids, blocks), len(ids), probe_set


def loss_settings(flags: dict[str, Any]) -> LossSettings:
    """The objective; constructing it validates it (M >= 2, known loss), before anything starts."""
    return LossSettings(sigmas=tuple(flags["sigmas"]), num_denoisings=flags["num_denoisings"],
                        lambda_cls=flags["lambda_cls"], eta_anti=flags["eta_anti"],
                        recoverable_loss=flags["recoverable_loss"])


def settings_from(flags: dict[str, Any], loss: LossSettings, train: Workload, train_rows: int,
                  gpu: bool) -> FinetuneSettings:
    precision = flags["precision"] if flags["precision"] != "auto" else ("bf16" if gpu else "fp32")
    checkpointing = flags["gradient_checkpointing"]
    targets = tuple(t.strip() for t in flags["lora_targets"].split(",") if t.strip())
    if not targets:
        raise UserError("--lora-targets is empty")
    return FinetuneSettings(
        model_spec=train.model_spec,
        loss=loss,
        lora=LoraSettings(flags["lora_rank"], flags["lora_alpha"], targets),
        epochs=flags["epochs"], batch_size=flags["batch_size"], learning_rate=flags["lr"], seed=flags["seed"],
        probe_samples=flags["probe_samples"], train_rows=train_rows, checkpoint_every=flags["checkpoint_every"],
        precision=precision,
        gradient_checkpointing=checkpointing == "on" or (checkpointing == "auto" and gpu),
    )


def storage_path(given: str | None, out: Path, record: dict[str, Any] | None) -> str:
    """Where Ray Train keeps checkpoints: --storage-path (local paths made absolute), else OUT/ray_results."""
    if given and "://" not in given:
        given = str(Path(given).resolve())
    if record is None:
        return given or str(out / "ray_results")
    if given and given != record["storage_path"]:
        raise UserError(f"--resume: the run's checkpoints are in {record['storage_path']}, not {given}")
    return record["storage_path"]


def finetune(args: argparse.Namespace) -> Path:
    """Run (or resume) the fine-tuning and export the final denoiser; returns OUT/denoiser."""
    from pipeline.distributed.ray_init import init_ray
    from pipeline.finetune.trainer import fit
    from pipeline.finetune.weights import export_denoiser

    out_text = args.out or f"outputs/finetune-{args.preset}"
    if "://" in out_text:
        raise UserError(f"--out must be a local directory (the exported denoiser is written there), got {out_text}")
    out = Path(out_text).resolve()
    flags, record = resolve_flags(args, out)
    check_ranges(flags, args.num_workers)
    loss = loss_settings(flags)
    storage = storage_path(args.storage_path, out, record)
    export = export_target(args.export_to)
    train, probe = load_workloads(args.preset, flags)  # models checked before Ray starts and before --out is touched
    prepare_out_dir(str(out), args.overwrite, args.resume)

    init_ray()
    gpu = use_gpu(args.device)
    dataset, train_rows, probe_set = split_probe(train, probe, flags["probe_images"], args.num_workers)
    settings = settings_from(flags, loss, train, train_rows, gpu)
    record = {
        "preset": args.preset,
        "storage_path": storage,
        # unique per run, so a shared storage path never silently resumes another run
        "name": record["name"] if record else f"finetune-{uuid.uuid4().hex[:8]}",
        "flags": flags,
        "settings": asdict(settings),
    }
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2))

    result = fit(settings, probe_set, dataset, args.num_workers, gpu, storage, record["name"])
    if result.checkpoint is None:
        raise UserError("training reported no checkpoint; nothing to export")
    denoiser_out = out / DENOISER_SUBDIR
    with result.checkpoint.as_directory() as checkpoint_dir:
        export_denoiser(checkpoint_dir, denoiser_out, record)
    history = json.loads((denoiser_out / "finetune.json").read_text())["history"]
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    if export is not None:
        fs, path = export
        fs.put(str(denoiser_out) + "/", path.rstrip("/") + "/", recursive=True)
    return denoiser_out


def finetune_and_report(args: argparse.Namespace) -> str:
    """`finetune`, then what the job prints: where the denoiser is and the command that certifies with it."""
    denoiser_out = finetune(args)
    script = "certify_imagenet.py" if args.preset == "imagenet" else "certify.py"
    copied = f" (copied to {args.export_to})" if args.export_to else ""
    return (f"fine-tuned denoiser: {denoiser_out}{copied}\n"
            f"certify with it:     python jobs/{script} --preset {args.preset} --denoiser {denoiser_out} ...")


def export_target(url: str | None) -> tuple[Any, str] | None:
    """The filesystem and path of --export-to, opened before training so a bad URL costs nothing."""
    if url is None:
        return None
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # unknown scheme, or its backend (s3fs, gcsfs) not installed
        raise UserError(f"--export-to: cannot open {url}: {error}") from error
