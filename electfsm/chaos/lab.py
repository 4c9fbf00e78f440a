"""The lab: candidate processes on etcd behind fault links, a fenced resource and an etcd
recorder; it injects faults on demand and checks every property at the end
(:meth:`Lab.finish`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from electfsm import clock
from electfsm.chaos import checker
from electfsm.chaos.faults import Link
from electfsm.chaos.fenced import FencedResource
from electfsm.chaos.process import CandidateProcess
from electfsm.chaos.protocol import EventLog, event_time
from electfsm.chaos.recorder import _kv_json
from electfsm.errors import EtcdError
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.etcd.security import Auth
from electfsm.testing.faultproxy import FaultProxy

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
        :class:`~electfsm.chaos.faults.Link` (``lab.links[identity]``); extra ``kwargs`` go to
        :class:`~electfsm.chaos.process.CandidateProcess` (``ttl``, ``faketime``, ``stall`` …)."""
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
        return [_kv_json(kv) for kv in resp.kvs]

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
        # the longest TTL any candidate ran with: a killed one's key lives that long
        ttl = max([self.ttl, *(c.ttl for c in self.candidates)])
        deadline = clock.now() + ttl + 3.0
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
            return {bytes(kv.key).decode(): _kv_json(kv) for kv in resp.kvs}
        return None
