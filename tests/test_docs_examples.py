"""docs/python-api.md runs as written: its Python blocks, top to bottom, in one namespace."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "docs" / page).read_text(), flags=re.S)


def test_python_api_page_runs(digits_cache, ray_session, tmp_path, monkeypatch, capsys):
    blocks = python_blocks("python-api.md")
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}  # as in a notebook: cloudpickle ships what it defines by value
    for block in blocks:
        exec(compile(block, "docs/python-api.md", "exec"), namespace)
    assert namespace["run"].results.num_rows == 8
    assert namespace["best"]["radius"].to_numpy().sum() >= namespace["cascade"]["radius"].to_numpy().sum()
    assert "| continue |" in capsys.readouterr().out
