"""The package's import rules (README "Layout"): statistics without torch or Ray, sampling without Ray,
and no import cycles between the layers."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import pipeline

FORBIDDEN = {
    "pipeline.stats": ("torch", "ray"),
    "pipeline.sampling": ("ray",),
    # pyarrow.dataset: its async scanner's threads can outlive a short job and abort it at exit
    # (apache/arrow#34314); the store reads whole files synchronously (store/atomic.read_parquet).
    "pipeline.store": ("torch", "ray", "pyarrow.dataset"),
}


def modules_of(package: str) -> list[str]:
    module = __import__(package, fromlist=["_"])
    return [f"{package}.{info.name}" for info in pkgutil.iter_modules(module.__path__)]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden_libraries(package):
    names = modules_of(package)
    assert names, f"{package} has no modules"
    probe = (f"import sys; import {', '.join(names)}; "
             f"print(','.join(m for m in {FORBIDDEN[package]!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing {package} loads {loaded}"


def test_the_probe_sees_an_import_when_there_is_one():
    """Negative control: the same probe reports torch for a package that does use it."""
    probe = "import sys; import pipeline.sampling.kernel; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "True"


def test_every_package_has_a_docstring_stating_its_job():
    for info in pkgutil.iter_modules(pipeline.__path__):
        if info.ispkg:
            module = __import__(f"pipeline.{info.name}", fromlist=["_"])
            assert (module.__doc__ or "").strip(), f"pipeline/{info.name}/__init__.py has no docstring"
