"""The location flags of the developer jobs (convert_guided_diffusion, benchmark, coverage) and the
fine-tuning export, given s3:// URLs on the S3-protocol server of tests/s3_server.py: what each writes
to a URL is what it writes to a local path, and what it reads from one is what it reads from disk.

docs/storage.md lists these flags; tests/test_no_paths_on_urls.py checks the source for local-path APIs
on locations. The certify, reduce and predict flags are tested in tests/store/test_object_storage.py and
the job tests. No Ray here: every job runs in this process.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import boto3
import fsspec
import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.denoiser import load_denoiser
from pipeline.models.guided_diffusion import TIMESTEP_SCALE_FILE, convert_guided_diffusion, save_converted
from pipeline.models.spec import as_denoiser
from tests.models.test_guided_diffusion import CASES, load_job, random_reference, save_reference

TINY_CASE = "imagenet-like: resblock up/down, scale-shift, num_head_channels, 6 outputs"
TINY_FLAGS = ["--image-size", "16", "--num_head_channels", "16", "--attention-resolutions", "8",
              "--learn_sigma", "True"]


def objects_under(url: str) -> dict[str, bytes]:
    """Every object under `url` as the server holds it, read with boto3 rather than fsspec."""
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3")
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"][len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for item in listed}


def files_under(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def upload(local: Path, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(str(local) + ("/" if local.is_dir() else ""), path + ("/" if local.is_dir() else ""),
           recursive=local.is_dir())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A guided-diffusion checkpoint of the tiny architecture the converter's own job test uses."""
    arch, _ = CASES[TINY_CASE]
    return save_reference(random_reference(**arch), tmp_path_factory.mktemp("ckpt") / "model.pt")


# ---------------------------------------------------------------- convert_guided_diffusion: CHECKPOINT, OUT_DIR


def test_convert_reads_a_checkpoint_url_and_writes_the_same_files_to_a_url(tiny_checkpoint, s3_url, tmp_path,
                                                                            capsys):
    job = load_job()
    upload(tiny_checkpoint, f"{s3_url}/model.pt")
    assert job.main([str(tiny_checkpoint), str(tmp_path / "local"), *TINY_FLAGS]) == 0
    capsys.readouterr()

    assert job.main([f"{s3_url}/model.pt", f"{s3_url}/converted", *TINY_FLAGS]) == 0
    printed = capsys.readouterr().out
    stored = objects_under(f"{s3_url}/converted")
    assert stored == files_under(tmp_path / "local")  # byte for byte what a local OUT_DIR gets
    safetensors = "diffusion_pytorch_model.safetensors"
    assert f"wrote {s3_url}/converted/{safetensors} ({len(stored[safetensors]):,} bytes)" in printed
    assert as_denoiser(f"{s3_url}/converted").unet.config.out_channels == 6  # certify's --denoiser reads it

    assert job.main([f"{s3_url}/model.pt", f"{s3_url}/converted", *TINY_FLAGS]) == 2
    error = capsys.readouterr().err
    assert "not empty" in error and error.count("\n") == 1
    assert job.main([f"{s3_url}/model.pt", f"{s3_url}/converted", *TINY_FLAGS, "--overwrite"]) == 0
    assert objects_under(f"{s3_url}/converted") == stored


@pytest.mark.parametrize("checkpoint, out_dir, message", [
    ("{s3}/absent.pt", "{s3}/out", "error: model location {s3}/absent.pt does not exist"),
    ("{local}", "nosuchscheme://bucket/out", "error: cannot open nosuchscheme://bucket/out"),
])
def test_convert_url_errors_are_one_line(tiny_checkpoint, s3_url, capsys, checkpoint, out_dir, message):
    names = {"s3": s3_url, "local": str(tiny_checkpoint)}
    assert load_job().main([checkpoint.format(**names), out_dir.format(**names), *TINY_FLAGS]) == 2
    error = capsys.readouterr().err
    assert error.startswith(message.format(**names)) and error.count("\n") == 1
    assert objects_under(f"{s3_url}/out") == {}


def test_overwriting_a_url_removes_a_stale_timestep_scale(tiny_checkpoint, s3_url):
    """A rescaled-timestep model's timestep_scale.json must not outlive it in the bucket: the network of the
    next model would silently be called on the wrong timesteps."""
    converted = convert_guided_diffusion(tiny_checkpoint, CASES[TINY_CASE][1])
    written = save_converted(replace(converted, timestep_scale=0.25), f"{s3_url}/out")
    assert f"{s3_url}/out/{TIMESTEP_SCALE_FILE}" in written
    assert json.loads(objects_under(f"{s3_url}/out")[TIMESTEP_SCALE_FILE])["timestep_scale"] == 0.25
    written = save_converted(converted, f"{s3_url}/out", overwrite=True)
    assert TIMESTEP_SCALE_FILE not in objects_under(f"{s3_url}/out") and len(written) == 3


# ---------------------------------------------------------------- fine-tuning: the export


