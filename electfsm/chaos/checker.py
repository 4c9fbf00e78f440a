"""The safety checker: properties P1-P8 and liveness L1-L5 over recorded histories.

Inputs are plain JSON records, so tests can feed synthetic histories:

- candidate events (see :mod:`electfsm.chaos.candidate`), merged from every candidate's log, and
  harness events (``killed``, ``fault`` …) in the same list;
- the fenced resource's writes (``resource_write`` records, :mod:`electfsm.chaos.fenced`);
- the etcd history of the election and guarded-set prefixes, recorded by
  :class:`EtcdRecorder` (``etcd_snapshot`` and ``etcd_event`` records), as an
  :class:`EtcdHistory`.

::

    from electfsm.chaos import checker

    history = checker.load_history(["a.jsonl", "b.jsonl", "harness.jsonl"])
    report = checker.check(history, resource=writes, etcd=checker.EtcdHistory(records,
                           election="e"), guarded_set="e-set", ttl=2, bounded=True)
    assert report.ok, report.markdown()

Every property is a pure function (``p1_token_monotonicity(...)`` …) that returns a
:class:`Result`; ``check`` runs them all. A property with nothing to check says ``n/a``,
which :attr:`Report.ok` lets pass; a run names the properties it means to exercise with
:meth:`Report.require`, and those fail when they are ``n/a``::

    report.require("P2", "P3", "P8")   # a run that checked no stale attempt fails

Times are the harness's monotonic clock:
``recv_mono`` when a reader stamped the line (``faketime`` candidates), else ``mono``.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
from etcd3.etcdrpc import kv_pb2

from electfsm import clock
from electfsm.errors import EtcdError, WatchCompacted
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.etcd.security import Auth
from electfsm.machine import legal
from electfsm.sources.campaign import is_candidate_key

__all__ = [
    "EtcdHistory",
    "EtcdRecorder",
    "Report",
    "Result",
    "TermSpan",
    "check",
    "load_history",
    "terms_of",
]

INF = float("inf")
#: kinds of candidate events that are leader actions (they carry ``start`` or are one)
ACTS = ("work", "fenced_write", "guarded_append")


# --------------------------------------------------------------------------- records


def t_of(ev: dict[str, Any]) -> float:
    """The harness time of an event."""
    return float(ev.get("recv_mono", ev["mono"]))


def real_time(ev: dict[str, Any], value: float) -> float:
    """A monotonic instant ``value`` of the event's own clock, on the harness clock."""
    if "recv_mono" not in ev:
        return value
    rate = float(ev.get("clock_rate", 1.0)) or 1.0
    return float(ev["recv_mono"]) + (value - float(ev["mono"])) / rate


