"""The Python API against the jobs: same counts, same certificates, same cells (issue 22's acceptance)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pipeline
from pipeline.app.args import build_parser, request_from_args
from pipeline.app.certify import certify
from pipeline.stats.cascade import needs_next_stage
from pipeline.store.counts import counts_to_arrays, read_counts
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
SIGMAS = (0.5, 0.25, 0.125)
NUM_IMAGES = 20
SETTINGS = dict(n_select=20, n=100, alpha=0.001)
FLAGS = ["--num-images", str(NUM_IMAGES), "--n", "100", "--n-select", "20", "--sigmas", "0.5,0.25,0.125",
         "--precision", "fp32", "--batch-size", "256"]


def digits_test_set(count: int) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.data.digits import load_digits_split

    split = load_digits_split()
    return split.test_images[:count], split.test_labels[:count]


def sorted_rows(table: pa.Table) -> pa.Table:
    return table.sort_by([("image_id", "ascending"), ("sigma", "descending")])


@pytest.fixture(scope="module")
def cli_run(digits_cache, ray_session, tmp_path_factory) -> Path:
    """jobs/certify.py --all-scales on the first 20 digits test images, fp32."""
    out = tmp_path_factory.mktemp("cli-all-scales")
    certify(request_from_args(build_parser("digits", "test").parse_args([*FLAGS, "--all-scales", "--out", str(out),
                                                                          "--overwrite"])))
    return out


@pytest.fixture(scope="module")
def smooth(digits_cache) -> pipeline.MultiScaleSmooth:
    from pipeline.models.digits import digits_classifier_dir, digits_denoiser_dir, load_digits_classifier

    classifier = load_digits_classifier(digits_classifier_dir())
    return pipeline.MultiScaleSmooth(str(digits_denoiser_dir()), classifier, 10, SIGMAS, precision="fp32",
                                     batch_size=256)


def test_all_scales_counts_and_results_equal_the_jobs(cli_run, smooth, tmp_path):
    images, labels = digits_test_set(NUM_IMAGES)
    counts = smooth.counts(images, labels, strategy="all_scales", progress=False, **SETTINGS)
    assert sorted_rows(counts).equals(sorted_rows(read_counts(cli_run / "counts")))

    results = smooth.certify(images, labels, strategy="all_scales", progress=False, **SETTINGS)
    reduced = tmp_path / "reduced.parquet"
    job = subprocess.run([sys.executable, "jobs/reduce.py", str(cli_run / "counts"), "--out", str(reduced)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert results.equals(pq.read_table(reduced))
    assert results.equals(pq.read_table(cli_run / "results.parquet"))
    assert pipeline.reduce(counts, smooth.config(strategy="all_scales", **SETTINGS)).equals(results)


@pytest.mark.parametrize("routing", ["cascade", "continue"])
def test_early_exit_samples_only_the_cells_the_routing_needs(cli_run, smooth, routing):
    """The cells the jobs' early exit samples are those its routing needs given the votes
    (tests/jobs/test_certify_job.py); the API's are the same, with the same votes."""
    images, labels = digits_test_set(NUM_IMAGES)
    early = counts_to_arrays(smooth.counts(images, labels, routing=routing, progress=False, **SETTINGS), SIGMAS)
    full = counts_to_arrays(read_counts(cli_run / "counts"), SIGMAS)
    rule = smooth.config(routing=routing, **SETTINGS).rule
    needed = np.ones(NUM_IMAGES, dtype=bool)
    for stage in range(3):
        if stage:
            needed &= needs_next_stage(full.select_counts[:, :stage], full.estimate_counts[:, :stage], 3, rule)
        np.testing.assert_array_equal(early.present[:, stage], needed)
    np.testing.assert_array_equal(early.estimate_counts[early.present], full.estimate_counts[early.present])
    assert early.present.sum() < full.present.sum()  # early exit did skip cells here


def test_settings_are_checked_by_the_one_config(smooth):
    images, _ = digits_test_set(2)
    with pytest.raises(ValueError, match="n_select must be >= 1|n must be >= 1"):
        smooth.certify(images, n_select=0, progress=False)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        smooth.certify(images * 2 + 1, progress=False)
    with pytest.raises(ValueError, match="distinct"):
        smooth.certify(images, image_ids=[3, 3], progress=False)


def test_without_labels_nothing_counts_as_correct(smooth):
    """Label -1 means unknown: an abstention (prediction -1) must not read as a correct prediction."""
    images, _ = digits_test_set(4)
    results = smooth.certify(images, n_select=10, n=16, alpha=1e-6, progress=False)  # too few votes: all abstain
    assert results["prediction"].to_pylist() == [-1] * 4 and results["label"].to_pylist() == [-1] * 4
    assert not any(results["correct"].to_pylist())


# ------------------------------------------------------------------ certify_dataset with a user's nn.Module


class MeanIntensityClassifier(torch.nn.Module):
    """A classifier no loader of mdds knows: a fixed random linear map of the image, defined here."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.linear = torch.nn.Linear(16 * 16, 10)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(10, 256, generator=generator))
            self.linear.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1) - 0.5)


def user_models() -> tuple[str, torch.nn.Module]:
    """The factory each actor calls: the cached digits denoiser and the classifier above."""
    from pipeline.models.digits import digits_denoiser_dir

    return str(digits_denoiser_dir(progress=False)), MeanIntensityClassifier()


def test_certify_dataset_runs_a_user_module_through_a_factory(digits_cache, ray_session, tmp_path):
    import cloudpickle
    import ray.data

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors need not import tests/
    images, labels = digits_test_set(6)
    dataset = ray.data.from_items([{"image_id": 100 + i, "label": int(labels[i]), "image": images[i]}
                                   for i in range(6)])
    config = pipeline.CertifyConfig(SIGMAS, n_select=20, n=64, alpha=0.01)
    run = pipeline.certify_dataset(dataset, user_models, config, tmp_path / "out", num_classes=10,
                                   num_actors=1, batch_size=128, precision="fp32")
    denoiser, classifier = user_models()
    local = pipeline.MultiScaleSmooth(denoiser, classifier, 10, SIGMAS, precision="fp32", batch_size=128)
    expected = local.certify(images, labels, config=config, image_ids=np.arange(100, 106), progress=False)
    assert run.results.equals(expected)
    assert pq.read_table(tmp_path / "out" / "results.parquet").equals(expected)
    assert (tmp_path / "out" / "report.md").read_text().startswith("# mdds certification report")


def test_certify_dataset_names_a_missing_column(ray_session, tmp_path):
    import ray.data

    dataset = ray.data.from_items([{"image_id": 0, "image": np.zeros((1, 16, 16), np.float32)}])
    config = pipeline.CertifyConfig(SIGMAS)
    with pytest.raises(ValueError, match="lacks column.*label"):
        pipeline.certify_dataset(dataset, user_models, config, tmp_path / "out", num_classes=10)
    assert not (tmp_path / "out").exists()


def test_import_pipeline_loads_neither_ray_nor_diffusers():
    code = ("import sys, pipeline; help(pipeline.MultiScaleSmooth); help(pipeline.CertifyConfig); "
            "print(sorted(m for m in ('ray', 'diffusers', 'ray.data') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PAGER": "cat"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
