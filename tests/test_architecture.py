"""The package's rooms and layers, enforced (docs/design.md gives the reasons).

    1 avar_ops.core    2 avar_ops.hf    3 avar_ops.method    4 avar_ops.data, avar_ops.grading
    5 avar_ops.analysis, avar_ops.eval    6 avar_ops.cli    7 training/ (avar_train), benchmarks/

- A module imports from its own room freely. From another room it imports only a room of a lower layer (rooms
  of one layer do not import each other), and only that room's public names (`from avar_ops.hf import
  token_groups`, `from avar_ops import attention` for the core) or the public modules listed below.
- No import cycle among the modules of avar_ops and avar_train.
- No module imports a private (underscore) name of another module.
- Inside avar_train, modules import each other relatively.

Every import counts, including those inside functions. The compiled extension is the core's own.
"""

from __future__ import annotations

import ast
import importlib
import os
from typing import Dict, List, Optional, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {
    "avar_ops.core": 1,
    "avar_ops.hf": 2,
    "avar_ops.method": 3,
    "avar_ops.data": 4,
    "avar_ops.grading": 4,
    "avar_ops.analysis": 5,
    "avar_ops.eval": 5,
    "avar_ops.cli": 6,
}
TOP = 7  # training/ and benchmarks/
PUBLIC_MODULES = {"avar_ops.core.testing"}  # tolerances and yardsticks, for tests and benchmarks
PRIVATE_TO_CORE = {"avar_ops._C"}
FOLDERS = {"avar_ops": "avar_ops", "training": "avar_train"}  # source folder -> the package it installs as


def _room_of(name: str) -> Optional[str]:
    for pkg in LAYERS:
        if name == pkg or name.startswith(pkg + "."):
            return pkg
    return None


def _modules(root: str = ROOT) -> Dict[str, str]:
    """Dotted module name -> path, for every .py file of avar_ops and training (as avar_train)."""
    out = {}
    for folder, package in FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, os.path.join(root, folder))
                    name = ".".join([package] + rel[:-3].split(os.sep)).removesuffix(".__init__")
                    out[name] = path
    return out


def _sources():
    """(path relative to ROOT, module name or None, layer) for every checked source file."""
    for name, path in _modules().items():
        rel = os.path.relpath(path, ROOT)
        if name.startswith("avar_train"):
            yield rel, name, TOP
        else:
            room = _room_of(name)
            yield rel, name, LAYERS[room] if room else 0
    for dirpath, _, files in os.walk(os.path.join(ROOT, "benchmarks")):
        for f in files:
            if f.endswith(".py"):
                yield os.path.relpath(os.path.join(dirpath, f), ROOT), None, TOP


