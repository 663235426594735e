"""mdds: certify image classifiers against L2 attacks with multi-scale diffusion denoised smoothing.

    import pipeline
    smooth = pipeline.MultiScaleSmooth(denoiser, classifier, num_classes=10, sigmas=(0.5, 0.25))
    results = smooth.certify(images, labels, n=1000, alpha=0.001)       # a pyarrow Table

The names below are imported on first use, so `import pipeline` loads neither Ray nor diffusers
(nor torch) until an object that needs them is touched. docs/python-api.md is the walk-through.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CertifyConfig": "pipeline.config",
    "CascadeRule": "pipeline.config",
    "ConfigError": "pipeline.config",
    "MultiScaleSmooth": "pipeline.api",
    "certify_dataset": "pipeline.api",
    "DatasetRun": "pipeline.api",
    "reduce": "pipeline.app.reduce",
    "compare": "pipeline.app.compare",
    "ModelSpec": "pipeline.models.spec",
    "ModelFactory": "pipeline.models.spec",
    "OneShotDenoiser": "pipeline.models.denoiser",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pipeline.api import DatasetRun, MultiScaleSmooth, certify_dataset
    from pipeline.app.compare import compare
    from pipeline.app.reduce import reduce
    from pipeline.config import CascadeRule, CertifyConfig, ConfigError
    from pipeline.models.denoiser import OneShotDenoiser
    from pipeline.models.spec import ModelFactory, ModelSpec


def __getattr__(name: str) -> Any:
    """PEP 562: import an exported name's module when the name is first used."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
