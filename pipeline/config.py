"""The one typed run configuration: everything a certificate (or a prediction) depends on.

`CertifyConfig` validates itself once, on construction, and resolves the defaults that depend on
other fields (the routing by alpha mode and strategy) once; every other module takes the config
(or its `rule`, the part the statistics need) and trusts it. Its `to_dict` is the one stored form:
`run_config.json`, every counts shard's metadata, the `--resume` check and the reduce's defaults
all read and write it, and `from_dict` reads it back.

Errors are `ConfigError`s (a `ValueError`): their text names the fields as the library spells them
(`n_select must be >= 1, got 0`); the command-line jobs print the same error with their flag names
(`--n-select must be >= 1, got 0`) through `ConfigError.with_names`.

This module imports nothing heavy (no numpy, torch or Ray), so that stats/, sampling/, store/ and
app/ can all take it.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Literal

from pipeline.errors import UserError

AlphaMode = Literal["union", "reference"]
ALPHA_MODES: tuple[AlphaMode, ...] = ("union", "reference")
Routing = Literal["cascade", "continue", "best"]
ROUTINGS: tuple[Routing, ...] = ("cascade", "continue", "best")
StrategyName = Literal["early_exit", "all_scales", "adaptive"]
STRATEGIES: tuple[StrategyName, ...] = ("early_exit", "all_scales", "adaptive")
Task = Literal["certify", "predict"]
TASKS: tuple[Task, ...] = ("certify", "predict")


class ConfigError(UserError):
    """A bad setting. `template` names fields as {field}; str() spells them as the library does,
    `with_names` as a caller does (the CLI passes its flag names)."""

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        super().__init__(self.with_names({}))

    def with_names(self, names: dict[str, str]) -> str:
        spelled = {**LIBRARY_NAMES, **names}
        return self.template.format(**spelled, **self.values)


@dataclass(frozen=True)
class CascadeRule:
    """What the statistics of a certificate need (pipeline/stats): the per-image level, how it is
    split, the threshold and the routing. Built and validated by `CertifyConfig.rule`; the stats
    functions trust it."""

    alpha: float  # the per-image failure probability (family-wise runs: alpha / M)
    alpha_mode: AlphaMode = "union"
    p0: float = 0.5
    routing: Routing = "cascade"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError("{alpha} must be in (0, 1), got {value}", value=self.alpha)
        if self.alpha_mode not in ALPHA_MODES:
            raise ConfigError("{alpha_mode} must be one of {choices}, got {value!r}",
                              choices=", ".join(ALPHA_MODES), value=self.alpha_mode)
        if not 0.5 <= self.p0 < 1.0:
            raise ConfigError("{p0} must lie in [0.5, 1) (below 1/2 the certificate is not unique), got {value}",
                              value=self.p0)
        if self.routing not in ROUTINGS:
            raise ConfigError("{routing} must be one of {choices}, got {value!r}",
                              choices=", ".join(ROUTINGS), value=self.routing)
        if self.alpha_mode == "reference" and self.routing != "cascade":
            raise ConfigError("{routing} {value} needs union mode with fixed n; reference mode always routes as "
                              "cascade", value=self.routing)


@dataclass(frozen=True)
class CertifyConfig:
    """Everything a run's counts and certificates depend on; a resume must use the same values.

    sigmas: the noise scales (any order; stored from the highest). n_select: selection samples per
    (image, scale) (0 for the predict task); n: estimation samples (adaptive: the most per scale).
    alpha: the failure probability asked for; per image, or with family_wise for the whole run of
    family_size images (each image then runs at alpha / family_size: `image_alpha`). alpha_mode:
    union (a per-image guarantee, every routing valid) or reference (the published code). routing:
    cascade | continue | best; None resolves to continue in union mode with fixed n, else cascade.
    strategy: early_exit | all_scales | adaptive. radius_tolerance, target_radii, adaptive_select:
    adaptive only; adaptive_select caps the selection samples an adaptive run draws per consulted
    (image, scale) (`selection_samples`).
    task: certify, or predict (the cascaded prediction test, no certificate). seed: the noise seed.
    """

    sigmas: tuple[float, ...]
    n_select: int = 100
    n: int = 10_000
    alpha: float = 0.001
    family_wise: bool = False
    family_size: int | None = None
    alpha_mode: AlphaMode = "union"
    p0: float = 0.5
    routing: Routing | None = None
    strategy: StrategyName = "early_exit"
    radius_tolerance: float = 0.05
    target_radii: tuple[float, ...] = ()
    adaptive_select: int = 16
    task: Task = "certify"
    seed: int = 0
    rule: CascadeRule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_field = object.__setattr__.__get__(self)
        set_field("sigmas", check_sigmas(self.sigmas))
        set_field("target_radii", _target_radii(self.target_radii))
        for name in ("n_select", "n", "seed", "adaptive_select"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ConfigError("{" + name + "} must be an integer, got {value!r}", value=getattr(self, name))
        min_select = 0 if self.task == "predict" else 1
        if self.n < 1 or self.n_select < min_select:
            raise ConfigError("{n} must be >= 1 and {n_select} >= {least}, got {n_value} and {select_value}",
                              least=min_select, n_value=self.n, select_value=self.n_select)
        if self.task not in TASKS:
            raise ConfigError("{task} must be one of {choices}, got {value!r}", choices=", ".join(TASKS),
                              value=self.task)
        if self.strategy not in STRATEGIES:
            raise ConfigError("{strategy} must be one of {choices}, got {value!r}",
                              choices=", ".join(STRATEGIES), value=self.strategy)
        adaptive = self.strategy == "adaptive"
        if self.task == "predict" and self.strategy != "early_exit":
            raise ConfigError("{" + self.strategy + "} is for certification; predict uses the fixed-n test of "
                              "docs/statistics.md (cascaded prediction) with early exit")
        if adaptive and self.alpha_mode != "union":
            raise ConfigError("{adaptive} works with early exit and union alpha only (drop {alpha_mode})")
        if self.target_radii and not adaptive:
            raise ConfigError("{target_radii} needs {adaptive} (a fixed-n run certifies every radius at once)")
        if self.adaptive_select < 1:
            raise ConfigError("{adaptive_select} must be >= 1, got {value}", value=self.adaptive_select)
        if not self.radius_tolerance >= 0:
            raise ConfigError("{radius_tolerance} must be >= 0, got {value}", value=self.radius_tolerance)
        if self.family_size is not None and self.family_size < 1:
            raise ConfigError("{family_size} must be >= 1, got {value}", value=self.family_size)
        if self.routing is None:  # adaptive: cascade until its stopping rules favour the others (docs/adaptive.md)
            set_field("routing", "continue" if self.alpha_mode == "union" and not adaptive else "cascade")
        if not 0.0 < self.alpha < 1.0:  # checked here too: image_alpha below divides it
            raise ConfigError("{alpha} must be in (0, 1), got {value}", value=self.alpha)
        set_field("rule", CascadeRule(self.image_alpha, self.alpha_mode, self.p0, self.routing))

    @property
    def selection_samples(self) -> int:
        """Selection samples drawn per consulted (image, scale): n_select, or in an adaptive run the first
        min(n_select, adaptive_select) of them (the same noise as a fixed-n run's first ones). ĉ only needs
        to be the top class, which a few votes settle wherever a certificate is within reach; the
        estimation rounds pay for the rest (docs/adaptive.md)."""
        return min(self.n_select, self.adaptive_select) if self.strategy == "adaptive" else self.n_select

    @property
    def image_alpha(self) -> float:
        """The level each image's certificate runs at: alpha, or alpha / M when family-wise, so that by
        Bonferroni over the M images all certificates hold together with probability >= 1 - alpha."""
        if not self.family_wise:
            return self.alpha
        if self.family_size is None:
            return self.alpha  # not yet known: `for_images` sets it before anything is sampled
        return self.alpha / self.family_size

    def for_images(self, num_images: int) -> CertifyConfig:
        """The config of a run over `num_images` images (fixes the family-wise per-image level)."""
        return replace(self, family_size=num_images) if self.family_wise else self

    def replace(self, **changes: Any) -> CertifyConfig:
        """A copy with `changes`; a changed alpha_mode or strategy re-resolves the routing default
        unless a routing is given."""
        if ("alpha_mode" in changes or "strategy" in changes) and "routing" not in changes:
            changes["routing"] = None
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON types only). `alpha` is the per-image level the counts were routed
        with and `user_alpha` the level asked for, as run_config.json has always said."""
        stored = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        stored["sigmas"], stored["target_radii"] = list(self.sigmas), list(self.target_radii)
        stored["alpha"], stored["user_alpha"] = self.image_alpha, self.alpha
        return stored

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> CertifyConfig:
        """The inverse of `to_dict`; unknown keys (e.g. a run's `inputs`) are ignored."""
        known = {f.name for f in fields(cls) if f.init}
        values = {key: value for key, value in stored.items() if key in known}
        if "user_alpha" in stored:
            values["alpha"] = stored["user_alpha"]
        values["sigmas"] = tuple(values.get("sigmas", ()))
        values["target_radii"] = tuple(values.get("target_radii", ()))
        return cls(**values)


CONFIG_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(CertifyConfig) if f.default is not MISSING}
"""Each field's default, for the command-line flags that show it: defined once, in the class."""


