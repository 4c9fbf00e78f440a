"""What the fault tests share: the lab fixture type, the report check, retrying a read."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from electfsm.chaos import Lab
from electfsm.checker import Report
from electfsm.errors import EtcdError

MakeLab = Callable[..., Lab]


def ok(report: Report) -> None:
    """Every property held (the report's markdown says which did not)."""
    assert report.ok, "\n" + report.markdown()


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """``check()``'s first result that raises no EtcdError, retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except EtcdError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
