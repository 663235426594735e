"""The package's import rules (README "Layout"): which libraries each package may load, which other
pipeline packages each may import, and jobs that only parse their arguments and make one call."""

from __future__ import annotations

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"

FORBIDDEN = {
    "pipeline.stats": ("torch", "ray"),
    "pipeline.sampling": ("ray",),
    "pipeline.models": ("ray",),
    # pyarrow.dataset: its async scanner's threads can outlive a short job and abort it at exit
    # (apache/arrow#34314); the store reads whole files synchronously (store/atomic.read_parquet).
    "pipeline.store": ("torch", "ray", "pyarrow.dataset"),
}

FOUNDATION = {"config", "errors"}
BELOW_THE_DRIVERS = FOUNDATION | {"stats", "data", "models", "store", "sampling"}
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "stats": FOUNDATION,
    "data": FOUNDATION,
    "models": FOUNDATION | {"data"},  # the embedded digits set the digits models train on
    "store": FOUNDATION | {"stats"},
    "sampling": FOUNDATION | {"stats", "models"},
    "distributed": BELOW_THE_DRIVERS,
    "finetune": BELOW_THE_DRIVERS,
    "perf": BELOW_THE_DRIVERS | {"distributed", "finetune"},
    "app": BELOW_THE_DRIVERS | {"distributed", "finetune", "perf"},
    "api": BELOW_THE_DRIVERS | {"distributed", "finetune", "app"},
}
"""For each top-level package (or module) of pipeline, the other ones it may import, eagerly or inside a
function: README "Layout" states the same table."""

JOBS = sorted((REPO / "jobs").glob("*.py"))
JOB_IMPORTS = {"__future__", "argparse", "sys", "pathlib", "pipeline"}
MAX_JOB_LINES = 40
CONTROL_FLOW = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With, ast.AsyncWith, ast.Match, ast.IfExp,
                ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


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


def pipeline_imports(source: str) -> set[str]:
    """The top-level pipeline packages `source` imports anywhere (module level or inside functions);
    "pipeline" for the package root itself."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = ([f"{node.module}.{alias.name}" for alias in node.names] if node.module == "pipeline"
                       else [node.module])
        else:
            continue
        found |= {name.split(".")[1] if "." in name else name for name in modules
                  if name == "pipeline" or name.startswith("pipeline.")}
    return found


def top_level_parts() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(pipeline.__path__))


def test_every_package_has_a_stated_import_rule():
    assert set(top_level_parts()) == set(MAY_IMPORT), "add the package to MAY_IMPORT and README Layout"


@pytest.mark.parametrize("part", top_level_parts())
def test_package_imports_only_the_packages_its_rule_allows(part):
    files = sorted((PIPELINE / part).rglob("*.py")) if (PIPELINE / part).is_dir() else [PIPELINE / f"{part}.py"]
    assert files
    allowed = MAY_IMPORT[part] | {part}
    for path in files:
        wrong = pipeline_imports(path.read_text()) - allowed
        assert not wrong, f"{path.relative_to(REPO)} imports pipeline.{', pipeline.'.join(sorted(wrong))}"


def test_the_import_check_sees_a_lazy_import_upwards():
    """Negative control: an import inside a function, and `from pipeline import x`, are both seen."""
    source = "def f():\n    from pipeline.app.cli import run_main\n    from pipeline import perf\n"
    assert pipeline_imports(source) == {"app", "perf"}


def code_lines(path: Path) -> int:
    """Lines that are neither blank nor comments (`grep -cvE '^\\s*(#|$)'`): docstrings count."""
    return sum(1 for line in path.read_text().splitlines() if not re.match(r"^\s*(#|$)", line))


def is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ('__name__ == "__main__"', "__name__ == '__main__'")


def returns_a_parser(module: str, name: str) -> bool:
    """Whether pipeline function `module.name` is annotated to return an ArgumentParser (a parser builder)."""
    path = PIPELINE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == name and node.returns is not None:
            return "ArgumentParser" in ast.unparse(node.returns)
    return False


def pipeline_calls(main: ast.FunctionDef, imported: dict[str, str]) -> list[str]:
    """The outermost calls main() makes into pipeline, parser builders left out: in
    `run(request_from(parser.parse_args()))` that is `run` alone."""
    calls = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
            if not returns_a_parser(imported[node.func.id], node.func.id):
                calls.append(node.func.id)
                return
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in main.body:
        visit(statement)
    return calls


def job_problems(source: str) -> list[str]:
    """Why a job's source is more than argument parsing plus one call into pipeline (empty if it is not)."""
    tree = ast.parse(source)
    problems, imported, mains = [], {}, []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"imports {name}" for name in names if name.split(".")[0] not in JOB_IMPORTS]
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                imported.update({alias.asname or alias.name: node.module for alias in node.names})
        elif isinstance(node, ast.FunctionDef) and node.name == "main":
            mains.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            problems.append(f"defines {node.name} (only main() belongs in a job)")
        elif is_main_guard(node):
            if len(node.body) != 1 or node.orelse:
                problems.append("the __main__ guard does more than call main()")
            continue
        for inner in ast.walk(node):
            if isinstance(inner, CONTROL_FLOW):
                problems.append(f"line {inner.lineno}: {type(inner).__name__} (logic belongs in pipeline/)")
    if len(mains) != 1:
        return problems + ["no main()"]
    calls = pipeline_calls(mains[0], imported)
    if len(calls) != 1:
        problems.append(f"main() makes {len(calls)} calls into pipeline besides parser building: {calls}")
    return problems


@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_job_is_short(job):
    assert code_lines(job) <= MAX_JOB_LINES, f"{job.name}: {code_lines(job)} lines; move the logic to pipeline/"


@pytest.mark.parametrize("job", JOBS, ids=[job.name for job in JOBS])
def test_job_only_parses_and_makes_one_call_into_pipeline(job):
    assert job_problems(job.read_text()) == []


def test_the_job_check_sees_logic_and_a_second_call():
    """Negative controls: a loop, a helper, a foreign import and two calls are each reported; a job that
    builds its parser in pipeline and makes one call is not."""
    good = ('"""Doc."""\nfrom pipeline.app.benchmark import benchmark, build_parser\n'
            'from pipeline.app.cli import run_main\n\n\ndef main() -> None:\n'
            '    print(benchmark(build_parser().parse_args()))\n\n\nif __name__ == "__main__":\n    run_main(main)\n')
    assert job_problems(good) == []
    looped = good.replace("    print(", "    for _ in range(2):\n        print(")
    assert any("For" in problem for problem in job_problems(looped))
    twice = good.replace("    print(benchmark(build_parser().parse_args()))",
                         "    args = build_parser().parse_args()\n    benchmark(args)\n    print(benchmark(args))")
    assert any("2 calls" in problem for problem in job_problems(twice))
    helper = good + "\n\ndef helper():\n    return 1\n"
    assert any("defines helper" in problem for problem in job_problems(helper))
    assert any("imports json" in problem for problem in job_problems("import json\n" + good))


def test_code_lines_counts_docstrings_but_not_comments_or_blank_lines(tmp_path):
    job = tmp_path / "job.py"
    job.write_text('"""Doc\n\nmore."""\n\n# comment\n    # indented comment\nimport sys  # trailing\n\t\n')
    assert code_lines(job) == 3
