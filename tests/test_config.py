"""The one run configuration (pipeline/config.py): what it refuses, how it resolves its defaults, the
per-image level of a family-wise run, and its stored form. The statistics trust it, so the checks that
used to live in pipeline/stats (alpha, p0, alpha mode, routing, target radii) are tested here."""

from __future__ import annotations

import json

import pytest

from pipeline.config import CascadeRule, CertifyConfig, ConfigError
from pipeline.errors import UserError

SIGMAS = (1.0, 0.5, 0.25)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"alpha": 0.0}, "alpha must be in"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"alpha": 0.001, "p0": 0.49}, "p0 must lie in"),
        ({"alpha": 0.001, "p0": 1.0}, "p0 must lie in"),
        ({"alpha": 0.001, "alpha_mode": "bonferroni"}, "alpha_mode must be one of"),
        ({"alpha": 0.001, "routing": "fastest"}, "routing must be one of"),
        ({"alpha": 0.001, "alpha_mode": "reference", "routing": "continue"}, "reference mode always routes as cascade"),
        ({"alpha": 0.001, "alpha_mode": "reference", "routing": "best"}, "reference mode always routes as cascade"),
    ],
)
def test_cascade_rule_refuses_bad_settings(settings, message) -> None:
    with pytest.raises(UserError, match=message):
        CascadeRule(**settings)


