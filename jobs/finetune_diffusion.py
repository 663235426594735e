"""Fine-tune the diffusion denoiser for the multi-scale cascade (method.md §6) with Ray Train.

The classifier stays frozen; the UNet (or a LoRA adapter on it) learns to denoise so that recoverable
inputs are classified correctly and non-recoverable ones get denoisings that disagree, which makes the
smoothed classifier abstain (or fall through to a lower scale) instead of certifying a wrong class.

    python jobs/finetune_diffusion.py --num-workers 2                  # digits, CPU, a few minutes
    python jobs/finetune_diffusion.py --out outputs/finetune-digits --resume --epochs 12
    python jobs/certify.py --all-scales --denoiser outputs/finetune-digits/denoiser
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `python jobs/finetune_diffusion.py` from a plain checkout

from pipeline.app.cli import prepare_out_dir, run_main, user_error_message  # noqa: E402
from pipeline.distributed.ray_init import init_ray  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.finetune.loss import LossSettings  # noqa: E402
from pipeline.finetune.train_loop import FinetuneSettings, ProbeSet, train_loop_per_worker  # noqa: E402
from pipeline.models.denoiser import DENOISER_FITS  # noqa: E402
from pipeline.app.presets import get_preset, parse_sigmas  # noqa: E402

RUN_RECORD = "run.json"
DENOISER_SUBDIR = "denoiser"
HISTORY_FILE = "history.json"

# Flags that shape the training; None in argparse means "not given", so --resume can tell a
# repeated flag from a changed one. Defaults: about 5 minutes on 2 shared CPU cores (see --help).
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 8,
    "batch_size": 32,
    "lr": 2e-4,
    "lambda_cls": 1.0,
    "eta_anti": 1.0,
    "num_denoisings": 2,
    "recoverable_loss": "ce",
    "lora_rank": 0,
    "seed": 0,
    "probe_images": 64,
    "probe_samples": 16,
    "denoiser_fit": "pad",
}


EPILOG = """\
outputs (OUT):
  denoiser/      the fine-tuned denoiser (UNet2DModel + DDPMScheduler) for jobs/certify.py --denoiser
  history.json   per epoch: loss terms, fraction of recoverable inputs, probe metrics
  run.json       settings and the Ray Train run name (what --resume reads)
  ray_results/   Ray Train checkpoints: weights.safetensors, optimizer.pt, training.json

probe metrics (every epoch, held-out test images, fixed noise):
  probe_accuracy_sigmaS         smoothed accuracy: majority of --probe-samples denoisings at scale S
  probe_confident_wrong_sigmaS  share whose wrong winning class has more than half the votes,
                                i.e. what a certificate could claim wrongly; fine-tuning aims to lower it
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.strip(),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = TRAINING_DEFAULTS
    parser.add_argument("--preset", default="digits", help="data set and base models (default digits; the only one for now)")
    parser.add_argument("--out", default="outputs/finetune-digits", help="local output directory (default outputs/finetune-digits)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its latest checkpoint (weights and optimizer state); "
                             "--epochs may be raised, other training flags must match the run")
    parser.add_argument("--storage-path", default=None,
                        help="Ray Train checkpoint storage (local path or s3://, gs://); default OUT/ray_results")
    parser.add_argument("--num-workers", type=int, default=2, help="data-parallel workers, one GPU each if the cluster has GPUs (default 2)")
    parser.add_argument("--denoiser", default=None,
                        help="base denoiser: diffusers UNet2DModel + DDPMScheduler directory "
                             "(default: the preset's cached model)")
    parser.add_argument("--classifier", default=None,
                        help="frozen classifier: a TorchScript file taking [0,1] images (default: the preset's)")
    parser.add_argument("--denoiser-fit", choices=DENOISER_FITS, metavar="|".join(DENOISER_FITS),
                        help="images whose size is not the UNet's: pad (reflection-pad to its size, crop back), "
                             "native (the UNet at the image size) or resize (bilinear; changes the noise "
                             f"statistics); as jobs/certify.py --denoiser-fit (default {d['denoiser_fit']})")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, help=f"passes over the train split (default {d['epochs']})")
    training.add_argument("--batch-size", type=int, help=f"images per worker per step (default {d['batch_size']})")
    training.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d['lr']})")
    training.add_argument("--lora-rank", type=int,
                          help=f"LoRA rank on the UNet's convolutions and attention; 0 = full fine-tuning "
                               f"(default {d['lora_rank']})")
    training.add_argument("--seed", type=int, help=f"noise and shuffling seed (default {d['seed']})")

    objective = parser.add_argument_group("objective: L = L_diff + lambda (L_recoverable + eta L_anti)")
    objective.add_argument("--sigmas", help="scales a training noise level is drawn from (default: the preset's)")
    objective.add_argument("--num-denoisings", type=int,
                           help=f"M >= 2 denoisings per image and step (default {d['num_denoisings']})")
    objective.add_argument("--lambda-cls", type=float, help=f"weight lambda of the classifier terms "
                                                            f"(default {d['lambda_cls']})")
    objective.add_argument("--eta-anti", type=float, help=f"weight eta of anti-consistency on non-recoverable "
                                                          f"inputs (default {d['eta_anti']})")
    objective.add_argument("--recoverable-loss", choices=("ce", "brier"),
                           help=f"loss on recoverable inputs (default {d['recoverable_loss']})")

    probe = parser.add_argument_group("probe (reported every epoch)")
    probe.add_argument("--probe-images", type=int, help=f"held-out test images (default {d['probe_images']})")
    probe.add_argument("--probe-samples", type=int, help=f"denoisings per image and scale "
                                                         f"(default {d['probe_samples']})")
    return parser


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """Training flags the user passed explicitly (sigmas parsed)."""
    given = {name: getattr(args, name) for name in TRAINING_DEFAULTS if getattr(args, name) is not None}
    if args.sigmas is not None:
        given["sigmas"] = parse_sigmas(args.sigmas)
    return given


