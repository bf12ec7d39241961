"""dvc.yaml lists, for each stage, exactly the project code the stage runs: its module under
src/deeprubin/stages/ and every deeprubin module that module imports, transitively (found by walking the AST, so
imports inside functions count too), as files, or as a package directory when the stage imports all of it. A
module added to a stage's imports without a dep in dvc.yaml, a stale path, or a dep the stage does not run fails.

Importing ``deeprubin.a.b`` also runs ``deeprubin/__init__.py`` and ``deeprubin/a/__init__.py``; those count
unless they execute nothing (empty, or only a docstring)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "deeprubin"
CODE_ROOT = f"src/{PACKAGE}"  # deps under this path are code deps
CLI = (f"{CODE_ROOT}/cli.py", f"{CODE_ROOT}/cli")  # the way DVC calls a stage, never a dep


def module_file(src: Path, name: str) -> Path | None:
    """The file of module ``name`` (dotted) under ``src``, or None when it is not a module (e.g. a class)."""
    path = src.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports anywhere in its AST (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..a import b
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def executes_nothing(path: Path) -> bool:
    """An ``__init__.py`` that is empty or only a docstring: importing its package runs no code."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)
               for s in body)


def closure(src: Path, module: str) -> set[Path]:
    """The files of ``module`` and of every deeprubin module it imports, transitively, with the packages above each
    (Python runs their ``__init__.py``)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the module and the packages above it
            prefix = ".".join(parts[:i])
            path = module_file(src, prefix)
            if path is None or prefix in seen:
                continue
            seen[prefix] = path
            todo.extend(n for n in imported_names(path, prefix) if n not in seen)
    return {p for p in seen.values() if not executes_nothing(p)}


def problems(dvc: dict, root: Path) -> dict[str, list[str]]:
    """What is wrong with each stage's code deps in the parsed dvc.yaml ``dvc``, for the project at ``root``."""
    src = root / "src"
    out: dict[str, list[str]] = {}
    for stage, spec in dvc["stages"].items():
        found: list[str] = []
        module = root / CODE_ROOT / "stages" / f"{stage}.py"
        if not module.is_file():
            out[stage] = [f"no stage module {module.relative_to(root)}"]
            continue
        needed = {p.relative_to(root).as_posix() for p in closure(src, f"{PACKAGE}.stages.{stage}")}
        deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
        code = [d.rstrip("/") for d in deps if d == CODE_ROOT or d.startswith(CODE_ROOT + "/")]
        covered: set[str] = set()
        for dep in code:
            path = root / dep
            if dep in CLI:
                found.append(f"{dep}: the CLI is never a dep")
            elif path.is_dir():
                files = {p.relative_to(root).as_posix() for p in path.rglob("*.py")
                         if "__pycache__" not in p.parts and not executes_nothing(p)}
                if not files:
                    found.append(f"{dep}: no Python module under it")
                unused = sorted(files - needed)
                if unused:
                    found.append(f"{dep}: the stage does not import {unused}; list the files it does instead")
                covered |= files
            elif path.is_file():
                if dep not in needed:
                    found.append(f"{dep}: the stage does not import it")
                covered.add(dep)
            else:
                found.append(f"{dep}: stale, no such file or directory")
        if f"{CODE_ROOT}/stages/{stage}.py" not in code:
            found.append(f"{CODE_ROOT}/stages/{stage}.py: the stage's own module is not a dep")
        found += [f"{m}: imported by the stage but not covered by a dep" for m in sorted(needed - covered)]
        if found:
            out[stage] = found
    return out


@pytest.fixture(scope="module")
def dvc_text() -> str:
    return (REPO / "dvc.yaml").read_text()


def test_every_stage_lists_exactly_the_code_it_imports(dvc_text: str):
    dvc = yaml.safe_load(dvc_text)
    assert set(dvc["stages"]) == {"ingest", "preprocess", "train", "baseline", "evaluate"}
    assert problems(dvc, REPO) == {}


