"""Every job takes a URL (s3://, gs://, file://) wherever it takes a location, so no code may treat a
user's location as a local path: `pathlib.Path("s3://bucket/run")` is `s3:/bucket/run`, a relative local
path that silently does not exist (issue 23: `reduce.py s3://…/counts` failed with `counts not found:
s3:/…`). docs/storage.md lists the flags this covers.

Three rules, checked on the source (AST) of pipeline/ and jobs/:
1. pipeline/store and pipeline/data hold only fsspec code: they do not import pathlib or os.path at all.
2. No argparse flag is parsed with `type=Path`.
3. Elsewhere, Path(x) / PurePath(x) / os.path.f(x) is not applied to a location, i.e. to an expression
   named like one of the location flags (LOCATION_NAMES: `args.out`, `counts`, `out_dir`, ...), unless
   the same function looks at whether that expression is a URL (`"://" in x`), as a function that
   handles URLs separately or refuses them with a plain error does.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# The values of the location flags (--data, --denoiser, --classifier, --classifier-weights, --out,
# --storage-path, --export-to, reduce's COUNTS, convert's CHECKPOINT and OUT_DIR) and the names code gives them.
LOCATION_NAMES = frozenset({
    "data", "denoiser", "classifier", "classifier_weights", "weights_path", "out", "out_text", "out_dir",
    "storage_path", "export_to", "counts", "checkpoint", "location", "url", "vote_cache",
})
FSSPEC_ONLY_PACKAGES = ("pipeline/store", "pipeline/data")
PATH_CONSTRUCTORS = frozenset({"Path", "PurePath", "PosixPath", "PurePosixPath"})


def _name_of(node: ast.AST) -> str | None:
    """The name an expression goes by: `x` -> x, `args.out` -> out, `str(args.out)` -> out."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str" and node.args:
        return _name_of(node.args[0])
    return None


def _is_path_call(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in PATH_CONSTRUCTORS
    if isinstance(func, ast.Attribute):
        owner = func.value
        if isinstance(owner, ast.Name) and owner.id == "pathlib":
            return func.attr in PATH_CONSTRUCTORS
        return (isinstance(owner, ast.Attribute) and owner.attr == "path"
                and isinstance(owner.value, ast.Name) and owner.value.id == "os")  # os.path.f(...)
    return False


def _url_checked(scope: ast.AST, expression: ast.AST) -> bool:
    """Whether `scope` compares "://" with `expression` (`"://" in x` or `"://" not in x`)."""
    wanted = ast.dump(expression)
    for node in ast.walk(scope):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and node.left.value == "://"
                and isinstance(node.ops[0], ast.In | ast.NotIn) and ast.dump(node.comparators[0]) == wanted):
            return True
    return False


def _scopes(tree: ast.Module) -> Iterator[tuple[ast.AST, ast.Call]]:
    """(innermost function or the module, call) for every call in the module."""
    def visit(node: ast.AST, scope: ast.AST) -> Iterator[tuple[ast.AST, ast.Call]]:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) else scope
            if isinstance(child, ast.Call):
                yield inner, child
            yield from visit(child, inner)

    yield from visit(tree, tree)


def violations(source: str, where: str, fsspec_only: bool = False) -> list[str]:
    """`where:line: what` for every use of a local-path API on a location in `source`."""
    tree = ast.parse(source)
    found = []
    if fsspec_only:
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module == "pathlib" or module == "os.path":
                    found.append(f"{where}:{node.lineno}: imports {module} in an fsspec-only package")
    for scope, call in _scopes(tree):
        for keyword in call.keywords:
            if (isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument" and keyword.arg == "type"
                    and _name_of(keyword.value) in PATH_CONSTRUCTORS):
                flag = call.args[0].value if call.args and isinstance(call.args[0], ast.Constant) else "?"
                found.append(f"{where}:{call.lineno}: flag {flag} parsed with type=Path")
        if _is_path_call(call) and call.args:
            argument = call.args[0]
            if _name_of(argument) in LOCATION_NAMES and not _url_checked(scope, argument):
                found.append(f"{where}:{call.lineno}: {ast.unparse(call)}")
    return found


def sources() -> Iterator[tuple[str, str, bool]]:
    for folder in ("pipeline", "jobs"):
        for file in sorted((REPO_ROOT / folder).rglob("*.py")):
            where = file.relative_to(REPO_ROOT).as_posix()
            yield where, file.read_text(), where.startswith(FSSPEC_ONLY_PACKAGES)


def test_no_local_path_api_is_applied_to_a_location():
    found = [line for where, source, fsspec_only in sources() for line in violations(source, where, fsspec_only)]
    assert not found, "local-path APIs on locations that may be URLs:\n" + "\n".join(found)


def test_the_check_covers_the_files_it_should():
    names = {where for where, _, _ in sources()}
    assert {"jobs/reduce.py", "pipeline/store/counts.py", "pipeline/app/workload.py"} <= names


@pytest.mark.parametrize("source, flagged", [
    ("def main(args):\n    out = Path(args.out)\n", ["x.py:2: Path(args.out)"]),
    ("def f(counts):\n    return pathlib.Path(counts).resolve().parent\n", ["x.py:2: pathlib.Path(counts)"]),
    ("def f(out_dir):\n    return os.path.isdir(str(out_dir))\n", ["x.py:2: os.path.isdir(str(out_dir))"]),
    ("p.add_argument('out_dir', type=Path)\n", ["x.py:1: flag out_dir parsed with type=Path"]),
    # the URL is looked at first (refused, or handled by fsspec): allowed
    ("def f(location):\n    if '://' not in location and not Path(location).is_dir():\n        return 1\n", []),
    ("def f(out_text):\n    if '://' in out_text:\n        raise ValueError(out_text)\n"
     "    return Path(out_text)\n", []),
    # a check on another expression does not count
    ("def f(out, data):\n    if '://' in data:\n        return\n    return Path(out)\n", ["x.py:4: Path(out)"]),
    # not a location: allowed
    ("ROOT = Path(__file__).parent\ndef f(directory):\n    return Path(directory) / 'x'\n", []),
])
def test_the_check_flags_what_it_should(source, flagged):
    """Negative and positive controls for the checker itself."""
    assert violations(source, "x.py") == flagged


def test_fsspec_only_packages_may_not_import_pathlib():
    assert violations("from pathlib import Path\nimport os.path\n", "x.py", fsspec_only=True) == [
        "x.py:1: imports pathlib in an fsspec-only package", "x.py:2: imports os.path in an fsspec-only package"]
    assert violations("from pathlib import Path\n", "x.py") == []


def test_a_path_on_a_url_really_loses_the_url():
    """Why the rule exists: the failure is silent, not an exception."""
    assert str(Path("s3://bucket/run/counts")) == "s3:/bucket/run/counts"