def load_history(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every complete JSON line of ``paths``, sorted by harness time (stable per file)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and "mono" in rec:
                        out.append(rec)
        except FileNotFoundError:
            continue
    out.sort(key=t_of)
    return out


@attrs.define
class Result:
    """The verdict on one property. ``status``: ``pass``, ``fail`` or ``n/a`` (nothing to
    check, or the inputs it needs were not given)."""

    name: str
    title: str
    status: str = "pass"
    details: list[str] = attrs.field(factory=list)
    metrics: dict[str, Any] = attrs.field(factory=dict)
    checked: int = 0

    def fail(self, detail: str) -> None:
        self.status = "fail"
        if len(self.details) < 50:
            self.details.append(detail)

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def finish(self) -> Result:
        if self.status == "pass" and self.checked == 0:
            self.status = "n/a"
        return self


@attrs.define
class Report:
    results: list[Result]
    metrics: dict[str, Any] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def violations(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def __getitem__(self, name: str) -> Result:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def require(self, *names: str) -> Report:
        """Fail each named property that checked nothing (``n/a``): a run that meant to
        exercise it did not. Unknown names raise KeyError. Returns the report."""
        for name in names:
            r = self[name]
            if r.status == "n/a":
                r.status = "fail"
                r.details.append("expected to be exercised, but the run gave it nothing to "
                                 "check (n/a)")
        return self

    @property
    def unexercised(self) -> list[str]:
        """The properties that checked nothing in this run."""
        return [r.name for r in self.results if r.status == "n/a"]

    def markdown(self) -> str:
        lines = ["| property | status | checked | details |", "|---|---|---|---|"]
        for r in self.results:
            detail = "; ".join(r.details[:3]).replace("|", "\\|")
            if r.metrics:
                m = ", ".join(f"{k}={_fmt(v)}" for k, v in r.metrics.items())
                detail = f"{m}; {detail}" if detail else m
            lines.append(f"| {r.name} {r.title} | {r.status} | {r.checked} | {detail} |")
        if self.metrics:
            lines += ["", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in self.metrics.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "metrics": self.metrics,
                "results": [attrs.asdict(r) for r in self.results]}

    def summary(self) -> str:
        bad = [f"{r.name}: {r.details[:2]}" for r in self.violations]
        return "all properties hold" if not bad else "VIOLATIONS: " + "; ".join(bad)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------- terms


@attrs.define
class TermSpan:
    """One term of one candidate incarnation, on the harness clock.

    ``end`` is when the candidate could last have acted as leader: the earliest of its
    ``exit_leader``, the monitor seeing ``is_leader`` turn false, its death, and the latest
    deadline it logged for the term.
    """

    inc: str
    identity: str
    token: int
    key: str
    lease: int
    start: float
    deadline: float = -INF
    exit_at: float = INF
    invalid_at: float = INF
    death_at: float = INF
    ended_by: str | None = None
    elected_revision: int | None = None
    #: the deadline the term had when on_enter_leader began
    enter_deadline: float | None = None
    acts: list[dict[str, Any]] = attrs.field(factory=list)

    @property
    def end(self) -> float:
        return min(self.exit_at, self.invalid_at, self.death_at, max(self.deadline, self.start))

    @property
    def known_end(self) -> float:
        """When the process itself knew the term was over (exit hook or monitor)."""
        return min(self.exit_at, self.invalid_at)


def terms_of(history: Sequence[dict[str, Any]]) -> list[TermSpan]:
    """Every term in ``history`` (candidate events + ``killed`` harness events)."""
    open_terms: dict[str, TermSpan] = {}
    spans: list[TermSpan] = []
    elected_rev: dict[str, int] = {}
    deaths: dict[str, float] = {}
    for ev in history:
        if ev.get("kind") == "killed" and "inc" in ev:
            deaths.setdefault(ev["inc"], t_of(ev))
    for ev in history:
        inc, kind = ev.get("inc"), ev.get("kind")
        if inc is None or kind is None:
            continue
        t = t_of(ev)
        span = open_terms.get(inc)
        if kind == "transition" and ev.get("trigger") == "elected":
            if "revision" in ev:
                elected_rev[inc] = int(ev["revision"])
        elif kind == "enter_leader":
            span = TermSpan(inc=inc, identity=str(ev.get("identity", inc)),
                            token=int(ev["token"]), key=str(ev["key"]),
                            lease=int(ev.get("lease", 0)), start=t,
                            deadline=real_time(ev, float(ev.get("deadline", -INF))),
                            death_at=deaths.get(inc, INF),
                            elected_revision=elected_rev.pop(inc, None))
            span.enter_deadline = span.deadline if "deadline" in ev else None
            open_terms[inc] = span
            spans.append(span)
        elif span is not None and ev.get("token") == span.token:
            if kind in ("renew", "work") and "deadline" in ev:
                span.deadline = max(span.deadline, real_time(ev, float(ev["deadline"])))
            if kind in ACTS:
                span.acts.append(ev)
                if "deadline" in ev:
                    span.deadline = max(span.deadline, real_time(ev, float(ev["deadline"])))
            elif kind == "invalid":
                span.invalid_at = min(span.invalid_at, t)
            elif kind == "exit_leader":
                span.exit_at = t
                span.ended_by = ev.get("ended_by")
                del open_terms[inc]
        elif kind in ACTS and ev.get("token") is not None:
            # an act of a term that is already closed: keep it for P4
            for old in reversed(spans):
                if old.inc == inc and old.token == ev.get("token"):
                    old.acts.append(ev)
                    break
    spans.sort(key=lambda s: s.start)
    return spans


def overlap(spans: Sequence[TermSpan]) -> tuple[float, list[tuple[str, str, float]]]:
    """Total time at least two different terms were acting, and the overlapping pairs."""
    points: list[tuple[float, int, int]] = []
    for i, s in enumerate(spans):
        if s.end > s.start:
            points += [(s.start, 1, i), (s.end, -1, i)]
    points.sort(key=lambda p: (p[0], p[1]))
    active: set[int] = set()
    total, last = 0.0, None
    for t, step, i in points:
        if last is not None and len(active) >= 2:
            total += t - last
        if step == 1:
            active.add(i)
        else:
            active.discard(i)
        last = t
    pairs: list[tuple[str, str, float]] = []
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if b.start >= a.end:
                continue
            both = min(a.end, b.end) - max(a.start, b.start)
            if both > 0 and (a.inc, a.token) != (b.inc, b.token):
                pairs.append((f"{a.inc}@{a.token}", f"{b.inc}@{b.token}", both))
    return total, pairs


# --------------------------------------------------------------------------- etcd history


class EtcdHistory:
    """What etcd did under a prefix, from :class:`EtcdRecorder` records: the state at any
    revision, who led the election, and when (harness time) each change was seen."""

    def __init__(self, records: Iterable[dict[str, Any]], *, election: str) -> None:
        records = list(records)
        self.election = election
        self.prefix = (election + "/").encode()
        self.start_revision: int | None = None
        self.events: list[dict[str, Any]] = []
        self.gaps: list[tuple[int, int]] = []
        initial: list[dict[str, Any]] = []
        for rec in records:
            kind = rec.get("kind")
            if kind == "etcd_snapshot" and self.start_revision is None:
                self.start_revision = int(rec["rev"])
                initial = list(rec.get("kvs", []))
            elif kind == "etcd_event":
                self.events.append(rec)
            elif kind == "etcd_gap":
                self.gaps.append((int(rec["from"]), int(rec["to"])))
        self.events.sort(key=lambda e: int(e["rev"]))
        self._initial = {kv["key"]: kv for kv in initial}
        # per key: revisions and the kv after them (None: deleted)
        self._key_revs: dict[str, list[int]] = defaultdict(list)
        self._key_vals: dict[str, list[dict[str, Any] | None]] = defaultdict(list)
        self._deleted_at: dict[tuple[str, int], float] = {}
        for key, kv in self._initial.items():
            self._key_revs[key].append(self.start_revision or 0)
            self._key_vals[key].append(kv)
        # leader timeline: revisions at which the leader changed
        self._lead_revs: list[int] = []
        self._lead_vals: list[dict[str, Any] | None] = []
        self._lead_times: list[float] = []
        self._now = -INF  # harness time of the record being applied
        for rec in records:
            if rec.get("kind") == "etcd_snapshot" and "mono" in rec:
                self._now = t_of(rec)
                break
        cands = {k: kv for k, kv in self._initial.items() if self._is_candidate(k)}
        self._push_leader(self.start_revision or 0, cands)
        for ev in self.events:
            key, rev = ev["key"], int(ev["rev"])
            if "mono" in ev:
                self._now = t_of(ev)
            if ev["type"] == "DELETE":
                before = self.kv_at(key, rev - 1)
                if before is not None:
                    self._deleted_at[(key, int(before["create_revision"]))] = t_of(ev)
                self._key_revs[key].append(rev)
                self._key_vals[key].append(None)
                if self._is_candidate(key):
                    cands.pop(key, None)
                    self._push_leader(rev, cands)
            else:
                kv = {k: ev[k] for k in ("key", "create_revision", "mod_revision", "lease",
                                         "value") if k in ev}
                self._key_revs[key].append(rev)
                self._key_vals[key].append(kv)
                if self._is_candidate(key):
                    cands[key] = kv
                    self._push_leader(rev, cands)

    def _is_candidate(self, key: str) -> bool:
        return is_candidate_key(self.prefix, key.encode())

    def _push_leader(self, rev: int, cands: dict[str, dict[str, Any]]) -> None:
        lead = min(cands.values(), key=lambda kv: int(kv["create_revision"])) if cands else None
        if self._lead_vals:
            prev = self._lead_vals[-1]
            same = (prev is None and lead is None) or (
                prev is not None and lead is not None and prev["key"] == lead["key"]
                and prev["create_revision"] == lead["create_revision"])
            if same:
                return
        self._lead_revs.append(rev)
        self._lead_vals.append(dict(lead) if lead else None)
        self._lead_times.append(self._now)

    def leader_timeline(self) -> list[tuple[float, dict[str, Any] | None]]:
        """``(harness time the recorder saw it, leader kv or None)`` at each change."""
        return list(zip(self._lead_times, self._lead_vals, strict=True))

    def covers(self, rev: int) -> bool:
        """Whether the recorded history knows the state at ``rev``."""
        if self.start_revision is None or rev < self.start_revision:
            return False
        return not any(a <= rev <= b for a, b in self.gaps)

    def kv_at(self, key: str, rev: int) -> dict[str, Any] | None:
        revs = self._key_revs.get(key)
        if not revs:
            return None
        i = bisect.bisect_right(revs, rev) - 1
        return self._key_vals[key][i] if i >= 0 else None

    def leader_at(self, rev: int) -> dict[str, Any] | None:
        i = bisect.bisect_right(self._lead_revs, rev) - 1
        return self._lead_vals[i] if i >= 0 else None

    def deleted_at(self, key: str, create_revision: int) -> float | None:
        """Harness time the recorder saw that incarnation of ``key`` deleted, if it was."""
        return self._deleted_at.get((key, create_revision))

    def final(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every key under ``prefix`` alive at the end of the history."""
        out: dict[str, dict[str, Any]] = {}
        for key, vals in self._key_vals.items():
            if key.startswith(prefix) and vals and vals[-1] is not None:
                out[key] = vals[-1]
        return out

    def touches(self, key: str, after_rev: int) -> list[dict[str, Any]]:
        return [ev for ev in self.events if ev["key"] == key and int(ev["rev"]) > after_rev]


def _kv_json(kv: Any) -> dict[str, Any]:
    return {"key": bytes(kv.key).decode("utf-8", "backslashreplace"),
            "create_revision": int(kv.create_revision), "mod_revision": int(kv.mod_revision),
            "lease": int(kv.lease), "value": bytes(kv.value).decode("utf-8", "backslashreplace")}


class EtcdRecorder:
    """Records every change under ``prefix`` (a snapshot, then a watch) as JSON records.

    ::

        with EtcdRecorder(endpoints, "run-1/", path="etcd.jsonl") as rec:
            ...                                      # run the scenario
        history = EtcdHistory(rec.records, election="run-1/election")

    A broken stream is re-opened from the next revision on; a compacted one is recorded as
    an ``etcd_gap`` (checks needing those revisions then say ``n/a``).
    """

    def __init__(self, endpoints: Sequence[str], prefix: str, *, path: str | None = None,
                 timeout: float = 2.0, auth: Auth | None = None) -> None:
        self.prefix = prefix.encode()
        self._client = EtcdClient(list(endpoints), timeout=timeout, auth=auth)
        self._path = path
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.revision = 0
        self._stop = threading.Event()
        self._watch: Any = None
        self._ready = threading.Event()
        self._out: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="etcd-recorder")

    def _emit(self, rec: dict[str, Any]) -> None:
        rec.setdefault("mono", clock.now())
        with self._lock:
            self.records.append(rec)
            if self._out is not None:
                self._out.write(json.dumps(rec) + "\n")

    def start(self) -> EtcdRecorder:
        if self._path is not None:
            self._out = open(self._path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the etcd recorder could not read etcd within 15 s")
        return self

    def _snapshot(self) -> None:
        resp = self._client.range(self.prefix, prefix_end(self.prefix))
        self.revision = int(resp.header.revision)
        self._emit({"kind": "etcd_snapshot", "rev": self.revision,
                    "kvs": [_kv_json(kv) for kv in resp.kvs]})

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._snapshot()
                break
            except EtcdError:
                self._stop.wait(0.2)
        self._ready.set()
        while not self._stop.is_set():
            try:
                watch = self._client.watch(self.prefix, prefix_end(self.prefix),
                                           start_revision=self.revision + 1)
                self._watch = watch
                if self._stop.is_set():
                    watch.cancel()
                    return
                for resp in watch:
                    for ev in resp.events:
                        kv = _kv_json(ev.kv)
                        kind = "DELETE" if ev.type == kv_pb2.Event.DELETE else "PUT"
                        self._emit({"kind": "etcd_event", "type": kind,
                                    "rev": int(ev.kv.mod_revision), **kv})
                    self.revision = max(self.revision, int(resp.header.revision))
            except WatchCompacted as exc:
                before = self.revision
                try:
                    self._snapshot_after_gap(before, exc)
                except EtcdError:
                    self._stop.wait(0.2)
            except EtcdError:
                self._stop.wait(0.1)

    def _snapshot_after_gap(self, before: int, exc: WatchCompacted) -> None:
        resp = self._client.range(self.prefix, prefix_end(self.prefix))
        now = int(resp.header.revision)
        self._emit({"kind": "etcd_gap", "from": before + 1, "to": now,
                    "why": str(exc)[:200]})
        # re-state every key as a PUT at the new revision so the state stays right
        alive = {kv.key for kv in resp.kvs}
        with self._lock:
            known = {r["key"] for r in self.records if r.get("kind") == "etcd_event"}
        for kv in resp.kvs:
            self._emit({"kind": "etcd_event", "type": "PUT", "rev": int(kv.mod_revision),
                        **_kv_json(kv)})
        for key in known - {bytes(k).decode("utf-8", "backslashreplace") for k in alive}:
            self._emit({"kind": "etcd_event", "type": "DELETE", "rev": now, "key": key,
                        "create_revision": 0, "mod_revision": now, "lease": 0, "value": ""})
        self.revision = now

    def wait_until(self, revision: int, timeout: float = 5.0) -> bool:
        """Wait until events up to ``revision`` were recorded."""
        deadline = clock.now() + timeout
        while self.revision < revision:
            if clock.now() > deadline:
                return False
            time.sleep(0.02)
        return True

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until everything etcd has now is recorded; False if it was not in
        ``timeout``. It writes a marker key under the prefix (``<prefix>.recorded``) and
        waits for its event: the watch delivers in revision order, so once the marker is
        recorded so is every earlier change (a range's header revision would not do: writes
        outside the prefix raise it, and the watch says nothing about those)."""
        deadline = clock.now() + timeout
        while True:
            try:
                resp = self._client.put(self.prefix + b".recorded", str(time.time()).encode())
                rev = int(resp.header.revision)
                break
            except EtcdError:
                if clock.now() > deadline:
                    return False
                time.sleep(0.1)
        return self.wait_until(rev, max(0.1, deadline - clock.now()))

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.cancel()
        self._thread.join(5)
        self._client.close()
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> EtcdRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def history(self, election: str) -> EtcdHistory:
        with self._lock:
            return EtcdHistory(list(self.records), election=election)


# --------------------------------------------------------------------------- properties


def p1_token_monotonicity(spans: Sequence[TermSpan]) -> Result:
    """Tokens of successive terms (ordered by start) strictly increase."""
    r = Result("P1", "token monotonicity")
    last: TermSpan | None = None
    for s in spans:
        r.checked += 1
        if last is not None and s.token <= last.token:
            r.fail(f"term {s.inc}@{s.token} began at {s.start:.3f} after "
                   f"{last.inc}@{last.token} (began {last.start:.3f}): token not increasing")
        last = s
    tokens = [s.token for s in spans]
    dupes = {t for t in tokens if tokens.count(t) > 1}
    for t in sorted(dupes):
        r.fail(f"token {t} was used by more than one term")
    return r.finish()


def p2_no_stale_fenced_write(writes: Sequence[dict[str, Any]],
                             history: Sequence[dict[str, Any]] = (),
                             spans: Sequence[TermSpan] | None = None) -> Result:
    """The resource never accepted a token below the highest it had accepted; every write a
    candidate saw accepted is in the resource's log as accepted (an empty log with accepted
    writes fails); with ``spans``, every accepted write came from a candidate that held
    that token. ``checked`` counts the resource's writes; the metrics say how many stale
    attempts (writes sent after a pause that followed the term check) there were and how
    many writes the resource rejected as stale."""
    r = Result("P2", "no stale fenced write accepted")
    highest = 0
    stale_rejected = 0
    accepted_keys: set[tuple[int, str, int]] = set()
    for w in sorted(writes, key=lambda w: float(w["mono"])):
        r.checked += 1
        token = int(w["token"])
        if w.get("accepted"):
            if token < highest:
                r.fail(f"resource accepted token {token} from {w.get('identity')} at "
                       f"{float(w['mono']):.3f} after accepting {highest}")
            highest = max(highest, token)
            payload = w.get("payload") or {}
            if isinstance(payload, dict):
                accepted_keys.add((token, str(payload.get("inc")), int(payload.get("n", -1))))
        elif token < highest:
            stale_rejected += 1
    seen_accepted = [ev for ev in history
                     if ev.get("kind") == "fenced_write" and ev.get("result") == "accepted"]
    if seen_accepted and not writes:
        r.fail(f"candidates saw {len(seen_accepted)} fenced writes accepted, but the "
               "resource's log is empty: nothing to cross-check them against")
    elif writes:
        for ev in seen_accepted:
            key = (int(ev["token"]), str(ev.get("inc")), int(ev.get("n", -1)))
            if key not in accepted_keys:
                r.fail(f"{ev.get('inc')} saw write {key} accepted; the resource has no "
                       "such accepted write")
    if spans is not None:
        held = {(s.inc, s.token) for s in spans}
        for token, inc, n in sorted(accepted_keys):
            if (inc, token) not in held:
                r.fail(f"the resource accepted write {n} of {inc} with token {token}, a "
                       "token that candidate never held")
    attempts = [ev for ev in history
                if ev.get("kind") == "fenced_write" and ev.get("stale_attempt")]
    r.metrics = {"accepted": sum(1 for w in writes if w.get("accepted")),
                 "stale_attempts": len(attempts),
                 "stale_attempts_rejected": sum(1 for ev in attempts
                                                if ev.get("result") == "rejected"),
                 "stale_rejected": stale_rejected}
    return r.finish()


def p3_no_lost_guarded_updates(history: Sequence[dict[str, Any]], etcd: EtcdHistory | None,
                               guarded_set: str | None,
                               final: dict[str, dict[str, Any]] | None = None) -> Result:
    """Every acknowledged guarded append is in the final state; every committed append was
    written while its token's key led the election; appends refused as "not leader" left
    nothing behind."""
    r = Result("P3", "no lost guarded updates")
    if guarded_set is None or (etcd is None and final is None):
        return r.finish()
    prefix = guarded_set + "/"
    state = final if final is not None else etcd.final(prefix) if etcd is not None else {}
    acks = unknown = refused = stale_attempts = stale_refused = 0
    for ev in history:
        if ev.get("kind") != "guarded_append":
            continue
        key, result = str(ev["key"]), ev.get("result")
        r.checked += 1
        if ev.get("stale_attempt"):
            stale_attempts += 1
            stale_refused += result == "not_leader"
        if result == "ack":
            acks += 1
            kv = state.get(key)
            if kv is None:
                r.fail(f"acknowledged append {key} (token {ev['token']}) is lost")
            elif json.loads(kv["value"]).get("token") != ev["token"]:
                r.fail(f"acknowledged append {key} holds another token: {kv['value']}")
        elif result == "not_leader":
            refused += 1
            if key in state:
                r.fail(f"append {key} was refused as not leader, yet it is in etcd")
        else:
            unknown += 1
    if etcd is not None:
        for key, kv in state.items():
            r.checked += 1
            rev = int(kv["create_revision"])
            try:
                token = int(json.loads(kv["value"])["token"])
            except (ValueError, KeyError, TypeError):
                r.fail(f"{key} holds an unreadable value {kv['value']!r}")
                continue
            if not etcd.covers(rev):
                continue
            lead = etcd.leader_at(rev)
            if lead is None or int(lead["create_revision"]) != token:
                who = f"{lead['key']}@{lead['create_revision']}" if lead else "nobody"
                r.fail(f"{key} (token {token}) committed at revision {rev} while {who} led")
    r.metrics = {"acknowledged": acks, "ambiguous": unknown, "refused": refused,
                 "stale_attempts": stale_attempts, "stale_refused_by_etcd": stale_refused,
                 "final_entries": len(state)}
    return r.finish()


def p4_no_work_after_deadline(spans: Sequence[TermSpan]) -> Result:
    """No leader hook and no leader action began after its term's deadline, exit hook, or
    loss of validity."""
    r = Result("P4", "no leader work after the local deadline")
    for s in spans:
        r.checked += 1
        if s.enter_deadline is not None and s.start > s.enter_deadline:
            r.fail(f"{s.inc}@{s.token}: on_enter_leader ran at {s.start:.3f}, "
                   f"{s.start - s.enter_deadline:.3f}s after the term's deadline")
        for act in s.acts:
            r.checked += 1
            began = real_time(act, float(act["start"])) if "start" in act else t_of(act)
            limit = s.known_end
            if "deadline" in act:
                limit = min(limit, real_time(act, float(act["deadline"])))
            if began > limit:
                r.fail(f"{s.inc}@{s.token}: {act['kind']} began at {began:.3f}, "
                       f"{began - limit:.3f}s after the term ended (deadline/exit)")
    return r.finish()


def p5_no_overlap(spans: Sequence[TermSpan], etcd: EtcdHistory | None = None,
                  *, bounded: bool = True, watch_slack: float = 0.5) -> Result:
    """No two terms acted at once, and no term outlived its key in etcd (under bounded
    faults; otherwise the window is reported, not failed).

    A term's end is capped by its deadline, so a key that expired on time never trips the
    second check; a key deleted before the deadline (revoked, deleted by hand, etcd's
    mass revocation) reaches the leader only through its watch, which gets
    ``watch_slack`` seconds to notice.
    """
    r = Result("P5", "no dual-leader window" + ("" if bounded else " (reported only)"))
    total, pairs = overlap(spans)
    r.checked = len(spans)
    outlived: list[str] = []
    if etcd is not None:
        for s in spans:
            gone = etcd.deleted_at(s.key, s.token)
            if gone is None:
                continue
            if s.end > gone + watch_slack:
                outlived.append(f"{s.inc}@{s.token} acted until {s.end:.3f}, "
                                f"{s.end - gone:.3f}s after etcd deleted its key")
    r.metrics = {"dual_leader_window": round(total, 4),
                 "max_overlap": round(max((p[2] for p in pairs), default=0.0), 4),
                 "terms_outliving_key": len(outlived)}
    notes = [f"{a} and {b} overlapped {d:.3f}s" for a, b, d in pairs] + outlived
    if bounded:
        for n in notes:
            r.fail(n)
    else:
        r.details.extend(notes[:20])
    return r.finish()


def p6_no_phantom_leadership(spans: Sequence[TermSpan], etcd: EtcdHistory | None) -> Result:
    """At the revision that confirmed it, each leader's key existed with its lease and had
    the lowest create revision of the election. A term that logged no confirming revision,
    or whose revision the recorded history does not cover, fails: it cannot be verified."""
    r = Result("P6", "no phantom leadership")
    if etcd is None:
        return r.finish()
    unverifiable = 0
    for s in spans:
        rev = s.elected_revision
        r.checked += 1
        if rev is None:
            unverifiable += 1
            r.fail(f"{s.inc}@{s.token} logged no revision confirming its election")
            continue
        if not etcd.covers(rev):
            unverifiable += 1
            r.fail(f"{s.inc}@{s.token} was confirmed at revision {rev}, which the recorded "
                   "etcd history does not cover")
            continue
        kv = etcd.kv_at(s.key, rev)
        if kv is None:
            r.fail(f"{s.inc} became leader with {s.key} confirmed at revision {rev}, "
                   "but the key did not exist then")
            continue
        if int(kv["create_revision"]) != s.token or int(kv.get("lease", 0)) != s.lease:
            r.fail(f"{s.inc}: at revision {rev} {s.key} was created at "
                   f"{kv['create_revision']} with lease {kv.get('lease')}, not token "
                   f"{s.token} lease {s.lease}")
        lead = etcd.leader_at(rev)
        if lead is None or lead["key"] != s.key:
            r.fail(f"{s.inc}: at revision {rev} the leader was "
                   f"{lead['key'] if lead else 'nobody'}, not {s.key}")
    r.metrics = {"unverifiable": unverifiable}
    return r.finish()


def p7_legal_transitions(history: Sequence[dict[str, Any]]) -> Result:
    """Each incarnation's transitions chain from ``disconnected`` along the table; the
    leader hooks pair with the transitions into and out of leader; hooks never overlap and
    all run on one thread."""
    r = Result("P7", "only legal transitions")
    per_inc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in history:
        if "inc" in ev and ev.get("kind") in ("transition", "enter_leader", "exit_leader",
                                               "leader_change", "error"):
            per_inc[ev["inc"]].append(ev)
    for inc, evs in per_inc.items():
        state = "disconnected"
        threads = {ev["thread"] for ev in evs if "thread" in ev}
        if len(threads) > 1:
            r.fail(f"{inc}: hooks ran on several threads: {sorted(threads)}")
        expect: str | None = None  # "enter_leader" right after a transition into leader
        for ev in evs:
            kind = ev["kind"]
            if ev.get("depth", 1) != 1:
                r.fail(f"{inc}: hook {ev.get('hook')} ran while another hook was running")
            if expect is not None and kind != expect:
                r.fail(f"{inc}: expected {expect} next, got {kind} {ev.get('hook', '')}")
            expect = None
            if kind == "transition":
                r.checked += 1
                src, dst, trig = ev["source"], ev["dest"], ev["trigger"]
                if state == "leader-exiting":
                    if src != "leader":
                        r.fail(f"{inc}: exit_leader was followed by {src} --{trig}--> {dst}")
                    state = "leader"
                elif src == "leader" and state == "leader":
                    r.fail(f"{inc}: left leader without an exit_leader hook")
                if src != state:
                    r.fail(f"{inc}: transition {src} --{trig}--> {dst} but the machine was "
                           f"in {state}")
                if legal(src, trig) != dst:
                    r.fail(f"{inc}: {src} --{trig}--> {dst} is not in the transition table")
                if dst == "leader":
                    expect = "enter_leader"
                state = dst
            elif kind == "enter_leader":
                if state != "leader":
                    r.fail(f"{inc}: enter_leader while {state}")
            elif kind == "exit_leader":
                if state != "leader":
                    r.fail(f"{inc}: exit_leader while {state}")
                state = "leader-exiting"  # the transition out of leader is logged next
    return r.finish()


def p8_stale_control_rejected(history: Sequence[dict[str, Any]], spans: Sequence[TermSpan],
                              etcd: EtcdHistory | None, *, window: float = 3.0) -> Result:
    """A resign/proclaim issued with a stale token (a newer term had begun when it was sent)
    never succeeds and never touches the key of a newer term while that term lasts, from
    the moment the request left (``start``). ``checked`` counts stale requests only."""
    r = Result("P8", "stale resign/proclaim rejected")
    controls = 0
    for ev in history:
        if ev.get("kind") != "control" or ev.get("token") is None:
            continue
        controls += 1
        token = int(ev["token"])
        began = real_time(ev, float(ev["start"])) if "start" in ev else t_of(ev)
        t = began
        newer = [s for s in spans if s.token > token and s.start <= began]
        if not newer:
            continue  # not stale
        r.checked += 1
        if ev.get("op") == "proclaim" and ev.get("result") == "applied":
            r.fail(f"{ev['inc']}: stale proclaim with token {token} was applied after "
                   f"token {max(s.token for s in newer)} led")
        if etcd is None:
            continue
        for s in newer:
            for touch in etcd.touches(s.key, s.token):
                tt = t_of(touch)
                if t <= tt < min(s.known_end, t + window) and touch["type"] == "DELETE":
                    r.fail(f"{s.inc}'s key {s.key} was deleted at {tt:.3f} while it led, "
                           f"{tt - t:.3f}s after a stale {ev.get('op')} by {ev['inc']}")
                if (t <= tt < s.known_end and touch["type"] == "PUT"
                        and int(touch.get("create_revision", 0)) == s.token
                        and int(touch["rev"]) != s.token):
                    r.fail(f"{s.inc}'s key {s.key} was overwritten at revision "
                           f"{touch['rev']} after a stale {ev.get('op')} by {ev['inc']}")
    r.metrics = {"controls": controls, "stale": r.checked}
    return r.finish()


def l1_progress(spans: Sequence[TermSpan], heals: Sequence[tuple[float, float]],
                end: float) -> Result:
    """After each heal at ``t`` some term is acting within ``bound`` (``(t, bound)`` pairs)."""
    r = Result("L1", "a leader soon after faults heal")
    delays: list[float] = []
    for t, bound in heals:
        active = [s for s in spans if s.start <= t < s.end]
        later = [s.start for s in spans if s.start >= t]
        first = t if active else min(later, default=INF)
        if first - t > bound and t + bound > end:
            continue  # the history ends before the bound: nothing to say
        r.checked += 1
        delays.append(first - t)
        if first - t > bound:
            r.fail(f"no leader within {bound:.2f}s of the heal at {t:.3f} "
                   f"(first after {first - t:.2f}s)")
    r.metrics = {"max_delay": round(max(delays, default=0.0), 3)}
    return r.finish()


def l2_knows_the_leader(history: Sequence[dict[str, Any]], etcd: EtcdHistory | None,
                        settled: tuple[float, float] | None, until: float) -> Result:
    """After the last fault healed at ``t`` (``settled = (t, bound)``), every live
    candidate's view of the leader (``view`` events: what ``Elector.leader`` said) equals
    etcd's first key within ``bound`` of each change of etcd's leader (or of ``t``), as long
    as that leader lasts longer than ``bound`` and before ``until`` (when the run began to
    stop its candidates). One item per candidate and leader."""
    r = Result("L2", "every live candidate knows who leads")
    if etcd is None or settled is None:
        return r.finish()
    heal, bound = settled
    born: dict[str, float] = {}
    gone: dict[str, float] = {}
    views: dict[str, list[tuple[float, int | None]]] = defaultdict(list)
    for ev in history:
        inc, kind = ev.get("inc"), ev.get("kind")
        if inc is None:
            continue
        t = t_of(ev)
        if kind == "start":
            born.setdefault(inc, t)
        elif kind in ("killed", "stopped", "orphaned"):
            gone[inc] = min(gone.get(inc, INF), t)
        elif kind == "view":
            tok = ev.get("leader_token")
            views[inc].append((t, int(tok) if tok is not None else None))
    timeline = etcd.leader_timeline()
    lags: list[float] = []
    for i, (a, lead) in enumerate(timeline):
        b = timeline[i + 1][0] if i + 1 < len(timeline) else INF
        start, stop = max(a, heal), min(b, until)
        if stop - start <= bound:
            continue
        at = start + bound
        want = int(lead["create_revision"]) if lead is not None else None
        for inc, t0 in born.items():
            if t0 > start or gone.get(inc, INF) <= at:
                continue
            r.checked += 1
            seen = [(t, tok) for t, tok in views[inc] if t <= at]
            have = seen[-1][1] if seen else None
            if have != want:
                who = f"{lead['key']}@{want}" if lead else "nobody"
                r.fail(f"{inc} still saw token {have} {bound:.2f}s after etcd's leader "
                       f"became {who} (at {start:.3f})")
                continue
            first = next((t for t, tok in reversed(seen) if tok != want), None)
            caught = next((t for t, tok in seen if tok == want and (first is None
                                                                    or t > first)), at)
            lags.append(max(0.0, caught - start))
    r.metrics = {"max_lag": round(max(lags, default=0.0), 3)}
    return r.finish()


def history_complete(caught_up: bool | None) -> Result:
    """The etcd recorder caught up with etcd before the checks ran (``None``: not asked)."""
    r = Result("H", "etcd history recorded to the end")
    if caught_up is None:
        return r.finish()
    r.checked = 1
    if not caught_up:
        r.fail("the etcd recorder had not caught up with etcd's revision when the run "
               "ended: the properties over etcd's history would check a prefix of it")
    return r.finish()


def l3_no_churn(history: Sequence[dict[str, Any]], quiet: Sequence[tuple[float, float]]
                ) -> Result:
    """No transition at all during windows without faults (steady state)."""
    r = Result("L3", "no churn in steady state")
    moves = [ev for ev in history if ev.get("kind") == "transition"]
    for a, b in quiet:
        r.checked += 1
        inside = [ev for ev in moves if a <= t_of(ev) <= b]
        if inside:
            ev = inside[0]
            r.fail(f"{len(inside)} transition(s) in the quiet window {a:.2f}-{b:.2f}, e.g. "
                   f"{ev['inc']} {ev['source']} --{ev['trigger']}--> {ev['dest']} "
                   f"({ev.get('reason', '')})")
    r.metrics = {"quiet_seconds": round(sum(b - a for a, b in quiet), 2)}
    return r.finish()


def l4_no_stuck_lease(spans: Sequence[TermSpan], stepdowns: Sequence[tuple[float, float]],
                      end: float) -> Result:
    """After a leader steps down at ``t`` (cannot confirm), another term starts within
    ``bound`` (``(t, bound)`` pairs): its lease was not left alive server-side."""
    r = Result("L4", "no stuck lease after a half-open step-down")
    for t, bound in stepdowns:
        nxt = [s.start for s in spans if s.start >= t - 1e-6]
        first = min(nxt, default=INF)
        if first - t > bound and t + bound > end:
            continue
        r.checked += 1
        if first - t > bound:
            r.fail(f"after the step-down at {t:.3f} no new leader within {bound:.2f}s")
    return r.finish()


def l5_no_leaks(history: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None,
                leases: Sequence[int] | None = None, max_threads: int = 8) -> Result:
    """After every candidate stopped: no electfsm thread left, no candidate key and no
    lease left in etcd; while running, the elector's thread count stays bounded."""
    r = Result("L5", "no leaked leases, keys or threads")
    for ev in history:
        if ev.get("kind") == "stopped":
            r.checked += 1
            if ev.get("leftover"):
                r.fail(f"{ev['inc']} left threads running after stop(): {ev['leftover']}")
        elif ev.get("kind") == "stats":
            names = list(ev.get("electfsm_threads", []))
            if (any(x.startswith("electfsm-session[") for x in names)
                    and not any(x.startswith("electfsm-dispatch[") for x in names)):
                r.checked += 1
                r.fail(f"{ev['inc']}'s dispatcher is gone while its session still renews the "
                       f"lease: {names}")
            n = len(names)
            if n > max_threads:
                r.checked += 1
                r.fail(f"{ev['inc']} ran {n} electfsm threads: {ev['electfsm_threads']}")
    if keys is not None:
        r.checked += 1
        if keys:
            r.fail(f"candidate keys left in etcd: {list(keys)[:5]}")
    if leases is not None:
        r.checked += 1
        if leases:
            r.fail(f"leases left in etcd: {[f'{x:x}' for x in list(leases)[:5]]}")
    return r.finish()


# --------------------------------------------------------------------------- all together


def check(history: Sequence[dict[str, Any]], *, resource: Sequence[dict[str, Any]] = (),
          etcd: EtcdHistory | None = None, guarded_set: str | None = None,
          final_set: dict[str, dict[str, Any]] | None = None, bounded: bool = True,
          heals: Sequence[tuple[float, float]] = (), quiet: Sequence[tuple[float, float]] = (),
          stepdowns: Sequence[tuple[float, float]] = (),
          leftover_keys: Sequence[str] | None = None,
          leftover_leases: Sequence[int] | None = None,
          settled: tuple[float, float] | None = None,
          etcd_caught_up: bool | None = None) -> Report:
    """Run every property over one run's records.

    ``settled = (t, bound)``: the last fault healed at ``t``; from then on every live
    candidate must know etcd's leader within ``bound`` (L2), until the harness's
    ``finishing`` note (or the end of the history)."""
    history = sorted(history, key=t_of)
    spans = terms_of(history)
    end = max((t_of(ev) for ev in history), default=0.0)
    until = min((t_of(ev) for ev in history if ev.get("kind") == "finishing"), default=end)
    results = [
        p1_token_monotonicity(spans),
        p2_no_stale_fenced_write(resource, history, spans),
        p3_no_lost_guarded_updates(history, etcd, guarded_set, final_set),
        p4_no_work_after_deadline(spans),
        p5_no_overlap(spans, etcd, bounded=bounded),
        p6_no_phantom_leadership(spans, etcd),
        p7_legal_transitions(history),
        p8_stale_control_rejected(history, spans, etcd),
        l1_progress(spans, heals, end),
        l2_knows_the_leader(history, etcd, settled, until),
        l3_no_churn(history, quiet),
        l4_no_stuck_lease(spans, stepdowns, end),
        l5_no_leaks(history, keys=leftover_keys, leases=leftover_leases),
        history_complete(etcd_caught_up),
    ]
    transitions = sum(1 for ev in history if ev.get("kind") == "transition")
    metrics: dict[str, Any] = {
        "terms": len(spans),
        "transitions": transitions,
        "incarnations": len({ev["inc"] for ev in history if "inc" in ev}),
        "dual_leader_window": results[4].metrics.get("dual_leader_window", 0.0),
        "leaderless_time": round(leaderless(spans, history), 3),
        "fenced_accepted": results[1].metrics.get("accepted", 0),
        "stale_fenced_rejected": results[1].metrics.get("stale_rejected", 0),
        "guarded_acknowledged": results[2].metrics.get("acknowledged", 0),
        "guarded_refused": results[2].metrics.get("refused", 0),
        "stale_controls": results[7].metrics.get("stale", 0),
    }
    return Report(results=results, metrics=metrics)


def leaderless(spans: Sequence[TermSpan], history: Sequence[dict[str, Any]]) -> float:
    """Time between the first term's start and the history's end with no acting term."""
    if not spans:
        return 0.0
    begin = spans[0].start
    end = max(t_of(ev) for ev in history)
    covered, cur_a, cur_b = 0.0, None, None
    for s in sorted(spans, key=lambda s: s.start):
        a, b = s.start, min(s.end, end)
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_a is not None and cur_b is not None:
                covered += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_a is not None and cur_b is not None:
        covered += cur_b - cur_a
    return max(0.0, (end - begin) - covered)
