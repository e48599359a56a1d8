"""The package's layers, enforced: each layer imports only the public names of the layers below it.

    1 avar_ops.core      2 avar_ops.hf      3 avar_ops.method      4 avar_ops.analysis      5 training/, benchmarks/

Within a layer, modules import each other freely. From a lower layer, a module may import the layer package's
public names (`from avar_ops.hf import token_groups`, or `from avar_ops import attention` for the core) and the
public modules listed below; never a submodule's private name, never a layer above. Every import counts,
including those inside functions. The compiled extension is the core's own.
"""

from __future__ import annotations

import ast
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"avar_ops.core": 1, "avar_ops.hf": 2, "avar_ops.method": 3, "avar_ops.analysis": 4}
TOP = 5  # training/ and benchmarks/
PUBLIC_MODULES = {"avar_ops.core.testing"}  # tolerances and yardsticks, for tests and benchmarks
PRIVATE_TO_CORE = {"avar_ops._C"}


def _layer_of_module(name: str) -> int | None:
    for pkg, level in LAYERS.items():
        if name == pkg or name.startswith(pkg + "."):
            return level
    return None


def _sources():
    for folder, level in (("avar_ops", None), ("training", TOP), ("benchmarks", TOP)):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    rel = os.path.relpath(path, ROOT)
                    if level is None:
                        module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                        yield rel, module, _layer_of_module(module) or 0
                    else:
                        yield rel, None, level


def _public_names(package: str) -> set:
    return set(getattr(importlib.import_module(package), "__all__", ()))


def _violations(rel: str, module: str | None, level: int) -> list:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        tree = ast.parse(f.read(), rel)
    package = module if rel.endswith("__init__.py") else (module.rpartition(".")[0] if module else None)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative imports resolve inside this module's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [(base, a.name) for a in node.names]
        else:
            continue
        for target, name in targets:
            if not target.startswith("avar_ops"):
                continue
            where = f"{rel}:{node.lineno}"
            full = f"{target}.{name}" if name else target
            if full in PRIVATE_TO_CORE or target in PRIVATE_TO_CORE:
                if level != 1:
                    bad.append(f"{where}: only the core loads the compiled extension ({full})")
                continue
            if target == "avar_ops":  # the top-level package re-exports the core's public names
                if name is not None and name not in _public_names("avar_ops"):
                    bad.append(f"{where}: avar_ops.{name} is not a public name of avar_ops")
                continue
            target_level = _layer_of_module(target)
            if target_level is None:
                bad.append(f"{where}: {target} belongs to no layer")
                continue
            if target_level > level:
                bad.append(f"{where}: layer {level} imports {full} from layer {target_level} above it")
            elif target_level < level:
                layer_pkg = next(p for p, lv in LAYERS.items() if lv == target_level)
                if target in PUBLIC_MODULES or full in PUBLIC_MODULES:
                    continue
                if target != layer_pkg:
                    bad.append(f"{where}: imports {full} from inside {layer_pkg}; use {layer_pkg}'s public names")
                elif name is not None and name not in _public_names(layer_pkg) and f"{layer_pkg}.{name}" not in \
                        PUBLIC_MODULES:
                    bad.append(f"{where}: {name} is not a public name of {layer_pkg}")
    return bad


def test_every_module_belongs_to_a_layer():
    stray = [rel for rel, module, level in _sources() if module and module != "avar_ops" and level == 0
             and module != "avar_ops._C"]
    assert not stray, f"modules outside every layer: {stray}"


def test_layers_import_only_public_names_from_below():
    bad = [v for rel, module, level in _sources() for v in _violations(rel, module, level or 1)]
    assert not bad, "layer violations:\n" + "\n".join(bad)


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
