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
    clean_env,
    electfsm,
    read_log,
    run,
    wait_candidates,
    wait_log,
)

from electfsm.cli.supervisor import GUARD
from electfsm.testing.etcd_binaries import free_port
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

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


# ---------------------------------------------------------------------------- promises
@pytest.mark.parametrize("margin", [None, 2.0], ids=["default-margin", "margin-2s"])
def test_default_grace_ends_a_sigterm_ignoring_command_before_anyone_else_can_lead(
        etcd: LocalEtcd, proxy: FaultProxy, election: str, tmp_path: Path,
        procs: Procs, margin: float | None) -> None:
    """etcd answers node-b but no longer node-a: node-a's command, which ignores SIGTERM, is
    killed after the default --grace (half the margin) while node-a's key still holds the
    election, so before node-b, waiting right there, can lead."""
    ttl = 5
    log = tmp_path / "children.log"
    margin_flag = [] if margin is None else ["--margin", str(margin)]
    procs(electfsm("campaign", election, "node-a", "--ttl", str(ttl), *margin_flag,
                   "--endpoints", proxy.endpoint, "--", *CHILD, str(log), "ignore+fork"))
    first = wait_log(log, lambda e: e["event"] == "start")
    grandchild = wait_log(log, lambda e: e["event"] == "fork")
    procs(electfsm("campaign", election, "node-b", "--ttl", str(ttl),
                   "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "honour"))
    wait_candidates(etcd.endpoint, election, 2)

    proxy.blackhole()
    wait_log(log, lambda e: e["event"] == "term" and e["pid"] == first["pid"], timeout=ttl + 5)
    family = {first["pid"], grandchild["pid"]}
    wait_until(lambda: not any(alive(pid) for pid in family), ttl + 5,
               "SIGKILL after --grace")
    if margin is not None:
        # With a 2 s margin there is a second between the SIGKILL and the earliest expiry
        # of the lease: time enough for this test to see the command gone and read etcd.
        # (The default margin leaves a quarter of that; the log below is the check then.)
        assert key_of(first) in keys(etcd.endpoint, election), \
            "the command was gone while node-a's key still led: nobody else could lead yet"

    second = wait_log(log, lambda e: e["event"] == "start" and e["who"] == "node-b",
                      timeout=ttl + 10)
    assert second["t"] > last_line_of(log, family), "node-b's command never overlaps"


@pytest.mark.parametrize("mode", ["linger:1", "ignore"])
def test_stopped_campaign_ends_its_command_before_giving_up_the_lease(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Procs, mode: str) -> None:
    """SIGTERM to node-a: its command (which takes 1 s to exit, or ignores SIGTERM and is
    killed after --grace) is gone before node-a's key is, so node-b's command, waiting for
    the key, starts only after it."""
    log = tmp_path / "children.log"
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "4", "--grace", "1.5",
                       "--endpoints", etcd.endpoint, "--", *CHILD, str(log), mode))
    first = wait_log(log, lambda e: e["event"] == "start")
    procs(electfsm("campaign", election, "node-b", "--ttl", "4",
                   "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "honour"))
    wait_candidates(etcd.endpoint, election, 2)

    a.signal(signal.SIGTERM)
    assert a.wait() == 0, a.stderr
    second = wait_log(log, lambda e: e["event"] == "start" and e["who"] == "node-b")
    mine = [e for e in read_log(log) if e["pid"] == first["pid"]]
    assert [e["event"] for e in mine].count("term") == 1
    if mode == "ignore":
        assert mine[-1]["event"] == "beat", "killed, not ended"
    else:
        assert mine[-1]["event"] == "end"
    assert second["t"] > mine[-1]["t"], "node-b's command starts after node-a's is gone"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_command_killed_by_a_signal_exits_128_plus_the_signal(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Procs, sig: int) -> None:
    log = tmp_path / "child.log"
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "4",
                       "--endpoints", etcd.endpoint, "--", *CHILD, str(log),
                       f"signal:{int(sig)}"))
    assert a.wait() == 128 + sig, a.stderr
    assert [e["event"] for e in read_log(log)] == ["start"], "it ran, then the signal ended it"
    assert candidates(etcd.endpoint, election) == [], "resigned"


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


