"""The layout of ``vtprune.eval``: every module imports, the sub-packages import only downwards, and the
library never imports the harness (only its application layer, ``vtprune.cli`` and ``vtprune.demo``)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import vtprune
import vtprune.eval

SUBPACKAGES = ("benchmarks", "synthetic", "harness", "speed")
# What each sub-package may import from vtprune.eval (itself included).
ALLOWED = {
    "benchmarks": {"benchmarks"},
    "synthetic": {"synthetic"},
    "harness": {"harness", "benchmarks", "synthetic"},
    "speed": {"speed", "harness"},
}
APPLICATION = {"cli.py", "demo.py"}  # vtprune/ modules that may import the harness


def _modules() -> list[str]:
    names = []
    for sub in SUBPACKAGES:
        pkg = importlib.import_module(f"vtprune.eval.{sub}")
        names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return names


def _imported(path: Path, package: str) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against ``package``),
    function-level imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def test_every_subpackage_has_modules_and_no_module_is_left_flat():
    flat = [m.name for m in pkgutil.iter_modules(vtprune.eval.__path__) if not m.ispkg]
    assert flat == ["__main__"], flat
    subs = sorted(m.name for m in pkgutil.iter_modules(vtprune.eval.__path__) if m.ispkg)
    assert subs == sorted(SUBPACKAGES)


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no module docstring"


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_subpackage_imports_only_downwards(sub):
    pkg = importlib.import_module(f"vtprune.eval.{sub}")
    bad = []
    for path in sorted(Path(pkg.__path__[0]).glob("*.py")):
        for name in _imported(path, pkg.__name__):
            parts = name.split(".")
            if parts[:2] == ["vtprune", "eval"] and len(parts) > 2 and parts[2] not in ALLOWED[sub]:
                bad.append(f"{path.name} imports {name}")
    assert not bad, f"vtprune.eval.{sub} may import only {sorted(ALLOWED[sub])}: {bad}"


def test_library_never_imports_the_harness():
    roots = {
        "vtprune": Path(vtprune.__file__).parent,
        "vtprune.integrations": Path(importlib.import_module("vtprune.integrations").__file__).parent,
        "vtprune.kernels": Path(importlib.import_module("vtprune.kernels").__file__).parent,
    }
    bad = []
    checked = 0
    for root_pkg, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if root_pkg == "vtprune" and (rel.parts[0] == "assets" or str(rel) in APPLICATION):
                continue
            package = ".".join([root_pkg, *rel.parts[:-1]])
            checked += 1
            bad += [
                f"{root_pkg}/{rel} imports {n}"
                for n in _imported(path, package)
                if n.startswith("vtprune.eval")
            ]
    assert checked > 20  # the walk found the library
    assert not bad, bad


def test_the_application_layer_is_what_imports_the_harness():
    """The rule above is not vacuous: the CLI does import the harness, and the scan sees it."""
    path = Path(vtprune.__file__).parent / "cli.py"
    assert any(n.startswith("vtprune.eval.") for n in _imported(path, "vtprune"))
