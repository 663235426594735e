"""Classifier kinds and their resize (docs/denoised-smoothing.md): timm's data config, Hugging Face transformers models.

Every model is built here with random weights; the transformers one is a tiny ViTConfig saved with
save_pretrained next to its image processor config, loaded offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.app.presets import get_preset
from pipeline.app.workload import ModelOptions, _model_spec
from pipeline.errors import UserError
from pipeline.models.classifier import load_hf_classifier, load_timm_classifier

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)




def expected_logits(network, images: torch.Tensor, size: int, mode: str, mean, std) -> torch.Tensor:
    """The eval transform written out: resize (antialiased, as PIL), normalize, forward."""
    resized = F.interpolate(images, size=(size, size), mode=mode, antialias=True, align_corners=False)
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return network((resized - mean) / std)


def test_timm_classifier_resizes_with_its_data_config_interpolation() -> None:
    """test_vit's data config says bicubic at 160; bilinear gives other logits, so the check can fail."""
    torch.manual_seed(0)
    classifier = load_timm_classifier("test_vit", None, num_classes=10)
    images = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        logits = classifier(images)
        bicubic = expected_logits(classifier.network, images, 160, "bicubic", (0.5,) * 3, (0.5,) * 3)
        bilinear = expected_logits(classifier.network, images, 160, "bilinear", (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(logits, bicubic, atol=1e-5, rtol=0)
    assert (logits - bilinear).abs().max() > 1e-3
    assert classifier.describe_resize((24, 24)) == "bicubic, antialiased, 24x24 -> 160x160"
    overridden = load_timm_classifier("test_vit", None, num_classes=10, interpolation="bilinear")
    assert overridden.interpolation == "bilinear"


def save_tiny_vit(folder: Path, size: int = 32) -> Path:
    """A tiny ViTForImageClassification (patch 8, 10 labels) and its ViTImageProcessor (bicubic), as
    save_pretrained writes them: what `hf download` of a published classifier gives."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(MEAN), image_std=list(STD),
                      resample=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("hf-vit"))


def test_hf_classifier_takes_size_normalization_and_interpolation_from_its_processor(vit_dir, monkeypatch) -> None:
    from transformers import ViTForImageClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    classifier = load_hf_classifier(vit_dir)
    model = ViTForImageClassification.from_pretrained(vit_dir).eval()
    images = torch.rand(3, 3, 24, 24)
    with torch.no_grad():
        expected = expected_logits(lambda x: model(pixel_values=x).logits, images, 32, "bicubic", MEAN, STD)
        torch.testing.assert_close(classifier(images), expected, atol=1e-5, rtol=0)
        bilinear = load_hf_classifier(vit_dir, interpolation="bilinear")(images)
    assert (bilinear - expected).abs().max() > 1e-4
    assert classifier.describe_resize((24, 24)) == "bicubic, antialiased, 24x24 -> 32x32"


def test_hf_processor_without_resample_means_transformers_default_bilinear(vit_dir, tmp_path) -> None:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((vit_dir / name).read_bytes())
    processor = json.loads((vit_dir / "preprocessor_config.json").read_text())
    del processor["resample"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    assert load_hf_classifier(tmp_path).interpolation == "bilinear"


@pytest.mark.parametrize("damage, message", [
    ("no processor", "no preprocessor_config.json"),
    ("no weights", "could not load Hugging Face classifier"),
    ("lanczos", "interpolation 'PIL resample code 1'.*--classifier-interpolation"),
    ("shortest edge", "not a fixed height and width"),
])
def test_unusable_hf_directories_are_user_errors(vit_dir, tmp_path, damage: str, message: str) -> None:
    (tmp_path / "config.json").write_bytes((vit_dir / "config.json").read_bytes())
    if damage != "no weights":
        (tmp_path / "model.safetensors").write_bytes((vit_dir / "model.safetensors").read_bytes())
    processor = json.loads((vit_dir / "preprocessor_config.json").read_text())
    processor.update({"lanczos": {"resample": 1}, "shortest edge": {"size": {"shortest_edge": 32}}}.get(damage, {}))
    if damage != "no processor":
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(UserError, match=message):
        load_hf_classifier(tmp_path)


@pytest.mark.parametrize("classifier, weights, kind", [
    ("hf:{vit}", None, "hf"),
    ("{vit}", None, "hf"),  # a directory with config.json
    ("test_vit", "w.safetensors", "timm"),
    ("model.pt", None, "torchscript"),
])
def test_classifier_kind_from_the_flag(vit_dir, classifier: str, weights: str | None, kind: str) -> None:
    options = ModelOptions(denoiser="d", classifier=classifier.format(vit=vit_dir), classifier_weights=weights)
    spec = _model_spec(get_preset("cifar10"), options, in_chans=3)
    assert spec.classifier_kind == kind
    assert spec.classifier == (str(vit_dir) if kind == "hf" else options.classifier)


def test_classifier_flags_that_do_not_fit_the_kind_are_user_errors(vit_dir) -> None:
    with pytest.raises(UserError, match="carries its own weights"):
        _model_spec(get_preset("cifar10"), ModelOptions("d", f"hf:{vit_dir}", "w.safetensors"), in_chans=3)
    with pytest.raises(UserError, match="TorchScript classifier does its own resizing"):
        _model_spec(get_preset("cifar10"), ModelOptions("d", "model.pt", classifier_interpolation="bicubic"), 3)
