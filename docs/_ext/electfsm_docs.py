"""Sphinx directives that generate pages from electfsm's own data, so the docs cannot drift.

- ``electfsm-transitions``: the transition table, from :data:`electfsm.machine.TABLE`.
- ``electfsm-cli``: the command-line reference, from the argparse parser
  (:func:`electfsm.cli.parser.build_parser`): every command, every option, its default.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def escape(text: str) -> str:
    """Plain text as reStructuredText that renders as itself (no markup, no references)."""
    return re.sub(r"([^\w\s])", r"\\\1", text)


class TransitionTable(SphinxDirective):
    """The table the machine is built from: one row per (sources, trigger)."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from electfsm.machine import TABLE, internal

        def hooks(sources: tuple[str, ...], trigger: str) -> str:
            stays = [s for s in sources if internal(s, trigger)]  # type: ignore[arg-type]
            if len(stays) == len(sources):
                return "none (internal)"
            if stays:
                return f"exit, then enter (none from {', '.join(stays)})"
            return "exit, then enter"

        header = ("from", "event", "to", "hooks", "when")
        rows = [(", ".join(row.sources), row.trigger, row.dest, hooks(row.sources, row.trigger),
                 row.note) for row in TABLE]
        table = nodes.table(classes=["electfsm-transitions"])
        group = nodes.tgroup(cols=len(header))
        table += group
        for width in (22, 14, 14, 16, 48):
            group += nodes.colspec(colwidth=width)

        def line(cells: tuple[str, ...], literal: tuple[bool, ...]) -> nodes.row:
            tr = nodes.row()
            for text, is_literal in zip(cells, literal, strict=True):
                entry = nodes.entry()
                para = nodes.paragraph()
                para += nodes.literal(text, text) if is_literal else nodes.Text(text)
                entry += para
                tr += entry
            return tr

        head = nodes.thead()
        head += line(header, (False,) * 5)
        group += head
        body = nodes.tbody()
        for row in rows:
            body += line(row, (True, True, True, False, False))
        group += body
        return [table]


def _signature(action: argparse.Action) -> str:
    if not action.option_strings:
        return str(action.metavar or action.dest)
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    metavar = action.metavar or action.dest.upper()
    return ", ".join(f"{flag} {metavar}" for flag in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    extra = []
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        extra.append("one of " + ", ".join(str(c) for c in action.choices))
    if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
            and action.nargs != 0 and "default" not in text):
        extra.append(f"default {action.default}")
    return "; ".join([text, *extra]) if extra else text


def _program(lines: list[str], prog: str, parser: argparse.ArgumentParser, title: str,
             underline: str) -> None:
    lines += [title, underline * len(title), ""]
    lines += ["::", ""]
    usage = parser.format_usage().strip()
    lines += ["   " + ln for ln in usage.splitlines()]
    lines.append("")
    if parser.description:
        lines += ["::", ""] if "\n" in parser.description else []
        if "\n" in parser.description:
            lines += ["   " + ln for ln in parser.description.splitlines()]
        else:
            lines.append(escape(parser.description))
        lines.append("")
    lines += [f".. program:: {prog}", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        lines.append(f".. option:: {_signature(action)}")
        lines.append("")
        lines.append("   " + escape(_help(parser, action) or "(no description)"))
        lines.append("")


class CliReference(SphinxDirective):
    """Every command of ``electfsm`` and every option, from the parser itself."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        from electfsm.cli.parser import EXIT_CODES, build_parser

        parser, commands = build_parser()
        lines: list[str] = []
        _program(lines, "electfsm", parser, "electfsm", "-")
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in sub._choices_actions}
        lines += ["Commands:", ""]
        for name in commands:
            lines.append(f"- :ref:`electfsm {name} <cli-{name}>` — {escape(helps.get(name) or '')}")
        lines.append("")
        for name, command in commands.items():
            lines += [f".. _cli-{name}:", ""]
            _program(lines, f"electfsm {name}", command, f"electfsm {name}", "-")
        title = "Exit codes, as electfsm --help prints them"
        lines += [title, "-" * len(title), "", "::", ""]
        lines += ["   " + ln for ln in EXIT_CODES.splitlines()]
        lines.append("")
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(lines, source="electfsm-cli"), container)
        return list(container.children)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("electfsm-transitions", TransitionTable)
    app.add_directive("electfsm-cli", CliReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
