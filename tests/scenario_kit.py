"""What the scenario tests share: the lab fixture type and the report check."""

from __future__ import annotations

from collections.abc import Callable

from electfsm.chaos import Lab
from electfsm.checker import Report

MakeLab = Callable[..., Lab]


def ok(report: Report) -> None:
    """Every property held (the report's markdown says which did not)."""
    assert report.ok, "\n" + report.markdown()
