"""The package's import direction: the elector's core never depends on the command line, the
test kit or the fault lab; they depend on it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import electfsm

PACKAGE = Path(electfsm.__file__).resolve().parent
OUTER = ("electfsm.cli", "electfsm.testing", "electfsm.chaos")
CORE = [p for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).parts[0] not in ("cli", "testing", "chaos", "__main__.py")]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def outward(path: Path) -> list[str]:
    return sorted(m for m in imported_modules(path)
                  if any(m == o or m.startswith(o + ".") for o in OUTER))


def test_the_core_imports_nothing_from_the_command_line_the_test_kit_or_the_lab() -> None:
    assert len(CORE) >= 10, "the core modules were found"
    offenders = {str(p.relative_to(PACKAGE)): outward(p) for p in CORE if outward(p)}
    assert offenders == {}


def test_the_rule_sees_an_outward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from electfsm.chaos import checker\n    return checker\n")
    assert outward(bad) == ["electfsm.chaos", "electfsm.chaos.checker"]


def test_the_public_face() -> None:
    from electfsm import TLS, Auth, Elector, LeaderInfo, Term, ops  # noqa: F401
    from electfsm.testing import FaultProxy, Harness, LocalCluster, LocalEtcd  # noqa: F401


@pytest.mark.parametrize("package", ["electfsm", "electfsm.testing"])
def test_every_public_name_of_a_lazy_package_has_a_home_and_resolves(package: str) -> None:
    """The packages import their names on first use: ``__all__`` and the table of where
    each lives must agree, and each must be found there."""
    module = importlib.import_module(package)
    assert set(module._LAZY) == set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is getattr(importlib.import_module(module._LAZY[name]),
                                                name)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018