# ---------------------------------------------------------------------------- endpoints
def test_command_gets_the_endpoints_electfsm_uses(
        etcd: LocalEtcd, proxy: FaultProxy, election: str, tmp_path: Path,
        procs: Procs) -> None:
    """ELECTFSM_ENDPOINTS in the command's environment is what --endpoints said, even when
    electfsm itself was started with another ELECTFSM_ENDPOINTS."""
    log = tmp_path / "child.log"
    endpoints = f"http://{etcd.endpoint},{proxy.endpoint}"
    unused = f"127.0.0.1:{free_port()}"
    procs(electfsm("campaign", election, "node-a", "--ttl", "4", "--endpoints", endpoints,
                   "--", *CHILD, str(log), "honour"),
          env=clean_env(ELECTFSM_ENDPOINTS=unused))
    start = wait_log(log, lambda e: e["event"] == "start")
    assert start["env"]["ELECTFSM_ENDPOINTS"] == endpoints


def test_etcdctl_endpoints_is_the_fallback_without_endpoints(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Procs) -> None:
    """No --endpoints and no $ELECTFSM_ENDPOINTS: $ETCDCTL_ENDPOINTS (as etcdctl users set it)
    is used, and passed on to the command; $ELECTFSM_ENDPOINTS comes before it."""
    log = tmp_path / "child.log"
    nowhere = f"127.0.0.1:{free_port()}"
    env = clean_env(ETCDCTL_ENDPOINTS=f"http://{etcd.endpoint}")
    procs(electfsm("campaign", election, "node-a", "--ttl", "4", "--connect-timeout", "20",
                   "--", *CHILD, str(log), "honour"), env=env)
    start = wait_log(log, lambda e: e["event"] == "start", timeout=25)
    assert start["env"]["ELECTFSM_ENDPOINTS"] == f"http://{etcd.endpoint}"
    assert keys(etcd.endpoint, election) == [key_of(start)], "it leads on that etcd"

    leader = run("leader", election, env=env)
    assert leader.returncode == 0, leader.stderr
    assert leader.stdout.splitlines() == [key_of(start), "node-a"]
    first = run("leader", election, "--connect-timeout", "20",
                env=clean_env(ELECTFSM_ENDPOINTS=etcd.endpoint, ETCDCTL_ENDPOINTS=nowhere))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [key_of(start), "node-a"]
    ignored = run("leader", election, "--connect-timeout", "1",
                  env=clean_env(ELECTFSM_ENDPOINTS=nowhere, ETCDCTL_ENDPOINTS=etcd.endpoint))
    assert ignored.returncode == 4, "ETCDCTL_ENDPOINTS is only the fallback"


def test_killed_guard_takes_the_command_down_and_exits_1(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Procs) -> None:
    """Should the guard itself be killed, the command is unguarded: electfsm kills its group,
    resigns and exits 1 (an error, not an exit code of the command)."""
    log = tmp_path / "child.log"
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "4",
                       "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "ignore+fork"))
    first = wait_log(log, lambda e: e["event"] == "start")
    grandchild = wait_log(log, lambda e: e["event"] == "fork")
    [guard] = [pid for pid in children_of(a.pid) if GUARD in cmdline(pid)]
    os.kill(guard, signal.SIGKILL)
    try:
        assert a.wait() == 1, a.stderr
    finally:
        if alive(first["pid"]) or alive(grandchild["pid"]):
            os.killpg(first["pgid"], signal.SIGKILL)
    assert "guard process" in a.stderr
    wait_until(lambda: not alive(first["pid"]) and not alive(grandchild["pid"]), 5,
               "the unguarded command is killed")
    assert candidates(etcd.endpoint, election) == [], "resigned"
