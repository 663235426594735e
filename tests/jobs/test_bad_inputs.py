"""Bad inputs (issue 7 part 5): one line on stderr starting with "error:", exit code 2, no traceback,
and nothing already written removed. Each case here is a row of the README's bad-input table.

The jobs run in this process (runpy of the real script with its `run_main`, sharing the session's
Ray), so a case costs no interpreter start-up; one subprocess case checks the real process boundary.
"""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from pipeline.store.counts import counts_table

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGITS_RUN = ("--num-images", "2", "--n", "20", "--n-select", "10", "--sigmas", "0.5")


def run_job(script: str, args: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """Run jobs/<script> as `python jobs/<script> ARGS` would, in this process: (exit code, stderr).

    An exception other than the job's own exit propagates, so a traceback fails the test."""
    capfd.readouterr()
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(REPO_ROOT / "jobs" / script), run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    return code, capfd.readouterr().err


def assert_user_error(code: int, err: str, *fragments: str, alone: bool = True) -> str:
    """Exit 2 and one 'error: …' line naming `fragments`; `alone`: stderr holds nothing else (Ray
    progress lines may precede the error when it arises while the dataset runs)."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], err
    if alone:
        assert len(lines) == 1, err
    assert not [line for line in lines if "ERROR" in line or "open an issue" in line], err  # Ray's own logs of it
    for fragment in fragments:
        assert fragment in lines[-1], err
    return lines[-1]


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- flags and presets


def test_unknown_preset_as_a_real_process(tmp_path):
    out = tmp_path / "out"
    job = subprocess.run([sys.executable, "jobs/certify.py", "--preset", "mnist", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    line = assert_user_error(job.returncode, job.stderr, "mnist", "digits")
    assert line.startswith("error: unknown preset")
    assert not out.exists()


def test_unknown_flag_is_argparse_usage_error(tmp_path, monkeypatch, capfd):
    code, err = run_job("certify.py", ["--bogus", "--out", str(tmp_path / "out")], monkeypatch, capfd)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --bogus")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sigmas, fragment", [
    ("a,b", "comma-separated numbers"),
    ("0.5,-1", "positive"),
    ("0.5,0,0.25", "positive"),
    ("0.5,nan", "positive"),
    ("0.5,0.25,0.5", "duplicates"),
    (",", "empty"),
])
def test_bad_sigmas(sigmas, fragment, tmp_path, monkeypatch, capfd):
    code, err = run_job("certify.py", [f"--sigmas={sigmas}", "--out", str(tmp_path / "out")], monkeypatch, capfd)
    assert_user_error(code, err, "--sigmas", fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--n", "0"], "--n"),
    (["--n-select", "0"], "--n-select"),
    (["--alpha", "1.5"], "--alpha"),
    (["--num-actors", "0"], "--num-actors"),
    (["--overwrite", "--resume"], "mutually exclusive"),
])
def test_bad_settings_fail_before_writing(flags, fragment, tmp_path, monkeypatch, capfd):
    code, err = run_job("certify.py", [*flags, "--out", str(tmp_path / "out")], monkeypatch, capfd)
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_existing_results_are_not_overwritten(tmp_path, monkeypatch, capfd):
    out = tmp_path / "out"
    (out / "counts").mkdir(parents=True)
    (out / "results.parquet").write_bytes(b"earlier results")
    (out / "report.md").write_text("# earlier report\n")
    (out / "counts" / "part-s0.5-i000000000-000000007-abc.parquet").write_bytes(b"earlier counts")
    before = snapshot(out)

    code, err = run_job("certify.py", ["--out", str(out)], monkeypatch, capfd)

    assert_user_error(code, err, str(out), "--overwrite", "--resume")
    assert snapshot(out) == before


# ---------------------------------------------------------------- denoiser checkpoints (digits preset)


def save_denoiser(directory: Path, in_channels: int = 1, block_out_channels=(16, 32), sample_size: int = 16,
                  poison: bool = False) -> Path:
    """A diffusers UNet2DModel + DDPMScheduler directory like the digits one (random weights)."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                       layers_per_block=1, block_out_channels=block_out_channels,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    if poison:
        with torch.no_grad():
            unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    unet.save_pretrained(directory, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(directory)
    return directory


def weights_file(directory: Path) -> Path:
    return directory / "diffusion_pytorch_model.safetensors"


def _missing(root: Path) -> Path:
    return root / "no-such-denoiser"


def _nan_weights(root: Path) -> Path:
    return save_denoiser(root / "nan", poison=True)


def _rgb_unet(root: Path) -> Path:
    return save_denoiser(root / "rgb", in_channels=3)


def _weights_of_another_unet(root: Path) -> Path:
    target = save_denoiser(root / "mismatch")
    other = save_denoiser(root / "narrow", block_out_channels=(8, 16))
    weights_file(target).write_bytes(weights_file(other).read_bytes())
    return target


def _corrupt_safetensors(root: Path) -> Path:
    target = save_denoiser(root / "corrupt")
    weights_file(target).write_bytes(weights_file(target).read_bytes()[:4096])
    return target


def _no_scheduler(root: Path) -> Path:
    target = save_denoiser(root / "no-scheduler")
    (target / "scheduler_config.json").unlink()
    return target


def _smaller_unet(root: Path) -> Path:
    return save_denoiser(root / "small", sample_size=8)  # 16x16 digits cannot be padded to 8x8


def _bad_timestep_scale(root: Path) -> Path:
    target = save_denoiser(root / "bad-scale")
    (target / "timestep_scale.json").write_text('{"scale": 0.25}')
    return target


@pytest.mark.parametrize("make, fragments", [
    (_missing, ["denoiser directory not found"]),
    (_nan_weights, ["NaN", "conv_out.weight"]),
    (_rgb_unet, ["3-channel", "wrong architecture"]),
    (_weights_of_another_unet, ["could not load denoiser", "weights do not fit config.json", "expected shape"]),
    (_corrupt_safetensors, ["could not load denoiser"]),
    (_no_scheduler, ["scheduler_config.json"]),
    (_smaller_unet, ["--denoiser-fit pad", "larger than the denoiser's 8x8", "native"]),
    (_bad_timestep_scale, ["timestep_scale.json", "not a timestep scale record"]),
], ids=["missing", "nan_weights", "rgb_unet_for_gray_data", "weights_of_another_unet", "corrupt_safetensors",
        "no_scheduler", "unet_smaller_than_the_images", "bad_timestep_scale"])
def test_bad_denoiser(make, fragments, tmp_path, digits_cache, ray_session, monkeypatch, capfd):
    denoiser = make(tmp_path)
    before = snapshot(denoiser) if denoiser.exists() else {}

    code, err = run_job("certify.py", [*DIGITS_RUN, "--denoiser", str(denoiser), "--out", str(tmp_path / "out")],
                        monkeypatch, capfd)

    line = assert_user_error(code, err, *fragments)
    assert "If you want" not in line  # diffusers' advice on flags this tool does not have
    if denoiser.exists():
        assert snapshot(denoiser) == before
    assert not (tmp_path / "out" / "counts").exists()


# ---------------------------------------------------------------- counts Parquet for jobs/reduce.py


def good_counts() -> pa.Table:
    """Two images at two scales, 3 classes: a valid counts table."""
    select = np.array([[10, 0, 0], [9, 1, 0], [0, 10, 0], [1, 9, 0]])
    estimate = np.array([[100, 0, 0], [95, 5, 0], [0, 100, 0], [2, 98, 0]])
    return counts_table(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1]), np.array([0.5, 0.25, 0.5, 0.25]),
                        select, estimate)


