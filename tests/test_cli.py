"""The ``electfsm`` command, run as real processes (``python -m electfsm``) against real etcd.

Every process a test starts is registered with the ``procs`` fixture, which stops it (SIGTERM,
then SIGKILL) when the test ends, pass or fail. etcd state is checked with a plain
:class:`EtcdClient` or with ``etcdctl``; the commands under test only ever run as subprocesses.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_kit import (
    Proc,
    alive,
    candidates,
    clean_env,
    electfsm,
    read_log,
    run,
    running_with,
    wait_candidates,
    wait_log,
)

from electfsm.config import default_margin
from electfsm.diagram import render
from electfsm.etcd import EtcdClient
from electfsm.testing.etcd_binaries import free_port
from electfsm.testing.local_etcd import LocalEtcd

HERE = Path(__file__).resolve().parent
CHILD = [sys.executable, str(HERE / "cli_child.py")]
MakeEtcd = Callable[..., LocalEtcd]


# ---------------------------------------------------------------------------- argument errors
BAD_ARGUMENTS: list[tuple[list[str], str]] = [
    (["campaign", "{e}", "node", "--bogus"], "unrecognized arguments: --bogus"),
    (["campaign"], "required: ELECTION, IDENTITY"),
    (["leader"], "required: ELECTION"),
    (["campaign", "{e}", "node", "--ttl", "abc"], "--ttl: the TTL must be a whole number"),
    (["campaign", "{e}", "node", "--"], "'--' must be followed by the command"),
    (["campaign", "{e}", "node", "--endpoints", "nonsense:"], "'nonsense:' is not host:port"),
    (["campaign", "{e}/", "node"], "ends with '/'"),
    (["campaign", "{e}", "node", "--user", "root:s3cret"], "ELECTFSM_PASSWORD"),
    (["campaign", "{e}", "node", "--user", "root"], "ELECTFSM_PASSWORD"),
    (["observe", "{e}", "--", "true"], "only 'campaign' takes a command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
]


def test_bad_arguments_print_one_line_exit_2_and_start_nothing(
        etcd: LocalEtcd, election: str, tmp_path: Path) -> None:
    marker = f"electfsm-marker-{uuid.uuid4().hex}"
    touched = tmp_path / "touched"
    child = ["sh", "-c", f"touch {touched}; exec sleep 30 # {marker}"]
    env = clean_env(ELECTFSM_ENDPOINTS=etcd.endpoint)
    runs = []
    for args, expected in BAD_ARGUMENTS:
        argv = [a.format(e=election) for a in args]
        if "--" not in argv and argv[:1] == ["campaign"]:
            argv += ["--", *child]
        runs.append((argv, expected, subprocess.Popen(
            electfsm(*argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env)))
    # and an endpoint list from the environment that makes no sense
    bad_env = clean_env(ELECTFSM_ENDPOINTS="nonsense:")
    runs.append((["leader", election], "$ELECTFSM_ENDPOINTS: endpoint 'nonsense:'",
                 subprocess.Popen(electfsm("leader", election), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=bad_env)))
    try:
        for argv, expected, p in runs:
            out, err = p.communicate(timeout=20)
            assert p.returncode == 2, (argv, p.returncode, err)
            lines = err.splitlines()
            assert len(lines) == 1, (argv, err)
            assert lines[0].startswith("electfsm"), (argv, err)
            assert "error:" in lines[0] and expected in lines[0], (argv, err)
            assert "Traceback" not in err
            assert out == ""
            assert "s3cret" not in err, "the password is never echoed"
    finally:
        for _argv, _expected, p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not touched.exists(), "no command was started"
    assert running_with(marker) == [], "nothing is left running"
    assert candidates(etcd.endpoint, election) == [], "nobody campaigned"


def test_unreachable_etcd_exits_4_within_the_connect_timeout(
        election: str, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    touched = tmp_path / "touched"
    marker = f"electfsm-marker-{uuid.uuid4().hex}"
    common = ["--endpoints", endpoint, "--connect-timeout", "1"]
    commands = [
        ["campaign", election, "node", *common],
        ["campaign", election, "node", *common, "--",
         "sh", "-c", f"touch {touched}; exec sleep 30 # {marker}"],
        ["observe", election, *common],
        ["leader", election, *common],
        ["status", election, *common],
    ]
    started = time.monotonic()
    runs = [subprocess.Popen(electfsm(*argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=clean_env())
            for argv in commands]
    try:
        for argv, p in zip(commands, runs, strict=True):
            _out, err = p.communicate(timeout=20)
            took = time.monotonic() - started
            assert p.returncode == 4, (argv, p.returncode, err)
            last = err.strip().splitlines()[-1]
            assert last.startswith("electfsm: error:") and endpoint in last, (argv, err)
            assert "--connect-timeout" in last
            assert took < 1 + 4, f"{argv[0]} took {took:.1f}s with --connect-timeout 1"
    finally:
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not touched.exists(), "the command never ran: we never led"
    assert running_with(marker) == []


# ---------------------------------------------------------------------------- campaign
def test_campaign_prints_like_etcdctl_elect_and_resigns_on_sigterm(
        etcd: LocalEtcd, election: str, procs: Callable[..., Proc]) -> None:
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "2",
                       "--endpoints", etcd.endpoint))
    _, key = a.line()
    _, value = a.line()
    assert key.startswith(election + "/") and value == "node-a"
    [kv] = candidates(etcd.endpoint, election)
    assert bytes(kv.key).decode() == key
    a.signal(signal.SIGTERM)
    assert a.wait() == 0, a.stderr
    assert candidates(etcd.endpoint, election) == [], "resigned: the key is gone"
    assert "Traceback" not in a.stderr


def test_command_gets_token_and_key_and_its_exit_code_ends_the_campaign(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Callable[..., Proc]) -> None:
    log = tmp_path / "child.log"
    env = clean_env(ELECTFSM_ENDPOINTS=etcd.endpoint)  # endpoints from the environment
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "2", "--",
                       *CHILD, str(log), "honour"), env=env)
    start = wait_log(log, lambda e: e["event"] == "start")
    leader = run("leader", election, "--json", "--endpoints", etcd.endpoint)
    assert leader.returncode == 0, leader.stderr
    info = json.loads(leader.stdout)
    assert start["env"]["ELECTFSM_TOKEN"] == str(info["create_revision"])
    assert start["env"]["ELECTFSM_KEY"] == info["key"]
    assert start["env"]["ELECTFSM_ELECTION"] == election
    assert start["env"]["ELECTFSM_IDENTITY"] == "node-a" == info["identity"]
    assert start["env"]["ELECTFSM_LEASE"] == f"{info['lease']:x}"
    a.signal(signal.SIGINT)
    assert a.wait() == 0, a.stderr
    assert [e["event"] for e in read_log(log)][-2:] == ["term", "end"], "SIGTERM reached it"
    assert not alive(start["pid"])
    assert candidates(etcd.endpoint, election) == []

    # A command that exits on its own while we lead: resign, exit with its code.
    b = procs(electfsm("campaign", election, "node-b", "--ttl", "2",
                       "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "exit:7"))
    assert b.wait() == 7, b.stderr
    assert candidates(etcd.endpoint, election) == [], "resigned after the command exited"


def test_once_exits_1_when_leadership_is_lost_and_the_command_is_stopped(
        etcd: LocalEtcd, election: str, tmp_path: Path, procs: Callable[..., Proc]) -> None:
    log = tmp_path / "child.log"
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "2", "--once",
                       "--endpoints", etcd.endpoint, "--", *CHILD, str(log), "honour"))
    start = wait_log(log, lambda e: e["event"] == "start")
    client = EtcdClient([etcd.endpoint], timeout=5)
    try:  # the lease is revoked behind its back (and our key goes with it)
        client.revoke(int(start["env"]["ELECTFSM_LEASE"], 16))
    finally:
        client.close()
    assert a.wait() == 1, a.stderr
    events = [e["event"] for e in read_log(log)]
    assert events.count("start") == 1, "--once: no second term"
    assert events[-2:] == ["term", "end"]
    assert candidates(etcd.endpoint, election) == []


@pytest.mark.parametrize("mode", ["honour", "ignore"])
def test_command_runs_only_while_leader_when_etcd_is_paused(
        make_etcd: MakeEtcd, election: str, tmp_path: Path, procs: Callable[..., Proc],
        mode: str) -> None:
    """Pause etcd under the leader: its command is stopped by the step-down deadline
    (SIGTERM; SIGKILL after --grace when it ignores SIGTERM), and the next command, of
    whichever candidate wins once etcd resumes, starts only after it is gone."""
    server = make_etcd()
    ttl, margin = 2, default_margin(2)
    grace = 0.6 if mode == "ignore" else 0.2
    log = tmp_path / "children.log"

    def candidate(name: str, child_mode: str) -> Proc:
        return procs(electfsm("campaign", election, name, "--ttl", str(ttl),
                              "--grace", str(grace), "--endpoints", server.endpoint, "--",
                              *CHILD, str(log), child_mode))

    candidate("node-a", mode)
    first = wait_log(log, lambda e: e["event"] == "start")
    candidate("node-b", "honour")
    wait_candidates(server.endpoint, election, 2)
    paused_at = time.monotonic()
    server.pause()
    try:
        term = wait_log(log, lambda e: e["event"] == "term" and e["pid"] == first["pid"],
                        timeout=ttl + 2)
        # The last keepalive confirmed before the pause was sent before it, so the local
        # deadline (its send time + ttl - margin) is at most paused_at + ttl - margin ...
        assert term["t"] <= paused_at + ttl - margin + 0.25, term["t"] - paused_at
        # ... and, with keepalives every ttl/3, not much earlier than that.
        assert term["t"] >= paused_at + ttl - margin - ttl / 3 - 0.2, term["t"] - paused_at
        deadline = time.monotonic() + grace + 2
        while alive(first["pid"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not alive(first["pid"]), "the command is gone"
        beats = [e["t"] for e in read_log(log) if e["pid"] == first["pid"]]
        if mode == "ignore":
            lived = beats[-1] - term["t"]
            assert grace - 0.1 <= lived <= grace + 0.3, f"SIGKILL {lived:.2f}s after SIGTERM"
        else:
            assert beats[-1] - term["t"] < 0.1
        assert not [e for e in read_log(log) if e["event"] == "start" and e is not first
                    and e["pid"] != first["pid"]], "nobody else started while etcd was paused"
        time.sleep(max(0.0, paused_at + ttl + 0.3 - time.monotonic()))
    finally:
        server.resume()
    second = wait_log(log, lambda e: e["event"] == "start" and e["pid"] != first["pid"],
                      timeout=15)
    end_of_first = max(e["t"] for e in read_log(log) if e["pid"] == first["pid"])
    assert second["t"] > end_of_first, "the next command started after the first was gone"
    assert int(second["env"]["ELECTFSM_TOKEN"]) > int(first["env"]["ELECTFSM_TOKEN"])


# ---------------------------------------------------------------------------- Go interop
def test_etcdctl_leader_interrupted_hands_over_to_electfsm(
        etcd: LocalEtcd, etcdctl: str, election: str, procs: Callable[..., Proc]) -> None:
    go = procs([etcdctl, f"--endpoints={etcd.endpoint}", "elect", election, "go-node"])
    _, go_key = go.line()
    assert go.line()[1] == "go-node"
    py = procs(electfsm("campaign", election, "py-node", "--ttl", "2",
                        "--endpoints", etcd.endpoint))
    wait_candidates(etcd.endpoint, election, 2)
    assert py.silent_for(0.5), "electfsm waits behind the Go leader"
    who = run("leader", election, "--endpoints", etcd.endpoint)
    assert who.stdout.splitlines() == [go_key, "go-node"]
    go.signal(signal.SIGINT)
    _, py_key = py.line(timeout=5)
    assert py.line()[1] == "py-node"
    assert go.wait() == 0
    assert py_key.startswith(election + "/") and py_key != go_key
    who = run("leader", election, "--endpoints", etcd.endpoint)
    assert who.stdout.splitlines() == [py_key, "py-node"]


def test_electfsm_leader_interrupted_hands_over_to_etcdctl(
        etcd: LocalEtcd, etcdctl: str, election: str, procs: Callable[..., Proc]) -> None:
    py = procs(electfsm("campaign", election, "py-node", "--ttl", "2",
                        "--endpoints", etcd.endpoint))
    _, py_key = py.line()
    go = procs([etcdctl, f"--endpoints={etcd.endpoint}", "elect", election, "go-node"])
    wait_candidates(etcd.endpoint, election, 2)
    assert go.silent_for(0.5), "etcdctl waits behind the electfsm leader"
    py.signal(signal.SIGINT)
    _, go_key = go.line(timeout=5)
    assert go.line()[1] == "go-node"
    assert py.wait() == 0, py.stderr
    assert go_key != py_key
    who = run("leader", election, "--endpoints", etcd.endpoint)
    assert who.stdout.splitlines() == [go_key, "go-node"]


def test_observe_prints_the_same_leaders_as_etcdctl_elect_listen(
        etcd: LocalEtcd, etcdctl: str, election: str, procs: Callable[..., Proc]) -> None:
    ep = etcd.endpoint
    go_obs = procs([etcdctl, f"--endpoints={ep}", "elect", "-l", election])
    py_obs = procs(electfsm("observe", election, "--endpoints", ep))
    assert py_obs.line()[1] == "(no leader)"
    py_json = procs(electfsm("observe", election, "--json", "--endpoints", ep))
    assert json.loads(py_json.line()[1])["identity"] is None

    def both_see(name: str) -> None:
        for obs in (go_obs, py_obs):
            _key = obs.line(timeout=5)[1]
            assert obs.line()[1] == name, (obs.argv[:3], obs.stdout)
        assert json.loads(py_json.line(timeout=5)[1])["identity"] == name

    py1 = procs(electfsm("campaign", election, "py-1", "--ttl", "2", "--endpoints", ep))
    both_see("py-1")
    go1 = procs([etcdctl, f"--endpoints={ep}", "elect", election, "go-1"])
    wait_candidates(ep, election, 2)
    py2 = procs(electfsm("campaign", election, "py-2", "--ttl", "2", "--endpoints", ep))
    wait_candidates(ep, election, 3)
    py1.signal(signal.SIGINT)
    both_see("go-1")
    # etcdctl leads once it has printed its key: interrupted before that (still inside
    # Campaign) it exits without deleting its key, which then lingers for its 60 s lease.
    go1.line()
    go1.signal(signal.SIGINT)
    both_see("py-2")
    py2.signal(signal.SIGINT)
    assert py_obs.line(timeout=5)[1] == "(no leader)"
    gone = json.loads(py_json.line(timeout=5)[1])
    assert gone["identity"] is None and gone["key"] is None
    assert go_obs.silent_for(0.3)
    leaders = [line for line in py_obs.stdout if line != "(no leader)"]
    assert leaders == go_obs.stdout, "the same leaders, keys and values, in the same order"
    assert leaders[1::2] == ["py-1", "go-1", "py-2"]
    record = json.loads(py_json.stdout[1])
    assert set(record) >= {"identity", "key", "create_revision", "time"}
    assert record["key"] == leaders[0]
    for p in (py1, go1, py2):
        assert p.wait() == 0


def test_observe_keeps_going_across_an_etcd_restart(
        make_etcd: MakeEtcd, election: str, procs: Callable[..., Proc]) -> None:
    server = make_etcd()
    ep = server.endpoint
    obs = procs(electfsm("observe", election, "--endpoints", ep))
    assert obs.line()[1] == "(no leader)"
    a = procs(electfsm("campaign", election, "node-a", "--ttl", "5", "--endpoints", ep))
    obs.line()
    assert obs.line()[1] == "node-a"
    server.kill()
    server.restart()
    a.signal(signal.SIGINT)  # a's lease survived the restart; it resigns now
    assert a.wait() == 0, a.stderr
    assert obs.line(timeout=10)[1] == "(no leader)"
    procs(electfsm("campaign", election, "node-b", "--ttl", "5", "--endpoints", ep))
    obs.line(timeout=10)
    assert obs.line()[1] == "node-b"


# ---------------------------------------------------------------------------- leader, status
def test_leader_and_status_on_an_empty_election_exit_3(etcd: LocalEtcd, election: str) -> None:
    text = run("leader", election, "--endpoints", etcd.endpoint)
    assert text.returncode == 3 and text.stdout == ""
    assert "nobody leads" in text.stderr
    as_json = run("leader", election, "--json", "--endpoints", etcd.endpoint)
    assert as_json.returncode == 3
    assert json.loads(as_json.stdout)["identity"] is None
    status = run("status", election, "--endpoints", etcd.endpoint)
    assert status.returncode == 3 and status.stdout == ""


def test_status_lists_every_candidate_in_queue_order(
        etcd: LocalEtcd, etcdctl: str, election: str, procs: Callable[..., Proc]) -> None:
    ep = etcd.endpoint
    procs(electfsm("campaign", election, "first", "--ttl", "5", "--endpoints", ep)).line()
    procs([etcdctl, f"--endpoints={ep}", "elect", election, "second"])
    wait_candidates(ep, election, 2)
    procs(electfsm("campaign", election, "third", "--ttl", "5", "--endpoints", ep))
    kvs = wait_candidates(ep, election, 3)
    got = run("status", election, "--json", "--endpoints", ep)
    assert got.returncode == 0, got.stderr
    rows = [json.loads(line) for line in got.stdout.splitlines()]
    assert [r["identity"] for r in rows] == ["first", "second", "third"]
    assert [r["position"] for r in rows] == [1, 2, 3]
    assert [r["leader"] for r in rows] == [True, False, False]
    assert [r["key"] for r in rows] == [bytes(kv.key).decode() for kv in kvs]
    assert [r["create_revision"] for r in rows] == sorted(r["create_revision"] for r in rows)
    assert 0 < rows[0]["ttl"] <= 5 and 0 < rows[2]["ttl"] <= 5
    assert 0 < rows[1]["ttl"] <= 60, "etcdctl's session lease (60 s)"
    table = run("status", election, "--endpoints", ep)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["#", "ROLE", "IDENTITY"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", "leader", "first"], ["2", "waiting", "second"], ["3", "waiting", "third"]]
    leader = run("leader", election, "--json", "--endpoints", ep)
    assert leader.returncode == 0
    assert json.loads(leader.stdout)["key"] == rows[0]["key"]


# ---------------------------------------------------------------------------- the others
def test_diagram_prints_the_machine_from_the_table(tmp_path: Path) -> None:
    mermaid = run("diagram")
    assert mermaid.returncode == 0 and mermaid.stdout == render("mermaid")
    out = tmp_path / "elector.dot"
    dot = run("diagram", "--format", "dot", "-o", str(out))
    assert dot.returncode == 0 and dot.stdout == ""
    assert out.read_text() == render("dot")


def test_etcd_command_serves_until_sigterm(procs: Callable[..., Proc],
                                           election: str) -> None:
    port = free_port()
    server = procs(electfsm("etcd", "--port", str(port)))
    _, endpoint = server.line(timeout=20)
    assert endpoint == f"127.0.0.1:{port}"
    empty = run("leader", election, "--endpoints", endpoint)
    assert empty.returncode == 3, empty.stderr
    etcd_pids = [pid for pid in running_with(f"127.0.0.1:{port}") if pid != server.pid]
    assert etcd_pids, "an etcd process serves the port"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.stderr
    assert not any(alive(pid) for pid in etcd_pids), "etcd stopped with it"
    with socket.socket() as sock, pytest.raises(OSError):
        sock.connect(("127.0.0.1", port))


def test_demo_runs_to_the_end() -> None:
    demo = run("demo", "--ttl", "2", timeout=60)
    assert demo.returncode == 0, demo.stderr
    assert "failover" in demo.stdout and "handover" in demo.stdout
