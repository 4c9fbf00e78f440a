"""``electfsm campaign -- COMMAND``: the command's lifetime against real etcd and real signals.

Every command here is tests/cli_child.py, which logs its start (with its environment), a beat
every 20 ms, SIGTERM and its end to a shared JSON-lines file, on the monotonic clock every
process shares. "No overlap" is read from that log: the next leader's command starts after the
last line the previous one (and its children) ever wrote.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_kit import (
    Proc,
    alive,
    candidates,
    electfsm,
    read_log,
    wait_candidates,
    wait_log,
)

from electfsm.embedded import LocalEtcd
from electfsm.faultproxy import FaultProxy
from electfsm.supervisor import GUARD

HERE = Path(__file__).resolve().parent
CHILD = [sys.executable, str(HERE / "cli_child.py")]
Procs = Callable[..., Proc]


@pytest.fixture
def proxy(etcd: LocalEtcd) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's etcd."""
    with FaultProxy(etcd.endpoint) as p:
        yield p


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def last_line_of(log: Path, pids: set[int]) -> float:
    """When any of ``pids`` last wrote to ``log``."""
    return max(e["t"] for e in read_log(log) if e["pid"] in pids)


def children_of(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def key_of(start: dict[str, Any]) -> str:
    return str(start["env"]["ELECTFSM_KEY"])


def keys(endpoint: str, election: str) -> list[str]:
    return [bytes(kv.key).decode() for kv in candidates(endpoint, election)]


# ---------------------------------------------------------------------------- a killed campaign
def test_command_and_its_group_die_with_a_sigkilled_campaign(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Procs) -> None:
    """SIGKILL of `electfsm campaign` (kill -9, the OOM killer): its command, which ignores
    SIGTERM, and the command's own child are gone long before the lease runs out; the next
    leader's command starts only after they are."""
    ttl = 5
    log = tmp_path / "children.log"
    a = procs(electfsm("campaign", election, "node-a", "--ttl", str(ttl),
                       "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "ignore+fork"))
    first = wait_log(log, lambda e: e["event"] == "start")
    grandchild = wait_log(log, lambda e: e["event"] == "fork")
    assert grandchild["parent"] == first["pid"]
    assert first["pgid"] == grandchild["pgid"] == first["pid"], "one process group of its own"
    guards = [pid for pid in children_of(a.pid) if GUARD in cmdline(pid)]
    procs(electfsm("campaign", election, "node-b", "--ttl", str(ttl),
                   "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "honour"))
    wait_candidates(etcd.endpoint, election, 2)

    a.proc.kill()
    assert a.wait() == -signal.SIGKILL
    family = {first["pid"], grandchild["pid"]}
    try:
        wait_until(lambda: not any(alive(pid) for pid in family), ttl + 5,
                   "the command and its child die with their campaign")
    finally:  # do not leave orphans behind when that fails
        if any(alive(pid) for pid in family):
            os.killpg(first["pgid"], signal.SIGKILL)
    # ... well before etcd could expire the lease: our key is still there, nobody else leads
    assert key_of(first) in keys(etcd.endpoint, election), "gone before the lease expired"
    assert len(guards) == 1, "the command ran under a guard process"
    wait_until(lambda: not alive(guards[0]), 5, "the guard is gone too")
    assert [e["event"] for e in read_log(log) if e["pid"] == first["pid"]].count("term") == 1, \
        "SIGTERM first, then SIGKILL after --grace"

    second = wait_log(log, lambda e: e["event"] == "start" and e["who"] == "node-b",
                      timeout=ttl + 10)
    assert second["t"] > last_line_of(log, family), "the next command never overlaps"


# ---------------------------------------------------------------------------- exit codes
def test_command_that_cannot_start_exits_1(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Procs) -> None:
    """An executable file whose interpreter does not exist passes the checks made before
    campaigning, and fails only when started, once elected."""
    script = tmp_path / "broken"
    script.write_text(f"#!{tmp_path / 'no-such-interpreter'}\n")
    script.chmod(0o755)
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "4",
                       "--endpoints", etcd.endpoint, "--", str(script)))
    assert a.wait() == 1, a.stderr
    assert f"cannot start {script}" in a.stderr
    assert "Traceback" not in a.stderr
    assert candidates(etcd.endpoint, election) == [], "resigned"
