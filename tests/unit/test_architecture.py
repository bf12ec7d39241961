"""The project's architecture, checked on every `make test`.

* the import-linter contracts of pyproject.toml ([tool.importlinter]: the layers, stages independent of each other,
  serving free of the stages and the CLI) all hold, and every top-level module of deeprubin sits in a layer;
* every package folder under src/deeprubin and flows/ is listed in [tool.setuptools] packages, so that none is
  silently left out of a wheel;
* no import cycle among the project's own modules (imports inside functions count too).
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Where each distributed top-level package lives (as [tool.setuptools] package-dir says).
PACKAGE_DIRS = {"deeprubin": Path("src/deeprubin"), "deeprubin_flows": Path("flows")}
SKIP_DIRS = {"__pycache__"}


def _pyproject(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))


def _folders(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, folder) of every folder of the project's packages, the package roots included."""
    for name, rel in PACKAGE_DIRS.items():
        base = root / rel
        for folder in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
            parts = folder.relative_to(base).parts
            if any(part in SKIP_DIRS or part.startswith(".") for part in parts):
                continue
            yield ".".join([name, *parts]), folder


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages (flows/x.py is deeprubin_flows.x)."""
    found = {}
    for package, folder in _folders(root):
        for f in sorted(folder.glob("*.py")):
            found[package if f.stem == "__init__" else f"{package}.{f.stem}"] = f
    return found


# --- the import-linter contracts ---------------------------------------------------------------------------------

def lint_imports(root: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the venv's lint-imports on root's pyproject.toml (no cache left in the work tree)."""
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.exists(), f"{exe} missing: install the test extra (pip install -c constraints.txt -e '.[test]')"
    return subprocess.run([str(exe), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          check=False, capture_output=True, text=True, timeout=300, env=env)


def test_import_contracts_hold():
    result = lint_imports()
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"import-linter contracts broken (lint-imports exit {result.returncode}):\n{report}"
    assert "0 broken" in report, report


def unlayered_modules(root: Path = ROOT) -> list[str]:
    """Top-level modules and packages of deeprubin that no layer of the layers contract names."""
    contracts = _pyproject(root)["tool"]["importlinter"]["contracts"]
    layered = set()
    for contract in contracts:
        if contract["type"] == "layers":
            for layer in contract["layers"]:
                layered.update(m.strip().strip("()") for m in layer.replace(":", "|").split("|"))
    tops = {name for name in _modules(root) if name.count(".") == 1 and name.startswith("deeprubin.")}
    return sorted(tops - layered)


def test_every_top_level_module_is_in_a_layer():
    missing = unlayered_modules()
    assert not missing, (f"{missing} are in no layer of the layers contract in pyproject.toml [tool.importlinter]: "
                         "add each to the layer it belongs in, or its imports go unchecked")


# --- packaging: every package folder ships ------------------------------------------------------------------------

def packaging_problems(root: Path = ROOT) -> list[str]:
    listed = set(_pyproject(root)["tool"]["setuptools"]["packages"])
    problems = []
    found = set()
    for name, folder in _folders(root):
        if (folder / "__init__.py").exists():
            found.add(name)
        elif any(folder.glob("*.py")):
            problems.append(f"{folder.relative_to(root)} holds .py files but no __init__.py (not a package: "
                            "it would be left out of the wheel)")
    problems += [f"package {name} is not listed in [tool.setuptools] packages of pyproject.toml"
                 for name in sorted(found - listed)]
    problems += [f"[tool.setuptools] packages lists {name}, which is no package folder"
                 for name in sorted(listed - found)]
    return problems


def test_every_package_is_listed_for_the_wheel():
    problems = packaging_problems()
    assert not problems, "\n".join(problems)


# --- no import cycles ---------------------------------------------------------------------------------------------

def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}, counting imports anywhere in a file.

    An import names the deepest project module it reaches: `from deeprubin.serving import classify` is an edge to
    deeprubin.serving.classify when that is a module, to the package deeprubin.serving otherwise.
    """
    known = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    up = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start, edges in graph.items():
        if start in index:
            continue
        work = [(start, iter(edges))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, {}))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def describe_cycles(root: Path = ROOT) -> list[str]:
    graph = import_graph(root)
    modules = _modules(root)
    out = []
    for component in strongly_connected(graph):
        members = set(component)
        lines = [f"cycle of {len(component)} modules: {', '.join(component)}"]
        lines += [f"    {a} -> {b}  ({modules[a].relative_to(root)}:{line})"
                  for a in component for b, line in sorted(graph[a].items()) if b in members]
        out.append("\n".join(lines))
    return out


def test_no_import_cycles():
    cycles = describe_cycles()
    assert not cycles, "import cycles among the project's modules:\n" + "\n".join(cycles)


def test_import_graph_sees_the_project():
    """Guards the cycle check against silently reading nothing (a moved folder, a wrong package map)."""
    graph = import_graph()
    assert "deeprubin.schema" in graph and "deeprubin_flows.nightly" in graph, sorted(graph)
    assert "deeprubin.schema" in graph["deeprubin.config"]
    assert sum(len(edges) for edges in graph.values()) > 50