def test_the_closure_follows_every_kind_of_import(tmp_path: Path):
    pkg = tmp_path / PACKAGE
    files = {
        "__init__.py": "__version__ = '1'\n",
        "stages/__init__.py": '"""A docstring only: runs nothing."""\n',
        "stages/s.py": "import os\nfrom deeprubin import __version__\nfrom deeprubin.a import b\n"
                       "from deeprubin.c import NAME\n\ndef later():\n    from ..d import e\n",
        "a/__init__.py": "", "a/b.py": "import deeprubin.f.g as g\n", "a/unused.py": "",
        "c.py": "NAME = 1\n",
        "d/__init__.py": "from deeprubin.d.h import X\n", "d/e.py": "", "d/h.py": "X = 1\n",
        "f/__init__.py": "", "f/g.py": "def later():\n    import deeprubin.i\n", "i.py": "",
        "cli.py": "from deeprubin.stages import s\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    found = {p.relative_to(pkg).as_posix() for p in closure(tmp_path, f"{PACKAGE}.stages.s")}
    assert found == {"__init__.py", "stages/s.py", "a/b.py", "c.py", "d/__init__.py", "d/e.py", "d/h.py", "f/g.py",
                     "i.py"}


def test_a_missing_dep_is_reported(dvc_text: str):
    dvc = yaml.safe_load(dvc_text)
    stage, spec = next(iter(dvc["stages"].items()))
    dropped = next(d for d in spec["deps"] if isinstance(d, str) and d.endswith(".py")
                   and d != f"{CODE_ROOT}/stages/{stage}.py")
    broken = yaml.safe_load(dvc_text.replace(f"      - {dropped}\n", "", 1))
    assert problems(broken, REPO)[stage] == [f"{dropped}: imported by the stage but not covered by a dep"]


def unused_modules(stage: str, root: Path = REPO) -> list[str]:
    """Modules under src/deeprubin (not the CLI) the stage does not import."""
    needed = closure(root / "src", f"{PACKAGE}.stages.{stage}")
    return sorted(p.relative_to(root).as_posix() for p in (root / CODE_ROOT).rglob("*.py")
                  if p not in needed and not executes_nothing(p) and "__pycache__" not in p.parts
                  and not p.relative_to(root).as_posix().startswith(CLI))


def test_a_stale_unused_or_cli_dep_is_reported(dvc_text: str):
    dvc = yaml.safe_load(dvc_text)
    unused = unused_modules("preprocess")[0]
    dvc["stages"]["preprocess"]["deps"] += [f"{CODE_ROOT}/no_such_module.py", unused, f"{CODE_ROOT}/cli"]
    assert problems(dvc, REPO)["preprocess"] == [f"{CODE_ROOT}/no_such_module.py: stale, no such file or directory",
                                                 f"{unused}: the stage does not import it",
                                                 f"{CODE_ROOT}/cli: the CLI is never a dep"]
    dvc = yaml.safe_load(dvc_text)
    dvc["stages"]["preprocess"]["deps"].append(CODE_ROOT)  # the whole package: more than the stage runs
    [found] = problems(dvc, REPO)["preprocess"]
    assert found.startswith(f"{CODE_ROOT}: the stage does not import") and unused in found


def test_a_new_import_inside_a_stage_function_needs_a_dep(dvc_text: str, tmp_path: Path):
    """Someone adds an import to a stage module (inside a function, relative) and forgets dvc.yaml: it fails."""
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    module = next(m for m in unused_modules("ingest", tmp_path) if m.count("/") == 2)  # src/deeprubin/<module>.py
    ingest = tmp_path / CODE_ROOT / "stages" / "ingest.py"
    ingest.write_text(ingest.read_text() + f"\n\ndef _later():\n    from .. import {Path(module).stem}  # noqa\n")
    found = problems(yaml.safe_load(dvc_text), tmp_path)["ingest"]  # the module and whatever it imports
    assert f"{module}: imported by the stage but not covered by a dep" in found
    assert all(f.endswith(": imported by the stage but not covered by a dep") for f in found)
