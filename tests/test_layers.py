"""The imports run one way (flows -> tasks -> core, no cycles), and every DVC stage depends on all
the code it runs: the import closure of its module, read from the source with ``ast``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("transpeft", "tasks", "flows")


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The project modules ``path`` imports anywhere (top level or inside a function)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [node.module or ""])
            else:
                base = node.module or ""
            base = base.strip(".")
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    named = {n for n in found if n.split(".")[0] in PACKAGES and module_file(n)}
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    return named | {".".join(n.split(".")[:i]) for n in named for i in range(1, n.count(".") + 1)}


def closure(module: str) -> set[Path]:
    seen, todo = set(), [module]
    while todo:
        path = module_file(todo.pop())
        if path is not None and path not in seen:
            seen.add(path)
            todo += imports(path)
    return seen


def project_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_import_cycles():
    cycles = [f"{module_name(path)} <-> {name}" for path in project_files() for name in imports(path)
              if name != module_name(path) and path in closure(name)]
    assert cycles == []


@pytest.mark.parametrize("layer, may_not_import", [
    ("transpeft", ("tasks", "flows")),  # the core knows nothing of orchestration
    ("tasks", ("flows", "transpeft.stages", "transpeft.cli", "transpeft.demo")),
])
def test_imports_run_flows_tasks_core(layer, may_not_import):
    upward = [f"{p.relative_to(ROOT)} imports {n}" for p in (ROOT / layer).rglob("*.py") for n in imports(p)
              if n.startswith(may_not_import)]
    assert upward == []


def test_the_core_does_not_import_prefect():
    """Only the local stack's driver talks to Prefect's client; the library itself runs without it."""
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "transpeft").rglob("*.py") if p.name != "stack.py"
                 and re.search(r"^\s*(from|import) prefect", p.read_text(encoding="utf-8"), re.M)]
    assert offenders == []


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_every_stage_depends_on_all_the_code_it_runs(stage):
    spec = stages()[stage]
    spec = spec.get("do", spec)
    module = re.search(r"python -m (\S+)", spec["cmd"]).group(1)
    deps = [d for d in spec["deps"] if "$" not in d]
    covered = lambda path: any(path == ROOT / d or (ROOT / d) in path.parents for d in deps)  # noqa: E731
    missing = sorted(str(p.relative_to(ROOT)) for p in closure(module) if not covered(p))
    assert missing == [], f"dvc.yaml stage {stage} runs {missing} but does not depend on them"
