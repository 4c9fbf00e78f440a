"""diagrams/ is generated from the transition table and must not go stale."""

from __future__ import annotations

from pathlib import Path

import pytest

from electfsm.diagram import render
from electfsm.machine import TABLE

DIAGRAMS = Path(__file__).resolve().parent.parent / "diagrams"
REGEN = "regenerate with: python -m electfsm.diagram diagrams"


@pytest.mark.parametrize(("fmt", "name"), [("mermaid", "elector.mmd"), ("dot", "elector.dot"),
                                           ("svg", "elector.svg")])
def test_committed_diagram_matches_the_table(fmt: str, name: str) -> None:
    if fmt == "svg":
        pytest.importorskip("pygraphviz", reason="the 'diagram' extra draws SVG")
    assert (DIAGRAMS / name).read_text() == render(fmt), f"diagrams/{name} is stale; {REGEN}"


def test_every_table_row_is_drawn() -> None:
    text = render("mermaid")
    for row in TABLE:
        for source in row.sources:
            line = next((ln for ln in text.splitlines()
                         if ln.strip().startswith(f"{source} --> {row.dest} :")), None)
            assert line is not None and row.trigger in line


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown diagram format"):
        render("png")
