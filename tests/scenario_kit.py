"""What the fault tests share: the lab fixture type, the report check, retrying a read, and
the one slack factor that stretches every timing bound of the tests.

``ELECTFSM_TEST_SLACK`` (a float, default 1) multiplies the part of each timing bound that
pays for scheduling delay: how late a hook may run after its deadline, the tolerance on top
of a TTL for a failover, how long a test waits for something to happen. The physics the
bound checks (a TTL, a margin, etcd's election timeout) is never scaled, so a slow CI
(``ELECTFSM_TEST_SLACK=3``) gets room to breathe and a fast machine keeps the tight check.
The one exception is the scenarios' lease TTL (``TTL``), which grows with the slack so that
their steady-state windows tolerate stalls in proportion.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from electfsm.chaos.checker import Report
from electfsm.chaos.lab import Lab
from electfsm.chaos.process import CandidateProcess
from electfsm.config import default_margin
from electfsm.errors import EtcdError
from electfsm.testing.etcd_binaries import ELECTION_TIMEOUT

MakeLab = Callable[..., Lab]

SLACK_ENV = "ELECTFSM_TEST_SLACK"


def _slack_from_env() -> float:
    raw = os.environ.get(SLACK_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SLACK_ENV}={raw!r}: expected a number such as 1 or 2.5") from None
    if value < 1:
        raise ValueError(f"{SLACK_ENV}={raw!r}: a slack below 1 would tighten the bounds")
    return value


#: the factor every scheduling allowance in the tests is multiplied by
SLACK = _slack_from_env()

#: The lease TTL the scenario tests run with: 2 s, stretched with the slack, because a quiet
#: window (L3: not one transition) survives a stall only up to about a renew interval.
TTL = max(2, round(2 * SLACK))
#: electfsm's default step-down margin for that TTL
MARGIN = default_margin(TTL)

#: the properties a scenario with at least one working term always exercises: tokens, fenced
#: writes, guarded appends, work within the deadline, overlap, confirmation at a recorded
#: revision, the transition table, leaks (keys and leases checked after every stop)
WORKING = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "L5")

#: etcd's raft election timeout in the test servers (seconds; see electfsm.testing.local_etcd)
ELECTION = ELECTION_TIMEOUT


def slack(seconds: float) -> float:
    """A scheduling allowance of ``seconds`` on an unloaded machine, times ``SLACK``."""
    return seconds * SLACK


def ok(report: Report, expect: Iterable[str] = WORKING) -> None:
    """Every property held, and each property in ``expect`` was exercised: status ``pass``
    with something checked, not ``n/a`` (a property that checked nothing is no evidence).
    The report's markdown says which did not."""
    report.require(*expect)  # an expected property that checked nothing fails
    assert report.ok, "\n" + report.markdown()


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """``check()``'s first result that raises no EtcdError, retried until ``timeout``
    (times ``SLACK``)."""
    deadline = time.monotonic() + slack(timeout)
    while True:
        try:
            return check()
        except EtcdError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def poll(condition: Callable[[], Any], timeout: float, what: str,
         interval: float = 0.02) -> Any:
    """``condition()``'s first truthy result, polled until ``timeout`` (times ``SLACK``);
    AssertionError naming ``what`` (and the last result) if it never held."""
    deadline = time.monotonic() + slack(timeout)
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {slack(timeout):.1f}s (last: {result!r})")
        time.sleep(interval)


def worked(c: CandidateProcess, timeout: float = 5.0) -> dict[str, Any]:
    """Wait until the leader ``c`` did leader work in its current term (a guarded append
    acknowledged, after its fenced write): a fault set off by this has a term that acted to
    check, not one killed before its first write. Returns the acknowledged append."""
    term = c.current_term()
    assert term is not None, f"{c.identity} does not lead"
    ev = c.wait_for(lambda e: e["kind"] == "guarded_append" and e["result"] == "ack"
                    and e["token"] == term["token"], slack(timeout))
    assert ev is not None, f"{c.identity} did no leader work in term {term['token']}"
    return ev
