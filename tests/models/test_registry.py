"""Classifier kinds (pipeline.models.registry), user factories (py: and ModelFactory) and as_denoiser.

Every model is tiny and built here or in tests/models/user_factory.py, a module importable by name as
a researcher's own package would be.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import cloudpickle
import fsspec
import pytest
import torch

from pipeline.errors import UserError
from pipeline.models.denoiser import OneShotDenoiser, denoiser_from_parts
from pipeline.models.registry import CLASSIFIER_KINDS, guess_classifier_kind, load_classifier
from pipeline.models.spec import ModelFactory, ModelSource, ModelSpec, as_denoiser
from tests.models import user_factory
from tests.models.user_factory import TinyClassifier, tiny_models, tiny_unet_and_scheduler

FACTORY = "tests.models.user_factory:tiny_classifier"
GRAY = (1, 16, 16)  # the tiny models' images


@pytest.fixture(scope="module")
def denoiser_dir(tmp_path_factory) -> Path:
    """The tiny UNet and scheduler saved as a diffusers directory."""
    directory = tmp_path_factory.mktemp("ddpm")
    unet, scheduler = tiny_unet_and_scheduler()
    unet.save_pretrained(directory, safe_serialization=True)
    scheduler.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf_like_dir(tmp_path_factory) -> Path:
    """What the guess looks at for a Hugging Face directory: a folder holding config.json."""
    directory = tmp_path_factory.mktemp("hf")
    (directory / "config.json").write_text("{}")
    return directory


@pytest.mark.parametrize("classifier, has_weights, expected", [
    (f"py:{FACTORY}", False, ("py", FACTORY)),
    ("hf:models/vit", False, ("hf", "models/vit")),
    ("{hf_dir}", False, ("hf", "{hf_dir}")),
    ("model.pt", False, ("torchscript", "model.pt")),
    ("model.ts", False, ("torchscript", "model.ts")),
    ("model.jit", False, ("torchscript", "model.jit")),
    ("model.pt", True, ("timm", "model.pt")),  # with weights a .pt name is a timm model's
    ("resnet50", True, ("timm", "resnet50")),
    ("{plain_dir}", False, ("timm", "{plain_dir}")),  # a folder without config.json is no transformers save
])
def test_the_registry_guesses_each_kind_from_the_flag(classifier, has_weights, expected, hf_like_dir, tmp_path):
    paths = dict(hf_dir=hf_like_dir, plain_dir=tmp_path)
    kind, location = guess_classifier_kind(classifier.format(**paths), has_weights)
    assert (kind, location) == (expected[0], expected[1].format(**paths))
    assert kind in CLASSIFIER_KINDS


def test_py_loads_the_users_factory_through_the_registry() -> None:
    classifier = load_classifier(ModelSpec("unused", "py", FACTORY, 10, in_chans=1), local_copy=str)
    assert isinstance(classifier, TinyClassifier) and not classifier.training
    images = torch.rand(3, *GRAY)
    with torch.no_grad():
        torch.testing.assert_close(classifier(images), user_factory.tiny_classifier()(images))


def test_a_py_spec_checks_and_reports_like_the_other_kinds(denoiser_dir) -> None:
    spec = ModelSpec(str(denoiser_dir), "py", FACTORY, 10, in_chans=1, precision="fp32")
    lines = spec.check(GRAY)
    assert "classifier interpolation: inside the classifier module" in lines
    assert lines[-1] == "precision: fp32"
    with pytest.raises(UserError, match=r"returns logits of shape \(1, 10\).*expected \(1, 7\)"):
        ModelSpec(str(denoiser_dir), "py", FACTORY, 7, in_chans=1).check(GRAY)


@pytest.mark.parametrize("reference, message", [
    ("tests.models.user_factory", "expected py:package.module:function"),
    ("tests.models.user_factory:", "expected py:package.module:function"),
    ("tests/models/user_factory.py:tiny_classifier", "expected py:package.module:function"),
    ("no_such_package_xyz.models:build", "cannot import no_such_package_xyz.models.*PYTHONPATH"),
    ("tests.models.user_factory:missing", "module tests.models.user_factory has no attribute missing"),
    ("tests.models.user_factory:NOT_CALLABLE", r"NOT_CALLABLE is not callable \(type int\)"),
    ("tests.models.user_factory:not_a_module", r"not_a_module\(\) returned a str object, not a torch.nn.Module"),
])
def test_bad_py_references_are_one_clear_user_error(reference: str, message: str) -> None:
    spec = ModelSpec("unused", *guess_classifier_kind(f"py:{reference}", has_weights=False), 10)
    with pytest.raises(UserError, match=f"^classifier py:{reference}: .*{message}"):
        load_classifier(spec, local_copy=str)


@pytest.mark.parametrize("kind, location, options, message", [
    ("py", FACTORY, dict(classifier_interpolation="bicubic"),
     "--classifier-interpolation: a py: factory's classifier does its own resizing"),
    ("py", FACTORY, dict(classifier_weights="w.safetensors"), f"--classifier-weights: the factory py:{FACTORY}"),
    ("torchscript", "m.pt", dict(classifier_interpolation="bicubic"),
     "--classifier-interpolation: a TorchScript classifier does its own resizing"),
    ("hf", "vit", dict(classifier_weights="w.safetensors"),
     "--classifier-weights: the Hugging Face classifier vit carries its own weights"),
    ("digits", "cache", dict(classifier_interpolation="nearest"),
     r"--classifier-interpolation: the digits classifier runs at the data's size \(no resize\)"),
    ("onnx", "m.onnx", {}, "unknown classifier kind 'onnx'; registered kinds: digits, hf, py, timm, torchscript"),
])
def test_flags_a_kind_has_no_use_for_are_refused_when_the_spec_is_built(kind, location, options, message) -> None:
    with pytest.raises(UserError, match=message):
        ModelSpec("d", kind, location, 10, **options)


def test_flags_a_kind_uses_are_accepted() -> None:
    """Negative control for the refusals above: the same flags on kinds that use them."""
    ModelSpec("d", "timm", "resnet50", 10, classifier_weights="w.safetensors", classifier_interpolation="bicubic")
    ModelSpec("d", "hf", "vit", 10, classifier_interpolation="bicubic")


def test_model_factory_round_trips_through_pickle_and_cloudpickle() -> None:
    factory = ModelFactory(tiny_models, num_classes=10, precision="fp32")
    assert pickle.loads(pickle.dumps(factory)) == factory
    num_classes = 3

    def defined_in_a_notebook():  # a closure: only cloudpickle (what Ray uses) ships it by value
        return denoiser_from_parts(*tiny_unet_and_scheduler()), TinyClassifier(num_classes=num_classes)

    shipped = cloudpickle.loads(cloudpickle.dumps(ModelFactory(defined_in_a_notebook, num_classes)))
    denoiser, classifier = shipped.load()
    assert isinstance(denoiser, OneShotDenoiser) and isinstance(classifier, TinyClassifier)
    assert shipped.num_classes == 3 and shipped.precision is None
    assert not classifier.training


def test_model_factory_check_catches_a_wrong_logits_width_and_channels() -> None:
    source: ModelSource = ModelFactory(tiny_models, num_classes=10)
    lines = source.check(GRAY)
    assert "classifier interpolation: inside the classifier module" in lines
    with pytest.raises(UserError, match=r"factory tiny_models returns logits of shape \(1, 10\).*expected \(1, 5\)"):
        ModelFactory(tiny_models, num_classes=5).check(GRAY)
    with pytest.raises(UserError, match="takes 1-channel images but the data has 3"):
        ModelFactory(tiny_models, num_classes=10).check((3, 16, 16))


def test_model_factory_refuses_what_it_cannot_use() -> None:
    with pytest.raises(TypeError, match="factory must be callable"):
        ModelFactory(tiny_models(), num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        ModelFactory(tiny_models, num_classes=1)
    with pytest.raises(ValueError, match="precision must be bf16, fp32 or None"):
        ModelFactory(tiny_models, num_classes=10, precision="fp16")
    with pytest.raises(TypeError, match=r"must return a \(denoiser, classifier\) pair, got a TinyClassifier"):
        ModelFactory(user_factory.tiny_classifier, num_classes=10).load()
    with pytest.raises(TypeError, match="returned a classifier of type str"):
        ModelFactory(lambda: (tiny_models()[0], "classifier"), num_classes=10).load()


def test_as_denoiser_accepts_a_denoiser_a_directory_a_url_and_a_unet_scheduler_pair(denoiser_dir) -> None:
    unet, scheduler = tiny_unet_and_scheduler()
    built = denoiser_from_parts(unet, scheduler)
    assert as_denoiser(built) is built
    fs = fsspec.filesystem("memory")
    fs.put(str(denoiser_dir), "/models/ddpm", recursive=True)
    try:
        forms = [str(denoiser_dir), denoiser_dir, "memory://models/ddpm", (unet, scheduler)]
        noisy, steps = torch.rand(2, *GRAY), torch.tensor([10, 400])
        with torch.no_grad():
            expected = built.eval()(noisy, steps)
            for form in forms:
                denoiser = as_denoiser(form, fit="native")
                assert isinstance(denoiser, OneShotDenoiser) and denoiser.fit == "native" and not denoiser.training
                torch.testing.assert_close(denoiser(noisy, steps), expected)
    finally:
        fs.rm("/models", recursive=True)


@pytest.mark.parametrize("wrong", [42, None, torch.nn.Linear(2, 2), ("unet", "scheduler"), (1, 2, 3)],
                         ids=["int", "none", "module", "pair of strings", "triple"])
def test_as_denoiser_rejects_anything_else_with_a_type_error(wrong) -> None:
    with pytest.raises(TypeError, match="denoiser must be a OneShotDenoiser, a diffusers directory"):
        as_denoiser(wrong)


def test_the_digits_preset_certifies_a_py_classifier_and_refuses_flags_it_has_no_use_for(denoiser_dir) -> None:
    """The CLI path (app/workload.py): --classifier py:... is guessed, checked and loaded by the registry;
    no Ray is started and no cached digits model is trained."""
    from pipeline.app.presets import get_preset
    from pipeline.app.workload import DataOptions, ModelOptions, build_workload

    digits = get_preset("digits")
    workload = build_workload(digits, DataOptions(num_images=3),
                              ModelOptions(str(denoiser_dir), f"py:{FACTORY}", precision="fp32"))
    spec = workload.model_spec
    assert (spec.classifier_kind, spec.classifier, spec.in_chans) == ("py", FACTORY, 1)
    assert f"classifier: {FACTORY} (py)" in workload.notes
    assert len(workload.image_ids) == 3
    with pytest.raises(UserError, match="a py: factory's classifier does its own resizing"):
        build_workload(digits, DataOptions(num_images=3),
                       ModelOptions(str(denoiser_dir), f"py:{FACTORY}", classifier_interpolation="bicubic"))
