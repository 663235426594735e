"""The jobs with every location in object storage (issue 23): data, models and outputs as s3:// URLs on
the session's S3-protocol server (tests/s3_server.py), reached through AWS_ENDPOINT_URL as users reach
MinIO or an on-prem store. A path-only bug (pathlib on a URL, a stale listing) fails here, not on a cluster.

One digits run with `--denoiser` and `--out` on the server is shared by the module: it must equal the
Python API's in-process computation on the local model files, `jobs/reduce.py` and `jobs/predict.py`
read and write URLs beside it, and a SIGKILLed run resumed on the server must end with its counts and
results. The tiny ImageNet layout reads `--data`, `--denoiser` and `--classifier-weights` from the
server; fine-tuning on two workers writes its checkpoints (`--storage-path`) there, resumes from them
and exports (`--export-to`) there. The jobs run in this process on the session's Ray (runpy of the real
scripts), except the one that is killed, which joins that Ray.
"""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import transforms

from pipeline.api import MultiScaleSmooth
from pipeline.app.presets import get_preset
from pipeline.config import CertifyConfig
from pipeline.store.shards import read_shards
from tests.conftest import REPO_ROOT
from tests.jobs.test_bad_inputs import save_denoiser
from tests.jobs.test_imagenet_job import make_imagenet_tree

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")]

# 12 digits in batches of 4 on one actor: three first-scale shards, so a kill after the first is mid-run.
# fp32: the counts of runs compared here must not depend on a CPU's bf16 support.
DIGITS = ("--num-images", "12", "--n", "100", "--n-select", "20", "--images-per-batch", "4",
          "--sigmas", "1.0,0.25", "--num-actors", "1", "--precision", "fp32")
SHARD = re.compile(r"counts/part-[^/]*\.parquet$")


def run_job(script: str, *args: str) -> None:
    """jobs/<script> ARGS in this process, as `python jobs/<script>` runs it; fails the test unless it exits 0."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [script, *args])
        try:
            runpy.run_path(str(REPO_ROOT / "jobs" / script), run_name="__main__")
        except SystemExit as stop:
            assert stop.code in (0, None), f"jobs/{script} exited with {stop.code}"


def objects(url: str) -> dict[str, dict]:
    """Every object under `url` as the server lists it (boto3, not fsspec: no listing cache): key → details."""
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
    return {item["Key"][len(prefix):].lstrip("/"): item for page in pages for item in page.get("Contents", [])}


def shards(url: str) -> dict[str, tuple[str, object]]:
    """The counts shards under run `url`: name → (ETag, LastModified), to tell a reused shard from a rewritten one."""
    return {key: (item["ETag"], item["LastModified"]) for key, item in objects(url).items() if SHARD.search(key)}


def upload(local: Path, url: str) -> str:
    """Copy a file, or a directory's files, to `url`; returns `url`."""
    fs = fsspec.filesystem("s3")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        fs.put_file(str(path), url if path == local else f"{url}/{path.relative_to(local).as_posix()}")
    fs.invalidate_cache()
    return url


def read_table(url: str) -> pa.Table:
    with fsspec.open(url, "rb") as handle:
        return pq.read_table(handle)


def read_bytes(url: str) -> bytes:
    bucket, key = url.removeprefix("s3://").split("/", 1)
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def sorted_counts(out: str) -> pa.Table:
    return read_shards(f"{out}/counts").sort_by([("image_id", "ascending"), ("sigma", "descending")])