def test_cascade_rule_takes_every_valid_combination() -> None:
    """Negative control of the refusals above: the same fields at valid values build."""
    for routing in ("cascade", "continue", "best"):
        assert CascadeRule(0.001, "union", 0.5, routing).routing == routing
    assert CascadeRule(0.999, "reference", 0.99, "cascade").alpha_mode == "reference"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"alpha": 1.5}, "alpha must be in"),
        ({"p0": 0.3}, "p0 must lie in"),
        ({"routing": "fastest"}, "routing must be one of"),
        ({"alpha_mode": "reference", "routing": "continue"}, "reference mode always routes as cascade"),
        ({"target_radii": (0.5,)}, "target_radii needs strategy='adaptive'"),
        ({"strategy": "adaptive", "target_radii": (0.0,)}, "positive"),
        ({"strategy": "adaptive", "target_radii": (0.25, -0.5)}, "positive"),
        ({"strategy": "adaptive", "radius_tolerance": -0.1}, "radius_tolerance must be >= 0"),
        ({"strategy": "adaptive", "adaptive_select": 0}, "adaptive_select must be >= 1"),
        ({"strategy": "adaptive", "alpha_mode": "reference"}, "union alpha only"),
        ({"n_select": 0}, "n_select >= 1"),
        ({"n": 0}, "n must be >= 1"),
        ({"sigmas": ()}, "sigmas is empty"),
        ({"sigmas": (0.5, 0.5)}, "duplicates"),
        ({"sigmas": (0.5, -0.25)}, "positive and finite"),
        ({"family_wise": True, "family_size": 0}, "family_size must be >= 1"),
    ],
)
def test_certify_config_refuses_bad_settings(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        CertifyConfig(**{"sigmas": SIGMAS, **settings})


def test_certify_config_orders_sigmas_and_target_radii() -> None:
    config = CertifyConfig(sigmas=(0.25, 1.0, 0.5), strategy="adaptive", target_radii=(0.5, 0.25, 0.5))
    assert config.sigmas == SIGMAS and config.target_radii == (0.25, 0.5)
    assert CertifyConfig(sigmas=SIGMAS, n_select=0, task="predict").n_select == 0  # predict selects nothing


def test_routing_default_resolves_from_the_alpha_mode_and_the_strategy() -> None:
    default = CertifyConfig(sigmas=SIGMAS)
    assert default.routing == "continue" and default.rule.routing == "continue"  # union, fixed n
    assert CertifyConfig(sigmas=SIGMAS, strategy="all_scales").routing == "continue"
    assert CertifyConfig(sigmas=SIGMAS, alpha_mode="reference").routing == "cascade"
    assert CertifyConfig(sigmas=SIGMAS, strategy="adaptive").routing == "cascade"
    assert CertifyConfig(sigmas=SIGMAS, routing="best").routing == "best"  # a given routing stays


def test_replace_re_resolves_the_routing_only_when_it_depends_on_the_change() -> None:
    default = CertifyConfig(sigmas=SIGMAS)
    reference = default.replace(alpha_mode="reference")  # continue would be refused in reference mode
    assert reference.routing == "cascade" and reference.rule.routing == "cascade"
    assert reference.replace(alpha_mode="union").routing == "continue"
    assert default.replace(strategy="adaptive").routing == "cascade"
    best = default.replace(routing="best")
    assert best.replace(p0=0.6).routing == "best"  # an unrelated change keeps the routing
    assert best.replace(strategy="all_scales").routing == "continue"  # a strategy change resolves it again
    with pytest.raises(ConfigError, match="reference mode always routes as cascade"):
        default.replace(alpha_mode="reference", routing="continue")  # a given routing is checked, not re-resolved


def test_family_wise_runs_each_image_at_alpha_over_the_number_of_images() -> None:
    family = CertifyConfig(sigmas=SIGMAS, alpha=0.01, family_wise=True)
    assert family.image_alpha == 0.01  # M not known yet
    run = family.for_images(100)
    assert run.family_size == 100
    assert run.image_alpha == pytest.approx(1e-4) and run.rule.alpha == pytest.approx(1e-4)
    assert run.alpha == 0.01  # the level asked for stays what the user gave
    per_image = CertifyConfig(sigmas=SIGMAS, alpha=0.01)
    assert per_image.for_images(100) == per_image and per_image.rule.alpha == 0.01


@pytest.mark.parametrize(
    "config",
    [
        CertifyConfig(sigmas=SIGMAS),
        CertifyConfig(sigmas=SIGMAS, alpha=0.01, family_wise=True).for_images(250),
        CertifyConfig(sigmas=(0.5, 0.25), n_select=16, n=4096, alpha=0.05, strategy="adaptive", routing="best",
                      radius_tolerance=0.1, target_radii=(0.25, 0.5), adaptive_select=8, seed=7),
        CertifyConfig(sigmas=SIGMAS, alpha_mode="reference", p0=0.6, strategy="all_scales"),
        CertifyConfig(sigmas=SIGMAS, n_select=0, task="predict"),
    ],
)
def test_to_dict_and_from_dict_round_trip_through_json(config: CertifyConfig) -> None:
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["alpha"] == pytest.approx(config.image_alpha) and stored["user_alpha"] == config.alpha
    again = CertifyConfig.from_dict({**stored, "inputs": {"data": "ignored"}})  # unknown keys are ignored
    assert again == config and again.rule == config.rule
    assert CertifyConfig.from_dict({**stored, "seed": config.seed + 1}) != config  # equality sees the fields


def test_config_errors_spell_fields_as_the_library_or_as_the_caller_names_them() -> None:
    with pytest.raises(ConfigError) as refused:
        CertifyConfig(sigmas=SIGMAS, n_select=0)
    error = refused.value
    assert isinstance(error, UserError) and isinstance(error, ValueError)
    assert str(error) == "n must be >= 1 and n_select >= 1, got 10000 and 0"
    flags = {"n": "--n", "n_select": "--n-select"}
    assert error.with_names(flags) == "--n must be >= 1 and --n-select >= 1, got 10000 and 0"
    assert error.with_names({"n_select": "--n-select"}) == "n must be >= 1 and --n-select >= 1, got 10000 and 0"
    with pytest.raises(ConfigError) as refused:
        CertifyConfig(sigmas=SIGMAS, target_radii=(0.5,))
    assert refused.value.with_names({"target_radii": "--target-radius", "adaptive": "--adaptive"}).startswith(
        "--target-radius needs --adaptive")
