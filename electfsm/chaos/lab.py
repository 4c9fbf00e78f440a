"""Fault-injection kit and a Jepsen-style randomized runner.

The randomized runner::

    python -m electfsm.chaos --seed 7 --minutes 2 --candidates 5 --out chaos-out

starts a 3-member etcd cluster on loopback, ``K`` candidate processes (each behind its own
fault proxy to every member), a fenced resource and an etcd recorder; every few seconds it
injects a fault drawn from ``random.Random(seed)`` (kill, pause, stall, link faults, etcd
member kill/pause, quorum loss, compaction, resign …), heals it, and at the end checks every
property (:mod:`electfsm.chaos.checker`). It writes ``history.jsonl`` (every event, merged),
``schedule.jsonl`` (the faults drawn), ``report.md`` and ``report.json`` into ``--out`` and
exits 1 on any violation. The same seed draws the same schedule.

The kit, for scenario tests::

    with Lab(tmp_path, endpoints=[etcd.endpoint], name="s1") as lab:
        a, b = lab.spawn("a"), lab.spawn("b")
        leader = lab.wait_leader()
        with lab.fault("kill the leader"):
            leader.kill()
        report = lab.finish()
        assert report.ok, report.markdown()

:class:`Lab` gives each candidate a :class:`Link` (its fault proxies), records the etcd
history, hosts the fenced resource, logs faults with their times, and at :meth:`Lab.finish`
stops everything and runs the checker. :class:`PartitionableCluster` is a 3-member cluster
whose peer traffic goes through a proxy that can cut one member off from the others
(a minority member), which plain proxies in front of client ports cannot do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from electfsm import clock
from electfsm.chaos import checker
from electfsm.chaos.candidate import CandidateProcess, EventLog, event_time
from electfsm.chaos.fenced import FencedResource
from electfsm.errors import EtcdError
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.etcd.security import Auth
from electfsm.testing.etcd_binaries import find_etcd_binary, free_port
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

__all__ = [
    "CpuLimit",
    "Freezer",
    "Lab",
    "Link",
    "PacketFilter",
    "PartitionableCluster",
    "main",
    "run_chaos",
]


# --------------------------------------------------------------------------- links


class Link:
    """A candidate's fault proxies (one per etcd endpoint), switched together."""

    def __init__(self, proxies: Sequence[FaultProxy]) -> None:
        self.proxies = list(proxies)

    @property
    def endpoints(self) -> list[str]:
        return [p.endpoint for p in self.proxies]

    def pass_through(self) -> None:
        for p in self.proxies:
            p.pass_through()
            with contextlib.suppress(RuntimeError):
                p.accept_again()

    def blackhole(self) -> None:
        for p in self.proxies:
            p.blackhole()

    def drop_responses(self) -> None:
        for p in self.proxies:
            p.drop_responses()

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        for p in self.proxies:
            p.latency(seconds, jitter)

    def reset(self) -> None:
        for p in self.proxies:
            p.reset()

    def refuse(self) -> None:
        for p in self.proxies:
            p.refuse()

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()


# --------------------------------------------------------------------------- cgroups


def _cgroup_v1(controller: str) -> Path | None:
    root = Path("/sys/fs/cgroup") / controller
    return root if (root / "cgroup.procs").exists() else None


def cgroup_problem(controller: str) -> str | None:
    """Why a cgroup-v1 ``controller`` cannot be used here, or None if it can (probed)."""
    root = _cgroup_v1(controller)
    if root is None:
        return f"no cgroup v1 {controller} hierarchy at /sys/fs/cgroup/{controller}"
    probe = root / f"electfsm-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"cannot create a {controller} cgroup ({exc})"
    with contextlib.suppress(OSError):
        probe.rmdir()
    return None


class _CGroup:
    def __init__(self, controller: str, pid: int) -> None:
        root = _cgroup_v1(controller)
        if root is None:
            raise RuntimeError(f"no cgroup v1 {controller} hierarchy")
        self.root = root
        self.path = root / f"electfsm-{uuid.uuid4().hex[:10]}"
        self.path.mkdir()
        self.pid = pid
        (self.path / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            (self.root / "cgroup.procs").write_text(str(self.pid))
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)


class Freezer(_CGroup):
    """Freeze a process with the cgroup-v1 freezer (the whole process, all threads)."""

    def __init__(self, pid: int) -> None:
        super().__init__("freezer", pid)

    def _set(self, state: str) -> None:
        (self.path / "freezer.state").write_text(state)
        for _ in range(200):
            if (self.path / "freezer.state").read_text().strip() == state:
                return
            time.sleep(0.005)

    def freeze(self) -> None:
        self._set("FROZEN")

    def thaw(self) -> None:
        self._set("THAWED")

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.thaw()
        super().remove()


class CpuLimit(_CGroup):
    """Limit a process to ``percent`` of one CPU with the CFS quota (cgroup v1 ``cpu``)."""

    def __init__(self, pid: int, percent: float) -> None:
        super().__init__("cpu", pid)
        (self.path / "cpu.cfs_period_us").write_text("100000")
        (self.path / "cpu.cfs_quota_us").write_text(str(max(1000, int(percent * 1000))))


# --------------------------------------------------------------------------- nftables