def check_sigmas(sigmas: Any) -> tuple[float, ...]:
    """Positive, finite, distinct; returned from the highest (the cascade's order)."""
    values = (sigmas,) if isinstance(sigmas, (int, float)) else tuple(sigmas)
    if not values:
        raise ConfigError("{sigmas} is empty")
    try:
        values = tuple(float(s) for s in values)
    except (TypeError, ValueError):
        raise ConfigError("{sigmas} must be numbers, got {value!r}", value=sigmas) from None
    if any(not (s > 0 and math.isfinite(s)) for s in values):
        raise ConfigError("{sigmas} must all be positive and finite, got {value}", value=list(values))
    if len(set(values)) != len(values):
        raise ConfigError("{sigmas} has duplicates: {value}", value=list(values))
    return tuple(sorted(values, reverse=True))


def _target_radii(radii: Any) -> tuple[float, ...]:
    """Positive; sorted and deduplicated (each is a question asked once)."""
    values = tuple(float(r) for r in radii)
    if any(not (r > 0 and math.isfinite(r)) for r in values):
        raise ConfigError("{target_radii} values must be positive and distinct, got {value}", value=list(values))
    return tuple(sorted(set(values)))


LIBRARY_NAMES: dict[str, str] = {
    **{f.name: f.name for f in (*fields(CertifyConfig), *fields(CascadeRule))},
    **{strategy: f"strategy={strategy!r}" for strategy in STRATEGIES},
}
"""How error messages spell each field (and each strategy) in the library; the CLI has its flags."""