def test_export_reads_a_checkpoint_url_and_writes_the_denoiser_to_a_url(s3_url, tmp_path):
    from pipeline.finetune.weights import LoraSettings, export_denoiser, save_checkpoint, trainable_unet
    from tests.finetune.test_finetune import tiny_scheduler, tiny_unet

    base = tmp_path / "base"
    tiny_unet().save_pretrained(base, safe_serialization=True)
    tiny_scheduler().save_pretrained(base)
    model = trainable_unet(load_denoiser(base).unet, LoraSettings(rank=2))
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.normal_(0, 0.1)  # as if trained, so the export differs from the base
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    settings = {"model_spec": {"denoiser": f"{s3_url}/base"}, "lora": asdict(LoraSettings(rank=2))}
    save_checkpoint(checkpoint, model, torch.optim.AdamW(model.parameters()),
                    {"settings": settings, "epoch": 1, "step": 3, "history": []})
    upload(base, f"{s3_url}/base")
    upload(checkpoint, f"{s3_url}/storage/checkpoint")
    run = {"name": "finetune-test", "storage_path": f"{s3_url}/storage"}

    assert export_denoiser(f"{s3_url}/storage/checkpoint", f"{s3_url}/export", run) == f"{s3_url}/export"
    export_denoiser(checkpoint, tmp_path / "export", run)
    stored, local = objects_under(f"{s3_url}/export"), files_under(tmp_path / "export")
    assert set(stored) == set(local)

    def config(payload: bytes) -> dict:  # less the scratch folder the base was loaded from
        return {key: value for key, value in json.loads(payload).items() if key != "_name_or_path"}

    assert config(stored.pop("config.json")) == config(local.pop("config.json")) and stored == local
    record = json.loads(stored["finetune.json"])
    assert record["base_denoiser"] == f"{s3_url}/base" and record["step"] == 3
    exported, base_denoiser = as_denoiser(f"{s3_url}/export"), load_denoiser(base)
    noisy, timesteps = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 200])
    with torch.no_grad():
        assert not torch.allclose(exported(noisy, timesteps), base_denoiser(noisy, timesteps), atol=1e-3)


# ---------------------------------------------------------------- benchmark: --out, --vote-cache, --denoiser


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_benchmark_writes_out_and_its_vote_cache_to_urls(s3_url, one_torch_thread):
    """The second run reads the votes the first one left at --vote-cache instead of drawing them."""
    from pipeline.app.benchmark import benchmark, build_parser

    flags = ["--quick", "--skip-throughput", "--threads", "1", "--target-radius", "0.5", "--tolerance-sweep", "",
             "--out", f"{s3_url}/bench",
             "--vote-cache", f"{s3_url}/cache/votes.npz"]
    table = benchmark(build_parser().parse_args(flags))
    stored = objects_under(f"{s3_url}/bench")
    assert set(stored) == {"benchmark.json", "benchmark.md"} and stored["benchmark.md"].decode() == table
    first = json.loads(stored["benchmark.json"])["adaptive"]
    assert first["fixed"]["wall_s_source"] == "measured"
    assert set(objects_under(f"{s3_url}/cache")) == {"votes.npz", "votes.npz.json"}

    benchmark(build_parser().parse_args(flags))
    written = objects_under(f"{s3_url}/bench")
    second = json.loads(written["benchmark.json"])
    assert second["adaptive"]["fixed"]["wall_s_source"] == "measured when votes.npz was filled"
    assert second["adaptive"]["per_image"] == first["per_image"]

    # votes drawn in one arithmetic are not read by a run in the other (they differ near class boundaries)
    other = {"bf16": "fp32", "fp32": "bf16"}[second["settings"]["precision"]]
    with pytest.raises(UserError, match="holds votes for other settings"):
        benchmark(build_parser().parse_args([*flags, "--precision", other]))
    assert objects_under(f"{s3_url}/bench") == written  # the refused run wrote nothing


def test_benchmark_loads_its_denoiser_from_a_url(digits_cache, s3_url, tmp_path):
    from argparse import Namespace

    from pipeline.app.benchmark import digits_models
    from pipeline.models.digits import digits_denoiser_dir

    upload(digits_denoiser_dir(), f"{s3_url}/denoiser")
    args = Namespace(random_models=False, denoiser=f"{s3_url}/denoiser", precision="fp32", seed=0)
    denoiser, _, spec = digits_models(args, tmp_path)
    assert spec.denoiser == f"{s3_url}/denoiser"  # what the Ray sections' actors load, each copying it
    local = load_denoiser(digits_denoiser_dir())
    noisy = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(denoiser(noisy, torch.tensor([5, 50])), local(noisy, torch.tensor([5, 50])))


def test_benchmark_refuses_a_bad_out_url_before_running(tmp_path):
    from pipeline.app.benchmark import benchmark, build_parser

    with pytest.raises(UserError, match="cannot open nosuchscheme://bucket/bench"):
        benchmark(build_parser().parse_args(["--quick", "--out", "nosuchscheme://bucket/bench"]))


# ---------------------------------------------------------------- coverage: --out


def test_coverage_writes_the_same_json_to_a_url(s3_url, tmp_path):
    from pipeline.app.coverage import build_parser, coverage

    flags = ["--trials", "20", "--n", "100", "--n-select", "20", "--seed", "3"]
    coverage(build_parser().parse_args([*flags, "--out", str(tmp_path / "coverage.json")]))
    coverage(build_parser().parse_args([*flags, "--out", f"{s3_url}/coverage.json"]))
    assert objects_under(s3_url) == {"coverage.json": (tmp_path / "coverage.json").read_bytes()}
    with pytest.raises(UserError, match="cannot open nosuchscheme://x/coverage.json"):
        coverage(build_parser().parse_args([*flags, "--out", "nosuchscheme://x/coverage.json"]))