def test_reduce_accepts_the_good_table(tmp_path, monkeypatch, capfd):
    """The baseline the bad cases below differ from: the same call succeeds on valid counts."""
    pq.write_table(good_counts(), tmp_path / "counts.parquet")
    code, err = run_job("reduce.py", [str(tmp_path / "counts.parquet"), "--out", str(tmp_path / "r.parquet")],
                        monkeypatch, capfd)
    assert code == 0, err
    assert pq.read_table(tmp_path / "r.parquet")["prediction"].to_pylist() == [0, 1]


def _wrong_schema(path: Path) -> None:
    pq.write_table(good_counts().drop_columns(["estimate_counts"]), path)


def _wrong_type(path: Path) -> None:
    table = good_counts()
    pq.write_table(table.set_column(2, "sigma", pa.array(["0.5", "0.25", "0.5", "0.25"])), path)


def _duplicate_rows(path: Path) -> None:
    table = good_counts()
    pq.write_table(pa.concat_tables([table, table.slice(1, 1)]), path)


def _garbage_bytes(path: Path) -> None:
    path.write_bytes(b"PAR1 this is not a parquet file")


def _truncated(path: Path) -> None:
    pq.write_table(good_counts(), path)
    path.write_bytes(path.read_bytes()[:-20])


@pytest.mark.parametrize("make, fragment", [
    (_wrong_schema, "missing column(s) estimate_counts"),
    (_wrong_type, "column sigma has type string"),
    (_duplicate_rows, "1 duplicate (image_id, sigma) rows"),
    (_garbage_bytes, "cannot read counts Parquet"),
    (_truncated, "cannot read counts Parquet"),
], ids=["wrong_schema", "wrong_type", "duplicate_rows", "garbage_bytes", "truncated"])
def test_reduce_rejects_bad_counts(make, fragment, tmp_path, monkeypatch, capfd):
    counts = tmp_path / "counts.parquet"
    make(counts)
    before = counts.read_bytes()
    code, err = run_job("reduce.py", [str(counts), "--out", str(tmp_path / "results.parquet")], monkeypatch, capfd)
    assert_user_error(code, err, fragment)
    assert counts.read_bytes() == before
    assert not (tmp_path / "results.parquet").exists()


