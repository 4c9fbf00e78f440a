"""Draw the elector's machine from :data:`electfsm.machine.TABLE`.

::

    from electfsm.diagram import render
    print(render("mermaid"))          # also "dot"; "svg" needs pygraphviz (extra "diagram")

``python -m electfsm.diagram diagrams/`` rewrites the committed diagrams.
"""

from __future__ import annotations

import sys
from pathlib import Path

from electfsm.machine import INITIAL, STATES, TABLE

FORMATS = ("mermaid", "dot", "svg")
_FILES = {"mermaid": "elector.mmd", "dot": "elector.dot", "svg": "elector.svg"}


def _edges() -> list[tuple[str, str, str]]:
    """(source, dest, label) for every table row and source, merged per state pair."""
    labels: dict[tuple[str, str], list[str]] = {}
    for row in TABLE:
        for source in row.sources:
            labels.setdefault((source, row.dest), []).append(row.trigger)
    return [(s, d, ", ".join(triggers)) for (s, d), triggers in labels.items()]


def mermaid() -> str:
    """The machine as a Mermaid ``stateDiagram-v2``."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL}"]
    lines += [f"    {s} --> {d} : {label}" for s, d, label in _edges()]
    return "\n".join(lines) + "\n"


def dot() -> str:
    """The machine in Graphviz DOT."""
    lines = [
        "digraph electfsm {",
        '    rankdir=LR; node [shape=box style="rounded" fontname="Helvetica"];',
        '    edge [fontname="Helvetica" fontsize=10];',
        '    start [shape=point label=""];',
        *(f'    {state} [label="{state}"];' for state in STATES),
        f"    start -> {INITIAL};",
        *(f'    {s} -> {d} [label="{label}"];' for s, d, label in _edges()),
        "}",
    ]
    return "\n".join(lines) + "\n"


def svg() -> str:
    """The machine drawn as SVG (needs pygraphviz: ``pip install 'electfsm[diagram]'``)."""
    try:
        import pygraphviz
    except ImportError as exc:
        raise RuntimeError("drawing SVG needs pygraphviz: pip install 'electfsm[diagram]' "
                           "(or use format='mermaid' or 'dot')") from exc
    graph = pygraphviz.AGraph(string=dot())
    out: bytes = graph.draw(format="svg", prog="dot")
    return out.decode()


def render(format: str = "mermaid") -> str:
    """The machine as mermaid, DOT or SVG text."""
    if format not in FORMATS:
        raise ValueError(f"unknown diagram format {format!r}; use one of {', '.join(FORMATS)}")
    return {"mermaid": mermaid, "dot": dot, "svg": svg}[format]()


def write(directory: str | Path) -> list[Path]:
    """Write every format into ``directory`` (``elector.mmd``, ``.dot``, ``.svg``)."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, name in _FILES.items():
        path = folder / name
        path.write_text(render(fmt))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(sys.argv[1] if len(sys.argv) > 1 else "diagrams"):
        print(path)