def _flags_from_settings(record: dict[str, Any], probe_images: int) -> dict[str, Any]:
    """The flag values a stored run was started with."""
    loss = record["loss"]
    return {
        "epochs": record["epochs"], "batch_size": record["batch_size"], "lr": record["learning_rate"],
        "lambda_cls": loss["lambda_cls"], "eta_anti": loss["eta_anti"], "num_denoisings": loss["num_denoisings"],
        "recoverable_loss": loss["recoverable_loss"], "lora_rank": record["lora_rank"], "seed": record["seed"],
        "probe_images": probe_images, "probe_samples": record["probe_samples"], "sigmas": tuple(loss["sigmas"]),
        "denoiser_fit": record.get("denoiser_fit", "resize"),  # what runs from before the flag did
    }


def _check_ranges(flags: dict[str, Any]) -> None:
    for name in ("epochs", "batch_size", "probe_images", "probe_samples"):
        if flags[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {flags[name]}")
    if not flags["lr"] > 0:
        raise UserError(f"--lr must be positive, got {flags['lr']}")
    if flags["lora_rank"] < 0:
        raise UserError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {flags['lora_rank']}")


def _loss_settings(flags: dict[str, Any]) -> LossSettings:
    """The objective's options, validated (before anything is written or started)."""
    return LossSettings(
        sigmas=flags["sigmas"], num_denoisings=flags["num_denoisings"], lambda_cls=flags["lambda_cls"],
        eta_anti=flags["eta_anti"], recoverable_loss=flags["recoverable_loss"],
    )


def _settings(flags: dict[str, Any], loss: LossSettings, denoiser_dir: str, classifier_kind: str,
              classifier_dir: str, num_classes: int, train_rows: int) -> FinetuneSettings:
    return FinetuneSettings(
        denoiser_dir=denoiser_dir, classifier_dir=classifier_dir, classifier_kind=classifier_kind,
        num_classes=num_classes, loss=loss, epochs=flags["epochs"], batch_size=flags["batch_size"],
        learning_rate=flags["lr"], lora_rank=flags["lora_rank"], seed=flags["seed"],
        probe_samples=flags["probe_samples"], train_rows=train_rows, denoiser_fit=flags["denoiser_fit"],
    )


def _resolve_flags(args: argparse.Namespace, out: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fresh run: defaults overridden by the given flags. Resume: the stored run's flags; a given flag
    that differs is refused (changing the objective mid-run would not be a resume), except --epochs."""
    given = _given(args)
    if not args.resume:
        flags = {**TRAINING_DEFAULTS, "sigmas": get_preset(args.preset).sigmas, **given}
        return flags, None
    record_path = out / RUN_RECORD
    if not record_path.is_file():
        raise UserError(f"--resume: {out} holds no fine-tuning run ({RUN_RECORD} missing)")
    record = json.loads(record_path.read_text())
    flags = _flags_from_settings(record["settings"], record["probe_images"])
    for name, value in given.items():
        if name != "epochs" and value != flags[name]:
            raise UserError(f"--resume keeps the run's settings: --{name.replace('_', '-')} {value} differs from "
                            f"the run's {flags[name]}; start a new --out to change it")
    flags["epochs"] = given.get("epochs", flags["epochs"])
    return flags, record


def _base_models(args: argparse.Namespace, denoiser_fit: str) -> tuple[str, str, str]:
    """Base denoiser dir, classifier kind and path: the given ones, else the digits models (trained and
    cached on first use). Both are loaded once here so a bad path, or a denoiser the fit cannot bring
    the digits to, fails before any worker starts."""
    from pipeline.finetune.train_loop import load_frozen_classifier
    from pipeline.models.denoiser import load_denoiser
    from pipeline.models.digits import IMAGE_SIZE, digits_classifier_dir, digits_denoiser_dir

    denoiser_dir = str(Path(args.denoiser).resolve()) if args.denoiser else str(digits_denoiser_dir())
    if args.classifier:
        kind, classifier_path = "torchscript", str(Path(args.classifier).resolve())
    else:
        kind, classifier_path = "digits", str(digits_classifier_dir())
    load_denoiser(denoiser_dir, denoiser_fit).check_size((IMAGE_SIZE, IMAGE_SIZE))
    load_frozen_classifier(kind, classifier_path)
    return denoiser_dir, kind, classifier_path


def _digits_data(probe_images: int):
    """The digits train split as Ray Data rows {image_id, label, image}, and the probe images."""
    import ray.data

    from pipeline.data.digits import load_digits_split

    split = load_digits_split()
    rows = [
        {"image_id": index, "label": int(label), "image": image}
        for index, (image, label) in enumerate(zip(split.train_images, split.train_labels))
    ]
    probe = ProbeSet(split.test_images[:probe_images], split.test_labels[:probe_images])
    return ray.data.from_items(rows), len(rows), probe


def _use_gpu() -> bool:
    import ray
    import torch

    return torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) > 0


def _fit(settings: FinetuneSettings, probe: ProbeSet, dataset, num_workers: int, storage_path: str, name: str):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = _use_gpu()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings, "probe": probe},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            storage_path=storage_path, name=name, checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)
        ),
        datasets={"train": dataset},
    )
    try:
        return trainer.fit()
    except ray.train.WorkerGroupError as error:
        # A worker's UserError (e.g. a checkpoint that does not fit) is still one line for the user.
        for failure in error.worker_failures.values():
            if isinstance(failure, UserError) or isinstance(getattr(failure, "cause", None), UserError):
                raise UserError(user_error_message(failure)) from error
        raise


def _run_models(args: argparse.Namespace, record: dict[str, Any] | None, denoiser_fit: str) -> tuple[str, str, str]:
    """A fresh run's base models; a resumed run keeps its own, even if the cache has moved on since."""
    if record is None:
        return _base_models(args, denoiser_fit)
    if args.denoiser or args.classifier:
        raise UserError("--resume keeps the run's base models; do not pass --denoiser or --classifier")
    stored = record["settings"]
    return stored["denoiser_dir"], stored["classifier_kind"], stored["classifier_dir"]


def _storage_path(args: argparse.Namespace, out: Path, record: dict[str, Any] | None) -> str:
    """Where Ray Train keeps checkpoints: --storage-path (local paths made absolute), else OUT/ray_results."""
    given = args.storage_path
    if given and "://" not in given:
        given = str(Path(given).resolve())
    if record is None:
        return given or str(out / "ray_results")
    if given and given != record["storage_path"]:
        raise UserError(f"--resume: the run's checkpoints are in {record['storage_path']}, not {given}")
    return record["storage_path"]


def finetune(args: argparse.Namespace) -> Path:
    """Run (or resume) the fine-tuning and export the final denoiser; returns OUT/denoiser."""
    from pipeline.finetune.weights import export_denoiser

    if args.preset != "digits":
        raise UserError(f"fine-tuning supports --preset digits for now, got {args.preset!r}")
    if args.num_workers < 1:
        raise UserError(f"--num-workers must be at least 1, got {args.num_workers}")
    if "://" in args.out:
        raise UserError(f"--out must be a local directory (the exported denoiser is written there), got {args.out}")
    out = Path(args.out).resolve()
    flags, record = _resolve_flags(args, out)
    _check_ranges(flags)
    loss = _loss_settings(flags)
    storage_path = _storage_path(args, out, record)
    models = _run_models(args, record, flags["denoiser_fit"])
    prepare_out_dir(str(out), args.overwrite, args.resume)

    init_ray()
    dataset, train_rows, probe = _digits_data(flags["probe_images"])
    settings = _settings(flags, loss, *models, get_preset(args.preset).num_classes, train_rows)
    record = {
        "storage_path": storage_path,
        # unique per run, so a shared storage path never silently resumes another run
        "name": record["name"] if record else f"finetune-{uuid.uuid4().hex[:8]}",
        "probe_images": flags["probe_images"],
        "settings": asdict(settings),
    }
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2))

    result = _fit(settings, probe, dataset, args.num_workers, storage_path, record["name"])
    if result.checkpoint is None:
        raise UserError("training reported no checkpoint; nothing to export")
    with result.checkpoint.as_directory() as checkpoint_dir:
        denoiser_out = export_denoiser(checkpoint_dir, out / DENOISER_SUBDIR)
    history = json.loads((denoiser_out / "finetune.json").read_text())["history"]
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    return denoiser_out


def main() -> None:
    args = build_parser().parse_args()
    denoiser_out = finetune(args)
    print(f"fine-tuned denoiser: {denoiser_out}")
    print(f"certify with it:     python jobs/certify.py --all-scales --denoiser {denoiser_out}")


if __name__ == "__main__":
    run_main(main)