@pytest.fixture(scope="module")
def module_url(s3_server) -> str:
    """This module's prefix on the server: uploads made once here are shared by its tests."""
    return s3_server.url(f"object-storage-jobs-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def digits_denoiser_url(digits_cache, module_url) -> str:
    from pipeline.models.digits import digits_denoiser_dir

    return upload(digits_denoiser_dir(progress=False), f"{module_url}/models/digits-denoiser")


@pytest.fixture(scope="module")
def s3_digits_run(ray_session, digits_denoiser_url, module_url) -> str:
    """The shared run: --denoiser and --out on the server."""
    out = f"{module_url}/digits-run"
    run_job("certify.py", *DIGITS, "--denoiser", digits_denoiser_url, "--out", out)
    return out


def in_process(config_url: str, image_ids: np.ndarray) -> tuple[MultiScaleSmooth, CertifyConfig, np.ndarray,
                                                                np.ndarray]:
    """The Python API on the local model files, with the run's own config (run_config.json at
    `config_url`) and its digits: what the job on the server must reproduce exactly."""
    from pipeline.data.digits import load_digits_split
    from pipeline.models.digits import digits_classifier_dir, digits_denoiser_dir, load_digits_classifier

    config = CertifyConfig.from_dict(json.loads(read_bytes(config_url)))
    smooth = MultiScaleSmooth(str(digits_denoiser_dir()), load_digits_classifier(digits_classifier_dir()), 10,
                              config.sigmas, device="cpu", precision="fp32", batch_size=get_preset("digits").batch_size)
    split = load_digits_split()
    return smooth, config, split.test_images[image_ids], split.test_labels[image_ids]


def test_digits_run_on_s3_equals_an_in_process_run_on_local_models(s3_digits_run):
    from pipeline.app.reduce import reduce

    written = objects(s3_digits_run)
    for name in ("results.parquet", "report.md", "certified_accuracy.png", "run_config.json", "images.parquet"):
        assert name in written, sorted(written)
    results = read_table(f"{s3_digits_run}/results.parquet")
    ids = results["image_id"].to_numpy()
    assert ids.tolist() == list(range(12))
    smooth, config, images, labels = in_process(f"{s3_digits_run}/run_config.json", ids)
    expected = smooth.counts(images, labels, config=config, image_ids=ids, progress=False)
    counts = sorted_counts(s3_digits_run)
    assert counts.num_rows > 12  # every image at sigma 1, some at 0.25
    assert counts.equals(expected.sort_by([("image_id", "ascending"), ("sigma", "descending")]))
    assert results.equals(reduce(expected, config))


def test_reduce_reads_counts_from_a_url_and_writes_to_one(s3_digits_run):
    """The issue's failing case: `jobs/reduce.py s3://…/counts --out s3://…/r.parquet`."""
    reduced = f"{s3_digits_run}-reduced/r.parquet"
    run_job("reduce.py", f"{s3_digits_run}/counts", "--out", reduced)
    assert read_table(reduced).equals(read_table(f"{s3_digits_run}/results.parquet"))


def test_predict_writes_its_predictions_to_a_url(s3_digits_run, digits_denoiser_url, module_url):
    from pipeline.app.predict import PREDICTIONS_SCHEMA

    out = f"{module_url}/digits-predict"
    run_job("predict.py", *DIGITS, "--num-images", "4", "--denoiser", digits_denoiser_url, "--out", out)
    table = read_table(f"{out}/predictions.parquet")
    assert table.schema == PREDICTIONS_SCHEMA
    ids = table["image_id"].to_numpy()
    assert ids.tolist() == [0, 1, 2, 3]
    smooth, config, images, labels = in_process(f"{out}/run_config.json", ids)
    assert table.equals(smooth.predict(images, labels, config=config, image_ids=ids, progress=False))


def test_resume_after_sigkill_with_out_on_s3_equals_the_uninterrupted_run(
    s3_digits_run, digits_denoiser_url, module_url, ray_session, tmp_path
):
    """The driver is SIGKILLed once its first shard is on the server (it joined the session's Ray, as a
    job on a cluster does); `--resume` from another process reuses the shards it left and ends equal."""
    out = f"{module_url}/digits-killed"
    args = [*DIGITS, "--denoiser", digits_denoiser_url, "--out", out]
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, OMP_NUM_THREADS="1")
    log = tmp_path / "killed-job.log"
    with log.open("wb") as output:
        job = subprocess.Popen([sys.executable, "jobs/certify.py", *args], cwd=REPO_ROOT, env=env,
                               stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not shards(out):
            assert job.poll() is None, f"the job ended (exit {job.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no counts shard appeared in time"
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert "results.parquet" not in objects(out)
    kept = shards(out)
    assert read_shards(f"{out}/counts").num_rows < sorted_counts(s3_digits_run).num_rows

    run_job("certify.py", *args, "--resume")

    assert sorted_counts(out).equals(sorted_counts(s3_digits_run))
    assert read_bytes(f"{out}/results.parquet") == read_bytes(f"{s3_digits_run}/results.parquet")
    assert {name: shards(out)[name] for name in kept} == kept  # reused, not rewritten


@pytest.fixture(scope="module")
def tiny_imagenet_urls(module_url, tmp_path_factory) -> dict[str, Path | str]:
    """The ImageNet layout in miniature, local and on the server: a class-folder tree of odd-sized JPEGs,
    a 3-channel 32x32 diffusers denoiser and timm's tiny ViT with 1000 classes as safetensors."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-imagenet")
    tree = make_imagenet_tree(root / "val")
    denoiser = save_denoiser(root / "denoiser", in_channels=3, sample_size=32)
    torch.manual_seed(0)
    weights = root / "test_vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, num_classes=1000).state_dict(), str(weights))
    return {"tree": tree, "denoiser": denoiser, "weights": weights,
            "tree_url": upload(tree, f"{module_url}/imagenet/val"),
            "denoiser_url": upload(denoiser, f"{module_url}/models/imagenet-denoiser"),
            "weights_url": upload(weights, f"{module_url}/models/test_vit.safetensors")}


def test_imagenet_layout_with_data_models_and_out_on_s3(tiny_imagenet_urls, ray_session, module_url):
    """The counts equal a direct computation on the local copies: the files read from the server are
    the same images and models, preprocessed as torchvision's reference (Resize 256, CenterCrop 224)."""
    from pipeline.models.spec import ModelSpec
    from pipeline.sampling.kernel import FusedDenoiseClassify
    from pipeline.sampling.noise import Phase
    from pipeline.store.counts import counts_to_arrays

    tiny, out = tiny_imagenet_urls, f"{module_url}/imagenet-run"
    run_job("certify.py", "--preset", "imagenet", "--data", tiny["tree_url"], "--denoiser", tiny["denoiser_url"],
            "--classifier", "test_vit", "--classifier-weights", tiny["weights_url"], "--denoiser-fit", "resize",
            "--num-images", "4", "--skip", "1", "--n", "16", "--n-select", "8", "--sigmas", "0.5",
            "--batch-size", "24", "--num-actors", "1", "--precision", "fp32", "--out", out)

    results = read_table(f"{out}/results.parquet").sort_by("image_id").to_pydict()
    assert results["image_id"] == [0, 1, 2, 3] and results["label"] == [0, 0, 1, 1]  # sorted class folders
    counts = counts_to_arrays(read_shards(f"{out}/counts"), (0.5,))
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    images = torch.stack([reference(Image.open(tiny["tree"] / folder / "ILSVRC2012_val_0.JPEG").convert("RGB"))
                          for folder in ("n01", "n02")])
    spec = ModelSpec(str(tiny["denoiser"]), "timm", "test_vit", 1000, classifier_weights=str(tiny["weights"]),
                     denoiser_fit="resize")
    fused = FusedDenoiseClassify(*spec.load(), num_classes=1000, device="cpu", batch_size=24, precision="fp32")
    expected = fused.count(images, [0, 2], [0.5], {Phase.SELECT: 8, Phase.ESTIMATE: 16}, seed=0)
    np.testing.assert_array_equal(counts.select_counts[[0, 2], 0], expected[Phase.SELECT][:, 0])
    np.testing.assert_array_equal(counts.estimate_counts[[0, 2], 0], expected[Phase.ESTIMATE][:, 0])


@pytest.fixture(scope="module")
def tiny_finetune_urls(module_url, tmp_path_factory) -> tuple[str, str]:
    """tests/finetune's tiny 16x16 UNet and TorchScript classifier on the server: (denoiser URL, classifier URL)."""
    from tests.finetune.test_finetune import TinyClassifier, tiny_scheduler, tiny_unet

    root = tmp_path_factory.mktemp("tiny-finetune")
    tiny_unet().save_pretrained(root / "denoiser", safe_serialization=True)
    tiny_scheduler().save_pretrained(root / "denoiser")
    torch.manual_seed(1)
    torch.jit.script(TinyClassifier().eval()).save(str(root / "classifier.pt"))
    return (upload(root / "denoiser", f"{module_url}/models/tiny-denoiser"),
            upload(root / "classifier.pt", f"{module_url}/models/tiny-classifier.pt"))


def test_two_worker_finetune_on_s3_checkpoints_resumes_and_exports(tiny_finetune_urls, ray_session, module_url,
                                                                   tmp_path, monkeypatch, capfd):
    """Fine-tuning with its models read from the server and its checkpoints (--storage-path) written there:
    one epoch on two workers (checkpoints mid-epoch and at its end), then a resume for a second epoch that
    continues the optimizer state read back from the server. --export-to then holds exactly OUT/denoiser,
    whose UNet is the last checkpoint's weights (moved by training) and which loads from there as
    certification's --denoiser does, naming its run. A worker lost mid-epoch (the group restarts from the
    mid-epoch checkpoint): tests/distributed/test_node_loss.py."""
    from safetensors.torch import load

    from pipeline.finetune.weights import OPTIMIZER_FILE, WEIGHTS_FILE
    from pipeline.models.spec import as_denoiser
    from tests.jobs.test_bad_inputs import assert_user_error, run_job as run_in_process

    denoiser, classifier = tiny_finetune_urls
    out, storage, export = tmp_path / "out", f"{module_url}/finetune", f"{module_url}/models/finetuned"
    common = ["finetune_diffusion.py", "--out", str(out), "--num-workers", "2", "--batch-size", "64",
              "--probe-images", "8", "--probe-samples", "4", "--checkpoint-every", "3", "--denoiser", denoiser,
              "--classifier", classifier, "--storage-path", storage]
    run_job(*common, "--lr", "1e-3", "--epochs", "1")
    name = json.loads((out / "run.json").read_text())["name"]

    def last_checkpoint() -> tuple[str, dict]:
        """The newest checkpoint on the server (its URL) and its training.json; every one holds weights and optimizer."""
        stored = objects(f"{storage}/{name}")
        found = {key.rsplit("/", 1)[0] for key in stored if key.endswith("/training.json")}
        assert found, sorted(stored)
        for checkpoint in found:
            assert {f"{checkpoint}/{file}" for file in (WEIGHTS_FILE, OPTIMIZER_FILE)} <= set(stored)
        progress = {c: json.loads(read_bytes(f"{storage}/{name}/{c}/training.json")) for c in found}
        last = max(found, key=lambda c: progress[c]["step"])
        return f"{storage}/{name}/{last}", progress[last]

    def adam_steps(checkpoint: str) -> set[float]:
        state = torch.load(io.BytesIO(read_bytes(f"{checkpoint}/{OPTIMIZER_FILE}")), weights_only=True)["state"]
        return {float(s["step"]) for s in state.values()}

    first, progress = last_checkpoint()
    steps_per_epoch = (progress["settings"]["train_rows"] // 2) // 64
    assert steps_per_epoch > 3  # so there were mid-epoch checkpoints
    assert (progress["epoch"], progress["step"], progress["epoch_step"]) == (1, steps_per_epoch, 0)
    assert adam_steps(first) == {float(steps_per_epoch)}
    first_history = json.loads((out / "history.json").read_text())

    code, err = run_in_process(common[0], [*common[1:], "--lr", "5e-4", "--resume", "--epochs", "2"], monkeypatch, capfd)
    assert_user_error(code, err, "--lr 0.0005 differs")
    run_job(*common, "--lr", "1e-3", "--resume", "--epochs", "2", "--export-to", export)

    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and history[:2] == first_history  # continued
    last, progress = last_checkpoint()
    # AdamW's per-parameter step counts continue from the first run's: the state was restored from the server
    assert adam_steps(last) == {float(2 * steps_per_epoch)} and progress["step"] == 2 * steps_per_epoch
    exported = {p.relative_to(out / "denoiser").as_posix(): p.read_bytes()
                for p in (out / "denoiser").rglob("*") if p.is_file()}
    assert {key: read_bytes(f"{export}/{key}") for key in objects(export)} == exported
    trained = load(read_bytes(f"{last}/{WEIGHTS_FILE}"))
    unet = load(exported["diffusion_pytorch_model.safetensors"])
    base = load(read_bytes(f"{denoiser}/diffusion_pytorch_model.safetensors"))
    assert trained.keys() == unet.keys() == base.keys() and all(torch.equal(trained[k], unet[k]) for k in trained)
    assert not all(torch.equal(unet[k], base[k]) for k in unet)  # training moved the weights
    provenance = as_denoiser(export).provenance
    assert f"fine-tuned from {denoiser} by run {name} " in provenance and f"checkpoints in {storage})" in provenance
