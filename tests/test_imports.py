"""The package's import rules (``../shared/DESIGN.md``, README "How it is built"): a module imports only from its
own floor or the floors below, no two modules import each other (a function-local import counts too), and every
module imports alone, in any order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from runs import REPO

PACKAGE = REPO / "lightning_det"
#: The floors, ground first: a module may import from its own floor and the floors below it.
FLOORS = [{"io"}, {"data", "optim"}, {"models"}, {"metrics", "checks"}, {"report"}, {"callbacks"}, {"tools", "search"}, {"api"}]
FLOOR = {folder: level for level, folders in enumerate(FLOORS) for folder in folders}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-local imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in MODULES:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
                break
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def floor(name: str) -> int | None:
    """The floor of a module's top folder (``lightning_det.models.ssd.loss`` -> models); None for the root."""
    parts = name.split(".")
    return FLOOR[parts[1]] if len(parts) > 1 else None


def test_every_top_folder_has_a_floor():
    assert {name.split(".")[1] for name in MODULES if "." in name} == set(FLOOR)


def test_imports_go_down_the_floors():
    upward = [f"{name} -> {target}" for name, targets in GRAPH.items() for target in targets
              if floor(name) is not None and floor(target) is not None and floor(target) > floor(name)]
    assert upward == []


def test_no_module_imports_itself_through_others():
    """Tarjan's strongly connected components of the import graph: every one a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in GRAPH[name]:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while not component or component[-1] != name:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert circles == []


def test_the_graph_holds_the_imports_the_code_has():
    """The graph itself is read right: the known downward edges are in it."""
    assert "lightning_det.io" in GRAPH["lightning_det.models.weights"]
    assert "lightning_det.models" in GRAPH["lightning_det.checks.config"]
    assert floor("lightning_det.callbacks.ema") > floor("lightning_det.models.detector")


def test_every_module_imports_alone():
    """Each module imported first, in an interpreter where no other module of the package is loaded yet (third-party
    libraries stay loaded, so the run takes seconds): an import that works only after another one fails here."""
    code = f"""
import importlib, sys, traceback
failed = []
for name in {sorted(MODULES)!r}:
    for loaded in [m for m in sys.modules if m == "lightning_det" or m.startswith("lightning_det.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().splitlines()[-1])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