def _imports(path: str, module: Optional[str]):
    """(lineno, target module, imported name or None, relative?) for every import statement in the file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    package = module if is_package else (module.rpartition(".")[0] if module else None)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, None, False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports resolve inside this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                yield node.lineno, base, a.name, bool(node.level)


def _public_names(package: str) -> set:
    return set(getattr(importlib.import_module(package), "__all__", ()))


def _layer_violations(rel: str, module: Optional[str], level: int) -> List[str]:
    # the top-level package is the core's face: it re-exports the core's public names
    own_room = "avar_ops.core" if module == "avar_ops" else (_room_of(module) if module else None)
    bad = []
    for lineno, target, name, relative in _imports(os.path.join(ROOT, rel), module):
        where = f"{rel}:{lineno}"
        if module and module.startswith("avar_train") and target.startswith("avar_train") and not relative:
            bad.append(f"{where}: inside avar_train, import {target} relatively")
        if not target.startswith("avar_ops"):
            continue
        full = f"{target}.{name}" if name else target
        if full in PRIVATE_TO_CORE or target in PRIVATE_TO_CORE:
            if level != 1:
                bad.append(f"{where}: only the core loads the compiled extension ({full})")
            continue
        if target == "avar_ops":  # the top-level package re-exports the core's public names
            if name is not None and name not in _public_names("avar_ops"):
                bad.append(f"{where}: avar_ops.{name} is not a public name of avar_ops")
            continue
        room = _room_of(target)
        if room is None:
            bad.append(f"{where}: {target} belongs to no room")
            continue
        if room == own_room:
            continue
        if LAYERS[room] > level:
            bad.append(f"{where}: layer {level} imports {full} from {room}, layer {LAYERS[room]} above it")
        elif LAYERS[room] == level:
            bad.append(f"{where}: {own_room} imports {full} from {room}, a room of its own layer {level}")
        elif target in PUBLIC_MODULES or full in PUBLIC_MODULES:
            continue
        elif target != room:
            bad.append(f"{where}: imports {full} from inside {room}; use {room}'s public names")
        elif name is not None and name not in _public_names(room) and f"{room}.{name}" not in PUBLIC_MODULES:
            bad.append(f"{where}: {name} is not a public name of {room}")
    return bad


def import_graph(root: str = ROOT) -> Dict[str, Set[str]]:
    """Module -> the first-party modules it imports (at the top or inside functions).

    `from pkg import name` points at the module pkg.name when there is one, else at pkg; `import a.b` at a.b.
    The parent packages Python runs first are not edges: they are what makes a room one unit, not a use.
    """
    modules = _modules(root)
    graph = {}
    for module, path in modules.items():
        edges = set()
        for _, target, name, _ in _imports(path, module):
            if name is not None and f"{target}.{name}" in modules:
                target = f"{target}.{name}"
            if target in modules and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state = {}  # module -> 1 on the current path, 2 finished
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def private_imports(root: str = ROOT) -> List[str]:
    """`from module import _name` of one first-party module from another (dunder names are not private)."""
    bad = []
    for module, path in _modules(root).items():
        for lineno, target, name, _ in _imports(path, module):
            first_party = target.split(".")[0] in FOLDERS.values()
            if not first_party or target in PRIVATE_TO_CORE:
                continue
            private = [p for p in target.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if name is not None and name.startswith("_") and not name.startswith("__"):
                if f"{target}.{name}" in PRIVATE_TO_CORE:
                    continue
                private.append(name)
            if private:
                bad.append(f"{os.path.relpath(path, root)}:{lineno}: imports {private[0]!r} from {target}")
    return bad


def test_every_module_belongs_to_a_room():
    stray = [
        rel
        for rel, module, level in _sources()
        if module and module.startswith("avar_ops.") and level == 0 and module not in PRIVATE_TO_CORE
    ]
    assert not stray, f"modules outside every room: {stray}"


def test_rooms_import_only_public_names_from_below():
    bad = [v for rel, module, level in _sources() for v in _layer_violations(rel, module, level or 1)]
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    bad = private_imports()
    assert not bad, "private names imported:\n" + "\n".join(bad)


def _plant(tmp_path, files: Dict[str, str]) -> str:
    """A copy of the two source folders with `files` (path -> text) added or replaced."""
    import shutil

    for folder in FOLDERS:
        shutil.copytree(
            os.path.join(ROOT, folder), tmp_path / folder, ignore=shutil.ignore_patterns("*.so", "__pycache__")
        )
    for rel, text in files.items():
        with open(tmp_path / rel, "a", encoding="utf-8") as f:
            f.write(text)
    return str(tmp_path)


def test_a_planted_cycle_is_found(tmp_path):
    """eval's runner importing the CLI, which imports eval: the check names the cycle."""
    root = _plant(tmp_path, {"avar_ops/eval/runner.py": "\n\ndef _late():\n    from avar_ops.cli import eval\n"})
    assert find_cycle(import_graph(ROOT)) is None
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert "avar_ops.eval.runner" in cycle and any(m.startswith("avar_ops.cli") for m in cycle), cycle


def test_a_planted_private_import_is_found(tmp_path):
    """GRPO's loss taking the command line's private helper: the check names the file, line, name and module."""
    root = _plant(tmp_path, {"training/grpo/loss.py": "\n\ndef _late():\n    from ..cli import _fail\n"})
    assert private_imports(ROOT) == []
    bad = private_imports(root)
    assert len(bad) == 1 and bad[0].startswith("training/grpo/loss.py:"), bad
    assert bad[0].endswith(": imports '_fail' from avar_train.cli"), bad


@pytest.mark.parametrize("package", list(LAYERS))
def test_public_names_exist(package):
    mod = importlib.import_module(package)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{package}.__all__ names missing attributes: {missing}"


def test_importing_the_pure_layers_needs_no_extension(tmp_path):
    """core, hf and method import (and the pure parts run) without the compiled extension being loaded."""
    import subprocess
    import sys

    code = (
        "import sys, avar_ops, avar_ops.hf, avar_ops.method\n"
        "from avar_ops.method import Intervention\n"
        "Intervention(alpha_img=0.1).tables(2, 2)\n"
        "print('avar_ops._C' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