def test_reduce_refuses_existing_out(tmp_path, monkeypatch, capfd):
    pq.write_table(good_counts(), tmp_path / "counts.parquet")
    out = tmp_path / "results.parquet"
    out.write_bytes(b"earlier results")
    code, err = run_job("reduce.py", [str(tmp_path / "counts.parquet"), "--out", str(out)], monkeypatch, capfd)
    assert_user_error(code, err, "exists", "--overwrite")
    assert out.read_bytes() == b"earlier results"


def test_reduce_missing_counts(tmp_path, monkeypatch, capfd):
    code, err = run_job("reduce.py", [str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.parquet")],
                        monkeypatch, capfd)
    assert_user_error(code, err, "counts not found")


# ---------------------------------------------------------------- image files (imagenet preset, tiny models)


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> dict[str, Path]:
    """A 4-image class-folder tree (2 unreadable files, 1 grayscale, odd sizes) and tiny RGB models:
    a 32×32 diffusers UNet and a 1000-class timm resnet10t (the imagenet preset's class count)."""
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-imagenet")
    data = root / "val"
    (data / "n01").mkdir(parents=True)
    (data / "n02").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)).save(data / "n01" / "a.png")
    (data / "n01" / "b.JPEG").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.fromarray(rng.integers(0, 255, (240, 240), dtype=np.uint8), mode="L").save(data / "n02" / "c.png")
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(data / "n02" / "d.png")
    truncated = (data / "n02" / "d.png").read_bytes()
    (data / "n02" / "d.png").write_bytes(truncated[: len(truncated) // 3])
    denoiser = save_denoiser(root / "denoiser", in_channels=3, sample_size=32)
    torch.manual_seed(0)
    classifier = timm.create_model("resnet10t", pretrained=False, num_classes=1000)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(root / "resnet10t.safetensors"))
    nan_state = {k: v.clone().contiguous() for k, v in classifier.state_dict().items()}
    nan_state["fc.bias"][0] = float("nan")
    save_file(nan_state, str(root / "resnet10t-nan.safetensors"))
    (root / "resnet10t-corrupt.safetensors").write_bytes((root / "resnet10t.safetensors").read_bytes()[:100_000])
    # a file listed in the tree but gone when read: a dangling link (or one deleted after the listing)
    with_missing = root / "val-missing"
    (with_missing / "n01").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(with_missing / "n01" / "a.png")
    (with_missing / "n01" / "b.png").symlink_to(root / "deleted.png")
    # both kinds at once, for the skipping run: the first tree plus a dangling n02/e.png
    mixed = root / "val-mixed"
    shutil.copytree(data, mixed)
    (mixed / "n02" / "e.png").symlink_to(root / "deleted.png")
    return {"data": data, "missing_data": with_missing, "mixed_data": mixed, "denoiser": denoiser,
            "weights": root / "resnet10t.safetensors", "nan_weights": root / "resnet10t-nan.safetensors",
            "corrupt_weights": root / "resnet10t-corrupt.safetensors"}


def imagenet_args(tiny: dict[str, Path], out: Path, *extra: str, classifier: str = "resnet10t",
                  weights: str = "weights", data: str = "data") -> list[str]:
    return ["--preset", "imagenet", "--data", str(tiny[data]), "--denoiser", str(tiny["denoiser"]),
            "--classifier", classifier, "--classifier-weights", str(tiny[weights]), "--num-images", "4",
            "--n", "20", "--n-select", "10", "--skip", "1", "--sigmas", "0.5", "--out", str(out),
            "--denoiser-fit", "resize", *extra]  # resize: the 32x32 UNet stays at 32, cheap on a CPU


@pytest.mark.slow
def test_unreadable_images_fail_by_default(tiny_imagenet, tmp_path, ray_session, monkeypatch, capfd):
    before = snapshot(tiny_imagenet["data"])
    code, err = run_job("certify.py", imagenet_args(tiny_imagenet, tmp_path / "out", "--on-bad-image", "fail"),
                        monkeypatch, capfd)
    line = assert_user_error(code, err, "cannot decode image", alone=False)
    assert "b.JPEG" in line or "d.png" in line
    assert snapshot(tiny_imagenet["data"]) == before
    assert not (tmp_path / "out" / "results.parquet").exists()


@pytest.mark.slow
def test_unreadable_and_missing_images_skipped_and_listed(tiny_imagenet, tmp_path, ray_session, monkeypatch, capfd):
    out = tmp_path / "out"
    args = imagenet_args(tiny_imagenet, out, "--on-bad-image", "skip", "--num-images", "5", data="mixed_data")
    code, err = run_job("certify.py", args, monkeypatch, capfd)
    assert code == 0, err
    # ImageFolder order: n01/a.png, n01/b.JPEG, n02/c.png, n02/d.png, n02/e.png; the grayscale c.png is
    # converted, not skipped; b.JPEG and d.png do not decode, e.png is gone
    assert pq.read_table(out / "results.parquet")["image_id"].to_pylist() == [0, 2]
    skipped = [line for line in (out / "report.md").read_text().splitlines() if "skipped" in line]
    assert len(skipped) == 1 and all(name in skipped[0] for name in ("b.JPEG", "d.png", "e.png"))
    assert "a.png" not in skipped[0] and "c.png" not in skipped[0]


@pytest.mark.slow
def test_missing_image_file_fails_by_default(tiny_imagenet, tmp_path, ray_session, monkeypatch, capfd):
    args = imagenet_args(tiny_imagenet, tmp_path / "out", "--on-bad-image", "fail", data="missing_data")
    code, err = run_job("certify.py", args, monkeypatch, capfd)
    assert "b.png" in assert_user_error(code, err, "missing", alone=False)


@pytest.mark.parametrize("classifier, weights, fragment", [
    ("resnet18", "weights", "do not fit timm model 'resnet18'"),
    ("resnet10t", "nan_weights", "NaN"),
    ("resnet10t", "corrupt_weights", "could not read weights"),
])
def test_bad_classifier_checkpoint(classifier, weights, fragment, tiny_imagenet, tmp_path, ray_session,
                                   monkeypatch, capfd):
    args = imagenet_args(tiny_imagenet, tmp_path / "out", classifier=classifier, weights=weights)
    code, err = run_job("certify.py", args, monkeypatch, capfd)
    assert_user_error(code, err, fragment)
    assert not (tmp_path / "out" / "counts").exists()