def nft_problem() -> str | None:
    """Why packet-level faults (nftables on loopback) cannot be used here, or None (probed by
    creating and deleting a table)."""
    nft = shutil.which("nft")
    if nft is None:
        return "nftables is not installed (apt-get install nftables)"
    name = f"electfsm_probe_{uuid.uuid4().hex[:8]}"
    made = subprocess.run([nft, "add", "table", "inet", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"nft cannot create a table here: {made.stderr.strip()[:200]}"
    subprocess.run([nft, "delete", "table", "inet", name], capture_output=True)
    return None


class PacketFilter:
    """nftables rules on loopback for one test, in a table of its own (removed on close).

    Only TCP packets to or from the given 127.0.0.1 ports are touched::

        with PacketFilter() as pf:
            pf.drop(port, direction="from_server")          # answers lost (half-open)
            pf.drop(port, direction="both", percent=20)     # 20 % packet loss
    """

    def __init__(self) -> None:
        nft = shutil.which("nft")
        if nft is None:
            raise RuntimeError("nftables is not installed")
        self.nft = nft
        self.table = f"electfsm_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self._run("add", "table", "inet", self.table)
        self._run("add", "chain", "inet", self.table, "out",
                  "{ type filter hook output priority 0; policy accept; }")

    def _run(self, *args: str) -> None:
        subprocess.run([self.nft, *args], check=True, capture_output=True, text=True)

    def drop(self, port: int, *, direction: str = "both", percent: int = 100) -> None:
        """Drop packets of connections to ``port``: ``to_server`` (packets to it),
        ``from_server`` (packets from it) or ``both``; ``percent`` of them at random."""
        matches = {"to_server": [["dport"]], "from_server": [["sport"]],
                   "both": [["dport"], ["sport"]]}[direction]
        for (field,) in matches:
            rule = ["add", "rule", "inet", self.table, "out", "ip", "daddr", "127.0.0.1",
                    "tcp", field, str(port)]
            if percent < 100:
                rule += ["numgen", "random", "mod", "100", "<", str(percent)]
            self._run(*rule, "drop")

    def flush(self) -> None:
        self._run("flush", "chain", "inet", self.table, "out")

    def close(self) -> None:
        subprocess.run([self.nft, "delete", "table", "inet", self.table], capture_output=True)

    def __enter__(self) -> PacketFilter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- etcd helpers


def alive_leases(client: EtcdClient, leases: Sequence[int]) -> list[int]:
    """Those of ``leases`` etcd still knows (TTL > 0)."""
    out = []
    for lease in leases:
        try:
            if int(client.time_to_live(lease).TTL) > 0:
                out.append(lease)
        except EtcdError:
            continue
    return out


def leases_in(history: Sequence[dict[str, Any]]) -> set[int]:
    """Every lease a candidate logged (session grants and terms)."""
    out: set[int] = set()
    for ev in history:
        if ev.get("kind") == "enter_leader" and ev.get("lease"):
            out.add(int(ev["lease"]))
        elif ev.get("kind") == "transition" and ev.get("trigger") == "session_up":
            reason = str(ev.get("reason", ""))
            if reason.startswith("lease "):
                with contextlib.suppress(ValueError):
                    out.add(int(reason.split()[1], 16))
    return out


# --------------------------------------------------------------------------- the lab


class Lab:
    """One scenario's world on loopback: candidates behind fault proxies, a fenced resource,
    an etcd recorder and a harness log; :meth:`finish` runs the checker.

    ``endpoints`` are the etcd client endpoints (one member or a cluster). Names under
    ``name/`` are this lab's: the election ``name/election``, the guarded set ``name/set``.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, endpoints: Sequence[str],
                 name: str, ttl: int = 2, margin: float | None = None,
                 call_timeout: float = 0.5, work_interval: float = 0.1,
                 auth: Auth | None = None) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.endpoints = list(endpoints)
        self.name = name
        self.election = f"{name}/election"
        self.guarded_set = f"{name}/set"
        self.ttl = ttl
        self.margin = margin
        self.call_timeout = call_timeout
        self.work_interval = work_interval
        self.log = EventLog(str(self.dir / "harness.jsonl"), inc=None)
        self.resource = FencedResource(log_path=str(self.dir / "resource.jsonl"))
        self.recorder = checker.EtcdRecorder(self.endpoints, f"{name}/",
                                             path=str(self.dir / "etcd.jsonl"), auth=auth)
        self.client = EtcdClient(self.endpoints, timeout=2.0, auth=auth)
        self.candidates: list[CandidateProcess] = []
        self.links: dict[str, Link] = {}
        self.faults: list[dict[str, Any]] = []
        self._started = False
        self._finished = False
        self.report: checker.Report | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Lab:
        self.resource.start()
        self.recorder.start()
        self._started = True
        return self

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def terminate_all(self, timeout: float = 10.0) -> None:
        """SIGTERM every live candidate at once, then wait for each (SIGKILL at ``timeout``)."""
        for c in self.candidates:
            c.send(signal.SIGCONT)
            c.send(signal.SIGTERM)
        deadline = clock.now() + timeout
        for c in self.candidates:
            with contextlib.suppress(Exception):
                c.terminate(timeout=max(0.1, deadline - clock.now()))

    def close(self) -> None:
        """Stop every candidate (SIGKILL if it does not stop), proxy, recorder, resource."""
        self.terminate_all(timeout=5)
        for link in self.links.values():
            link.stop()
        with contextlib.suppress(Exception):
            self.recorder.stop()
        self.resource.stop()
        self.client.close()
        self.log.close()

    # ------------------------------------------------------------------ candidates
    def spawn(self, identity: str, *, proxied: bool = True,
              endpoints: Sequence[str] | None = None, **kwargs: Any) -> CandidateProcess:
        """Start a candidate process. With ``proxied`` it talks to etcd through its own
        :class:`Link` (``lab.links[identity]``); extra ``kwargs`` go to
        :class:`CandidateProcess` (``ttl``, ``faketime``, ``stall`` …)."""
        targets = list(endpoints or self.endpoints)
        if proxied:
            targets = self.link_for(identity, targets).endpoints
        kwargs.setdefault("ttl", self.ttl)
        kwargs.setdefault("margin", self.margin)
        kwargs.setdefault("call_timeout", self.call_timeout)
        kwargs.setdefault("work_interval", self.work_interval)
        n = sum(1 for c in self.candidates if c.identity == identity)
        while (self.dir / f"{identity}.{n}.jsonl").exists():  # never append to an old log
            n += 1
        c = CandidateProcess(identity=identity, endpoints=targets, election=self.election,
                             log_path=self.dir / f"{identity}.{n}.jsonl",
                             fenced=self.resource.endpoint, guarded_set=self.guarded_set,
                             harness_log=self.log, **kwargs)
        self.candidates.append(c)
        c.start()
        self.log.write("spawned", inc=c.inc, identity=identity, pid=c.pid)
        return c

    def link(self, identity: str) -> Link:
        return self.links[identity]

    def link_for(self, identity: str, endpoints: Sequence[str] | None = None) -> Link:
        """The candidate's link, made now if it has none yet (to set a fault before it
        connects)."""
        link = self.links.get(identity)
        if link is None:
            link = Link([FaultProxy(ep).start() for ep in (endpoints or self.endpoints)])
            self.links[identity] = link
        return link

    def wait_etcd(self, predicate: Callable[[dict[str, Any]], bool], timeout: float
                  ) -> dict[str, Any] | None:
        """The first recorded etcd event for which ``predicate`` holds (polls)."""
        deadline = clock.now() + timeout
        seen = 0
        while True:
            records = self.recorder.records
            for rec in records[seen:]:
                if rec.get("kind") == "etcd_event" and predicate(rec):
                    return rec
            seen = len(records)
            if clock.now() > deadline:
                return None
            time.sleep(0.005)

    def candidate_keys(self) -> list[dict[str, Any]]:
        """The election's candidate keys in etcd now."""
        prefix = (self.election + "/").encode()
        resp = self.client.range(prefix, prefix_end(prefix))
        return [checker._kv_json(kv) for kv in resp.kvs]

    def live(self) -> list[CandidateProcess]:
        return [c for c in self.candidates if c.alive]

    def leaders(self) -> list[CandidateProcess]:
        """Live candidates whose log says they lead now."""
        return [c for c in self.live() if c.current_term() is not None]

    def wait_leader(self, timeout: float = 10.0, *, exclude: Sequence[CandidateProcess] = (),
                    after: float | None = None) -> CandidateProcess:
        """The first live candidate (not in ``exclude``) that leads, with a term begun at or
        after ``after``; raises AssertionError on timeout."""
        deadline = clock.now() + timeout
        while True:
            for c in self.live():
                if c in exclude:
                    continue
                term = c.current_term()
                if term is not None and (after is None or event_time(term) >= after):
                    return c
            if clock.now() > deadline:
                states = {c.identity: c.state for c in self.candidates}
                raise AssertionError(f"no leader within {timeout}s: {states}")
            time.sleep(0.02)

    def settle(self, timeout: float = 10.0) -> CandidateProcess:
        """Wait until exactly one live candidate leads, every other follows, and each has
        its candidate key in etcd (its campaign transaction went through)."""
        deadline = clock.now() + timeout
        while True:
            live = self.live()
            leaders = [c for c in live if c.current_term() is not None]
            if len(leaders) == 1 and all(c.state == "follower" for c in live
                                         if c is not leaders[0]):
                try:
                    keyed = {k["value"] for k in self.candidate_keys()}
                except EtcdError:
                    keyed = set()
                if {c.identity for c in live} <= keyed:
                    return leaders[0]
            if clock.now() > deadline:
                states = {c.identity: c.state for c in live}
                raise AssertionError(f"not settled within {timeout}s: {states}")
            time.sleep(0.02)

    # ------------------------------------------------------------------ faults
    def note(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self.log.write(kind, **fields)

    @contextlib.contextmanager
    def fault(self, name: str, **details: Any) -> Iterator[dict[str, Any]]:
        """Log ``fault_start`` before the block and ``fault_end`` after it; the yielded dict
        gets ``start`` and ``end`` (monotonic)."""
        rec: dict[str, Any] = {"name": name, **details}
        rec["start"] = self.log.write("fault_start", name=name, **details)["mono"]
        try:
            yield rec
        finally:
            rec["end"] = self.log.write("fault_end", name=name)["mono"]
            self.faults.append(rec)

    # ------------------------------------------------------------------ the end
    def history(self) -> list[dict[str, Any]]:
        paths = [c.log_path for c in self.candidates] + [str(self.dir / "harness.jsonl")]
        return checker.load_history(paths)

    def finish(self, *, bounded: bool = True, heals: Sequence[tuple[float, float]] = (),
               quiet: Sequence[tuple[float, float]] = (),
               stepdowns: Sequence[tuple[float, float]] = (),
               leaks: bool = True, settled: tuple[float, float] | None = None,
               expect: Sequence[str] = ()) -> checker.Report:
        """Stop every live candidate cleanly (SIGTERM), then check every property.

        With ``leaks``: once all stopped, no candidate key and none of their leases may be
        left in etcd (L5). ``settled = (t, bound)``: the last fault healed at ``t``, so
        from then until now every live candidate must know etcd's leader within ``bound``
        (L2). ``expect`` names the properties this run exercises: each fails if it checked
        nothing (``n/a``). The etcd recorder must catch up with etcd (property H)."""
        self.note("finishing")
        self.terminate_all(timeout=10)
        for link in self.links.values():
            link.pass_through()
        self.recorder.sync(5)
        history = self.history()
        keys: list[str] | None = None
        leases: list[int] | None = None
        if leaks:
            keys, leases = self._leftovers(history)
        caught_up = self.recorder.sync(10)
        resource = [w.to_json() for w in self.resource.writes]
        etcd = self.recorder.history(self.election)
        final = self._final_set()
        self.report = checker.check(
            history, resource=resource, etcd=etcd, guarded_set=self.guarded_set,
            final_set=final, bounded=bounded, heals=heals, quiet=quiet, stepdowns=stepdowns,
            leftover_keys=keys, leftover_leases=leases, settled=settled,
            etcd_caught_up=caught_up)
        self.report.require(*expect)
        (self.dir / "report.md").write_text(self.report.markdown() + "\n")
        self._finished = True
        return self.report

    def _leftovers(self, history: Sequence[dict[str, Any]]) -> tuple[list[str], list[int]]:
        """Keys and leases our candidates left (waits out a lease that a killed candidate or
        a lost revoke left behind: those expire within the TTL)."""
        prefix = (self.election + "/").encode()
        known = leases_in(history)
        deadline = clock.now() + self.ttl + 3.0
        keys: list[str] = []
        leases: list[int] = []
        while True:
            try:
                resp = self.client.range(prefix, prefix_end(prefix))
                keys = [bytes(kv.key).decode() for kv in resp.kvs]
                leases = alive_leases(self.client, sorted(known))
            except EtcdError:
                pass
            if (not keys and not leases) or clock.now() > deadline:
                return keys, leases
            time.sleep(0.1)

    def _final_set(self) -> dict[str, dict[str, Any]] | None:
        prefix = (self.guarded_set + "/").encode()
        for _ in range(20):
            try:
                resp = self.client.range(prefix, prefix_end(prefix))
            except EtcdError:
                time.sleep(0.25)
                continue
            return {bytes(kv.key).decode(): checker._kv_json(kv) for kv in resp.kvs}
        return None


# --------------------------------------------------------------------------- peer partitions


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the TCP socket 127.0.0.1:local_port -> 127.0.0.1:remote_port."""
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[2] == want_remote:
                    return int(parts[9])
    except (OSError, IndexError, ValueError):
        return None
    return None


def _owner(inode: int, pids: dict[int, int]) -> int | None:
    """Which of ``pids`` (pid -> member index) holds the socket ``inode``."""
    target = f"socket:[{inode}]"
    for pid, index in pids.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return index
    return None


class _PeerProxy:
    """Forwards one member's peer port; drops connections between isolated members.

    It finds which member dialled each connection from the socket's owner in ``/proc``, so
    it can cut member ``i`` off from the others in both directions even though every member
    dials the same advertised URLs.
    """

    def __init__(self, net: PeerNetwork, index: int, listen_port: int, upstream_port: int
                 ) -> None:
        self.net = net
        self.index = index
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self._sock = socket.create_server(("127.0.0.1", listen_port))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[tuple[socket.socket, socket.socket], int | None] = {}
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True,
                             name=f"peerproxy-{listen_port}")
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            src = self.net.dialer(int(addr[1]), self.listen_port)
            if self.net.cut(src, self.index):
                _rst(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port),
                                                    timeout=1.0)
            except OSError:
                _rst(client)
                continue
            with self._lock:
                self._conns[(client, upstream)] = src
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True,
                                 name=f"peerproxy-{self.listen_port}-conn")
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            for s in (a, b):
                s.setblocking(False)
            while not self._stop.is_set():
                with self._lock:
                    if (a, b) not in self._conns:
                        return
                r, _, _ = select.select([a, b], [], [], 0.05)
                for s in r:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    out = peers[s]
                    out.setblocking(True)
                    out.settimeout(2.0)
                    out.sendall(data)
                    out.setblocking(False)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.pop((a, b), None)
            _rst(a)
            _rst(b)

    def cut_now(self) -> None:
        """RST every open connection that the current partition forbids."""
        with self._lock:
            doomed = [(a, b) for (a, b), src in self._conns.items()
                      if self.net.cut(src, self.index)]
            for pair in doomed:
                self._conns.pop(pair, None)
        for a, b in doomed:
            _rst(a)
            _rst(b)

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(1.0)


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


class PeerNetwork:
    """Which members may talk to which; shared by the peer proxies of one cluster."""

    def __init__(self, members: Sequence[LocalEtcd]) -> None:
        self.isolated: set[int] = set()
        self.members = members
        self.proxies: list[_PeerProxy] = []

    def dialer(self, local_port: int, proxy_port: int) -> int | None:
        """The member that dialled from ``local_port`` to ``proxy_port`` (None: unknown)."""
        for _ in range(5):
            pids = {m.pid: i for i, m in enumerate(self.members) if m.pid is not None}
            inode = _socket_inode(local_port, proxy_port)
            if inode is not None:
                owner = _owner(inode, pids)
                if owner is not None:
                    return owner
            time.sleep(0.005)
        return None

    def cut(self, src: int | None, dst: int) -> bool:
        """Whether traffic dialled by ``src`` to ``dst`` is cut (while a partition is on,
        a connection whose dialer is unknown is cut too)."""
        if not self.isolated:
            return False
        if src is None:
            return True
        return src != dst and (dst in self.isolated or src in self.isolated)


class PartitionableCluster:
    """A 3-member (``size``) etcd cluster whose peer traffic passes through proxies, so one
    member can be cut off from the others (:meth:`isolate`) while clients still reach it.

    ::

        with PartitionableCluster() as cluster:
            cluster.isolate(0)          # member 0 loses its peers: a minority of one
            cluster.heal()
    """

    def __init__(self, size: int = 3, *, extra_args: Sequence[str] = ()) -> None:
        self.size = size
        binary = find_etcd_binary()
        token = f"electfsm-part-{uuid.uuid4().hex[:10]}"
        self._real = [free_port() for _ in range(size)]
        self._adv = [free_port() for _ in range(size)]
        clients = [free_port() for _ in range(size)]
        names = [f"part-{i}" for i in range(size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, self._adv,
                                                                        strict=True))
        self.members = [
            LocalEtcd(binary=binary, name=names[i], client_port=clients[i],
                      peer_port=self._adv[i], initial_cluster=initial,
                      extra_args=(f"--initial-cluster-token={token}",
                                  f"--listen-peer-urls=http://127.0.0.1:{self._real[i]}",
                                  *extra_args))
            for i in range(size)
        ]
        self.net = PeerNetwork(self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> PartitionableCluster:
        self.net.proxies = [_PeerProxy(self.net, i, self._adv[i], self._real[i])
                            for i in range(self.size)]
        errors: list[BaseException] = []

        def boot(m: LocalEtcd) -> None:
            try:
                m.start(timeout)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(m,)) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def isolate(self, index: int) -> None:
        """Cut member ``index`` off from every other member, both ways."""
        self.net.isolated = {index}
        for p in self.net.proxies:
            p.cut_now()

    def heal(self) -> None:
        self.net.isolated = set()

    def leader_index(self) -> int | None:
        for i, m in enumerate(self.members):
            if m.pid is None:
                continue
            c = EtcdClient([m.endpoint], timeout=0.5)
            try:
                st = c.status()
                if st.leader and st.leader == st.header.member_id:
                    return i
            except EtcdError:
                continue
            finally:
                c.close()
        return None

    def wait_for_leader(self, timeout: float = 10.0, exclude: Sequence[int] = ()) -> int:
        deadline = clock.now() + timeout
        while clock.now() < deadline:
            i = self.leader_index()
            if i is not None and i not in exclude:
                return i
            time.sleep(0.05)
        raise TimeoutError(f"no etcd leader (outside {list(exclude)}) within {timeout}s")

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop()
        for p in self.net.proxies:
            p.stop()

    def __enter__(self) -> PartitionableCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- the runner

#: fault kind -> (weight, (min, max) duration in seconds; None: fixed by the kind)
KINDS: dict[str, tuple[int, tuple[float, float] | None]] = {
    "kill": (3, (1.0, 3.0)),            # SIGKILL a candidate, restart it after the duration
    "leader_kill": (3, (1.0, 3.0)),     # SIGKILL whoever leads
    "pause_short": (2, None),           # SIGSTOP 0.3 x TTL (within the margin: no churn)
    "pause_long": (3, (3.0, 5.0)),      # SIGSTOP past the TTL (S6)
    "stall": (1, None),                 # the leader's work holds the GIL 2 x TTL (S7)
    "blackhole": (3, (1.0, 4.0)),       # the candidate's links hang (S3)
    "half_open": (3, (1.0, 4.0)),       # answers lost, requests land (S10)
    "reset": (2, (0.5, 3.0)),           # RST + refuse (S4)
    "latency": (2, (2.0, 4.0)),         # 50 +- 20 ms each way (S20)
    "resign": (2, None),                # SIGUSR1 to the leader (resign + proclaim)
    "member_kill": (2, (1.0, 3.0)),     # SIGKILL an etcd member, restart it (S13)
    "raft_leader_kill": (2, (1.0, 3.0)),
    "member_pause": (2, (0.3, 2.0)),    # SIGSTOP an etcd member
    "isolate": (2, (1.0, 3.0)),         # cut a member off from its peers (S12)
    "quorum_loss": (2, (0.5, 3.5)),     # SIGSTOP two members (S15)
    "compact": (1, None),               # compact at the current revision (S23)
    "steady": (2, None),                # no fault for 7 s: checks for churn (L3)
    # --- kinds added after the first runs (CLASSIC_KINDS draws the schedules of before)
    "leader_half_open": (2, (3.0, 5.0)),  # half-open on the leader's link: it must step
                                        # down and free its lease (L4)
    # stale attempts: what P2, P3 and P8 exist for
    "pause_write": (2, None),           # the leader's GC pause after the term check, before
                                        # its fenced write (P2: the resource must refuse it)
    "pause_txn": (2, None),             # the same inside fenced_txn (P3: etcd's fence)
    "stale_control": (2, None),         # the leader paused past its lease, then its resign
                                        # and proclaim with the old term (P8)
    # clock-rate skew of the leader's elector, then its link cut (the margin's tolerance)
    "clock_slow": (1, (3.0, 4.0)),
    "clock_fast": (1, (3.0, 4.0)),
    # holes the dispatcher must not have
    "busy_follower": (1, None),         # next in line: a slow hook keeps its dispatcher busy
                                        # while it is elected and its link dies
    "hook_exit": (1, None),             # a leader hook raises SystemExit
    "compact_resign": (1, None),        # the leader, alone, resigns and wins again across
                                        # a compaction
}
#: the kinds of the first chaos runs: ``draw_schedule(..., kinds=CLASSIC_KINDS)`` draws the
#: very schedules a seed drew then (the kinds after them lengthen a schedule's faults)
CLASSIC_KINDS = tuple(list(KINDS)[:list(KINDS).index("leader_half_open")])
#: kinds that act on whoever leads when they fire
LEADER_KINDS = {"leader_kill", "leader_half_open", "resign", "stall", "pause_write",
                "pause_txn", "stale_control", "clock_slow", "clock_fast", "busy_follower",
                "hook_exit", "compact_resign"}
CLIENT_KINDS = {"kill", "pause_short", "pause_long", "blackhole", "half_open", "reset",
                "latency", *LEADER_KINDS}
#: which fault kinds give a property something to check beyond a plain run (the report
#: names them when the property went unexercised)
EXERCISED_BY = {
    "P2": ("pause_write",), "P3": ("pause_txn",), "P4": ("stall", "pause_write"),
    "P8": ("stale_control", "resign"), "L1": tuple(KINDS), "L3": ("steady",),
    "L4": ("leader_half_open",), "L5": ("kill", "leader_kill"),
}
SLACK_ENV = "ELECTFSM_TEST_SLACK"


def slack() -> float:
    """The factor (``$ELECTFSM_TEST_SLACK``, default 1, at least 1) that stretches the part
    of every timing bound paying for scheduling delay on a loaded machine; the physics (a
    TTL) is never scaled."""
    raw = os.environ.get(SLACK_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SLACK_ENV}={raw!r}: expected a number such as 1 or 2.5") from None
    return max(1.0, value)


def draw_schedule(seed: int, seconds: float, candidates: int, *, ttl: int = 2,
                  members: int = 3, kinds: Sequence[str] | None = None
                  ) -> list[dict[str, Any]]:
    """The faults of a run, drawn from ``random.Random(seed)`` alone: the same arguments
    always give the same schedule (``at`` is seconds after the start of the run).
    ``kinds`` draws from those kinds only (default: every kind)."""
    rnd = random.Random(seed)
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    kinds = list(kinds or KINDS)
    weights = [KINDS[k][0] for k in kinds]
    out: list[dict[str, Any]] = []
    t = 3.0
    while True:
        kind = rnd.choices(kinds, weights)[0]
        span = KINDS[kind][1]
        if kind == "pause_short":
            duration = 0.3 * ttl
        elif kind == "stall":
            duration = 2.0 * ttl
        elif kind == "steady":
            duration = 7.0
        elif kind in ("pause_write", "pause_txn", "stale_control", "busy_follower",
                      "hook_exit", "compact_resign"):
            duration = 2.0 * ttl  # roughly: each waits for what it needs
        elif span is None:
            duration = 0.0
        else:
            duration = round(rnd.uniform(*span), 2)
        if t + duration > seconds - 2:
            break
        out.append({"n": len(out), "at": round(t, 2), "kind": kind,
                    "candidate": rnd.randrange(candidates), "member": rnd.randrange(members),
                    "duration": duration})
        t += duration + round(rnd.uniform(1.0, 3.0), 2)
    return out


class _Runner:
    """Executes a schedule against a lab on a partitionable cluster."""

    def __init__(self, lab: Lab, cluster: PartitionableCluster, k: int, ttl: int) -> None:
        self.lab = lab
        self.cluster = cluster
        self.ttl = ttl
        self.names = [f"c{i}" for i in range(k)]
        self.current: dict[str, CandidateProcess] = {}
        self.heals: list[tuple[float, float]] = []
        self.windows: list[tuple[float, float]] = []  # when faults were active
        self.steady: list[tuple[float, float]] = []
        self.half_open: list[tuple[str, float, float]] = []
        self.injected = 0
        self.skipped = 0
        self.by_kind: dict[str, int] = {}

    def spawn(self, name: str) -> None:
        self.current[name] = self.lab.spawn(name, work_interval=0.2)

    def leader(self) -> CandidateProcess | None:
        leaders = self.lab.leaders()
        return leaders[0] if leaders else None

    def _restart_dead(self) -> None:
        for name, c in list(self.current.items()):
            if not c.alive:
                self.spawn(name)

    def run(self, fault: dict[str, Any], started: float) -> None:
        wait = started + float(fault["at"]) - clock.now()
        if wait > 0:
            time.sleep(wait)
        kind, d = fault["kind"], float(fault["duration"])
        name = self.names[fault["candidate"] % len(self.names)]
        member = fault["member"] % len(self.cluster.members)
        print(f"[chaos] t={fault['at']:7.2f} #{fault['n']} {kind} "
              f"{name if kind in CLIENT_KINDS else member} {d:.2f}s", file=sys.stderr,
              flush=True)
        if kind in LEADER_KINDS:
            leader = self.leader()
            if leader is None:
                self.skipped += 1
                self.lab.note("fault_skipped", name=kind, why="nobody leads")
                return
            name = leader.identity
        target = self.current[name]
        with self.lab.fault(kind, n=fault["n"], candidate=name, member=member,
                            duration=d) as rec:
            self._inject(kind, d, name, target, member)
        self.injected += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        client = kind in CLIENT_KINDS
        bound = self.ttl + (0.6 if client else 2.5) * slack()
        self.heals.append((rec["end"], bound))
        self.windows.append((rec["start"], rec["end"]))
        if kind == "steady":
            self.steady.append((rec["start"], rec["end"]))
        if kind in ("half_open", "leader_half_open"):
            self.half_open.append((target.inc, rec["start"], rec["end"]))

    def _inject(self, kind: str, d: float, name: str, target: CandidateProcess,
                member: int) -> None:
        lab, cluster = self.lab, self.cluster
        link = lab.link(name)
        if kind in ("kill", "leader_kill"):
            target.kill()
            time.sleep(d)
            self.spawn(name)
        elif kind in ("pause_short", "pause_long"):
            target.pause()
            time.sleep(d)
            target.resume()
        elif kind == "stall":
            target.stall()
            time.sleep(d)
        elif kind in ("blackhole", "half_open", "leader_half_open", "latency", "reset"):
            if kind == "blackhole":
                link.blackhole()
            elif kind in ("half_open", "leader_half_open"):
                link.drop_responses()
            elif kind == "latency":
                link.latency(0.05, 0.02)
            else:
                link.refuse()
                link.reset()
            time.sleep(d)
            link.pass_through()
        elif kind == "resign":
            target.resign()
        elif kind in ("member_kill", "raft_leader_kill"):
            if kind == "raft_leader_kill":
                member = cluster.leader_index() or member
            m = cluster.members[member]
            m.kill()
            time.sleep(d)
            self._start_member(m)
        elif kind == "member_pause":
            cluster.members[member].pause()
            time.sleep(d)
            cluster.members[member].resume()
        elif kind == "isolate":
            cluster.isolate(member)
            time.sleep(d)
            cluster.heal()
        elif kind == "quorum_loss":
            lost = [m for i, m in enumerate(cluster.members) if i != member]
            for m in lost:
                m.pause()
            time.sleep(d)
            for m in lost:
                m.resume()
        elif kind == "compact":
            try:
                rev = int(lab.client.status().header.revision)
                lab.client.compact(rev)
            except EtcdError as exc:
                lab.note("fault_failed", name=kind, error=str(exc)[:200])
        elif kind == "steady":
            time.sleep(d)
        elif kind in ("pause_write", "pause_txn"):
            since = clock.now()
            if kind == "pause_write":
                target.pause_before_write()
            else:
                target.pause_in_txn()
            act = "fenced_write" if kind == "pause_write" else "guarded_append"
            if target.wait_for(lambda ev: ev["kind"] == act and bool(ev.get("stale_attempt")),
                               15 * slack(), after=since) is None:
                lab.note("fault_failed", name=kind, why="no stale attempt was made")
        elif kind == "stale_control":
            self._stale_control(target)
        elif kind in ("clock_slow", "clock_fast"):
            target.skew_clock("slow" if kind == "clock_slow" else "fast")
            link.blackhole()
            time.sleep(d)
            link.pass_through()
            target.skew_clock("true")
        elif kind == "busy_follower":
            self._busy_follower(target)
        elif kind == "hook_exit":
            target.hook_exit()
            target.resign()  # the exit_leader hook raises
            time.sleep(2.0)
            # the process is restarted whatever its elector became (stopped or running)
            target.terminate(timeout=5)
            self.spawn(name)
        elif kind == "compact_resign":
            self._compact_resign(target)
        self._restart_dead()

    def _stale_control(self, target: CandidateProcess) -> None:
        """Pause the leader past its lease; once another term leads, resume it and have it
        send its resign and proclaim with the old term."""
        target.pause()
        try:
            self.lab.wait_leader(timeout=(self.ttl + 6) * slack(), exclude=[target])
        except AssertionError:
            self.lab.note("fault_failed", name="stale_control", why="nobody took over")
            target.resume()
            return
        target.resume()
        since = clock.now()
        target.stale_control()
        target.wait_for(lambda ev: ev["kind"] == "control" and ev.get("op") == "proclaim",
                        10 * slack(), after=since - 0.05)

    def _busy_follower(self, leader: CandidateProcess) -> None:
        """The follower next in line gets a slow hook (its dispatcher sleeps ``stall``
        seconds), the leader resigns so it is elected while busy, and its link dies so its
        session is lost before the dispatcher gets to the ``elected``."""
        try:
            keys = sorted(self.lab.candidate_keys(), key=lambda kv: kv["create_revision"])
        except EtcdError:
            keys = []
        order = [kv["value"] for kv in keys]
        nxt = next((self.current[x] for x in order[1:] if x in self.current
                    and self.current[x].alive), None)
        if nxt is None or not order or order[0] != leader.identity:
            self.lab.note("fault_failed", name="busy_follower", why="no follower next in line")
            return
        link = self.lab.link(nxt.identity)
        nxt.slow_hook()
        time.sleep(0.1)
        leader.resign()
        time.sleep(0.3)  # its campaign sees the key go and confirms itself first
        link.blackhole()
        time.sleep(self.ttl + 1.5)
        link.pass_through()
        time.sleep(2.0)

    def _compact_resign(self, leader: CandidateProcess) -> None:
        """Everyone else paused until their keys are gone, so the leader is alone; it
        resigns and, while it wins again, etcd compacts its history."""
        others = [c for c in self.current.values() if c is not leader and c.alive]
        for c in others:
            c.pause()
        try:
            deadline = clock.now() + (self.ttl + 6) * slack()
            while clock.now() < deadline:
                with contextlib.suppress(EtcdError):
                    if {kv["value"] for kv in self.lab.candidate_keys()} <= {leader.identity}:
                        break
                time.sleep(0.1)
            since = clock.now()
            leader.resign()
            for _ in range(3):
                with contextlib.suppress(EtcdError):
                    self.lab.client.compact(int(self.lab.client.status().header.revision))
                time.sleep(0.1)
            leader.wait_for(lambda ev: ev["kind"] == "enter_leader", 10 * slack(),
                            after=since)
        finally:
            for c in others:
                c.resume()

    def _start_member(self, m: LocalEtcd) -> None:
        for _ in range(3):
            try:
                m.start(30)
                return
            except RuntimeError as exc:
                self.lab.note("member_restart_failed", error=str(exc)[:300])
                time.sleep(1)


def _quiet_windows(windows: Sequence[tuple[float, float]], steady: Sequence[tuple[float, float]],
                   settle: float) -> list[tuple[float, float]]:
    """Steady-state windows: a ``steady`` pseudo-fault, from ``settle`` seconds after the
    previous real fault ended."""
    out = []
    for a, b in steady:
        before = [e for s, e in windows if e <= a and (s, e) not in steady]
        start = max([a, *[e + settle for e in before]])
        if b - start >= 0.5:
            out.append((start, b))
    return out


def run_chaos(*, seed: int, seconds: float, candidates: int = 5,
              out: str | os.PathLike[str] = "chaos-out", ttl: int = 2,
              dry_run: bool = False, kinds: Sequence[str] | None = None) -> checker.Report:
    """One randomized run; writes the history, schedule and report into ``out``."""
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    schedule = draw_schedule(seed, seconds, candidates, ttl=ttl, kinds=kinds)
    with open(outdir / "schedule.jsonl", "w", encoding="utf-8") as f:
        for fault in schedule:
            f.write(json.dumps(fault) + "\n")
    if dry_run:
        return checker.Report(results=[], metrics={"seed": seed, "faults": len(schedule)})
    wall = clock.now()
    with PartitionableCluster() as cluster:
        lab = Lab(outdir / "lab", endpoints=cluster.endpoints, name=f"chaos-{seed}", ttl=ttl)
        lab.start()
        try:
            runner = _Runner(lab, cluster, candidates, ttl)
            for name in runner.names:
                runner.spawn(name)
            lab.settle(timeout=20)
            started = clock.now()
            for fault in schedule:
                runner.run(fault, started)
            lab.note("healed")
            cluster.heal()
            for link in lab.links.values():
                link.pass_through()
            for m in cluster.members:
                if m.pid is None:
                    runner._start_member(m)
            runner._restart_dead()
            end = clock.now()
            heals = [*runner.heals, (end, ttl + 2.5 * slack())]
            try:
                lab.wait_leader(timeout=ttl + 5 * slack())
            except AssertionError as exc:
                lab.note("no_final_leader", error=str(exc))
            # L2: every candidate must know who leads within this bound of the last heal;
            # stay up long enough after it for the check to have a window
            aware = ttl + 2.5 * slack()
            time.sleep(aware + 1.5)
            stepdowns = _half_open_stepdowns(lab.history(), runner.half_open, ttl)
            quiet = _quiet_windows(runner.windows, runner.steady, settle=ttl + 2.5 * slack())
            report = lab.finish(heals=heals, quiet=quiet, stepdowns=stepdowns,
                                settled=(end, aware))
        finally:
            lab.close()
    history = lab.history()
    with open(outdir / "history.jsonl", "w", encoding="utf-8") as f:
        for ev in history:
            f.write(json.dumps(ev) + "\n")
    report.metrics.update({
        "seed": seed, "seconds": seconds, "candidates": candidates, "ttl": ttl,
        "faults": runner.injected, "faults_skipped": runner.skipped,
        "faults_by_kind": dict(sorted(runner.by_kind.items())),
        "wall_seconds": round(clock.now() - wall, 1),
        "violations": len(report.violations),
        "unexercised": {name: [k for k in EXERCISED_BY.get(name, ()) if k not in runner.by_kind]
                        for name in report.unexercised},
    })
    (outdir / "report.md").write_text(
        f"# chaos run, seed {seed}\n\n{report.summary()}\n\n{report.markdown()}\n")
    (outdir / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _half_open_stepdowns(history: Sequence[dict[str, Any]],
                         half_open: Sequence[tuple[str, float, float]], ttl: int
                         ) -> list[tuple[float, float]]:
    """L4: a leader that stepped down during a half-open fault on its link must have freed
    its lease: someone leads within TTL + 0.6 s of the step-down."""
    out = []
    for inc, a, b in half_open:
        for ev in history:
            if (ev.get("inc") == inc and ev.get("kind") == "exit_leader"
                    and ev.get("ended_by") == "session_lost" and a <= checker.t_of(ev) <= b):
                out.append((checker.t_of(ev), ttl + 0.6))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m electfsm.chaos", description=__doc__.split(
        "\n\n")[0] if __doc__ else None)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--out", default=None, help="output directory (default chaos-<seed>)")
    p.add_argument("--dry-run", action="store_true", help="only draw and write the schedule")
    p.add_argument("--kinds", default=None,
                   help="draw only these fault kinds (comma-separated); default: all")
    args = p.parse_args(argv)
    out = args.out or f"chaos-{args.seed}"
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    report = run_chaos(seed=args.seed, seconds=args.minutes * 60, candidates=args.candidates,
                       out=out, ttl=args.ttl, dry_run=args.dry_run, kinds=kinds)
    m = report.metrics
    print(f"seed {m.get('seed')}: {m.get('faults')} faults, {m.get('transitions', 0)} "
          f"transitions, {m.get('terms', 0)} terms, "
          f"{len(report.violations)} violations -> {out}/report.md")
    if report.violations:
        print(report.summary())
    if report.unexercised:
        print("unexercised (n/a): " + ", ".join(
            f"{name} (fault kinds that did not run: {kinds or 'none listed'})"
            for name, kinds in report.metrics["unexercised"].items()))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
