"""What etcd itself did: :class:`EtcdRecorder` watches the election's prefix for the whole
run, and :class:`EtcdHistory` answers who led at any revision."""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from etcd3.etcdrpc import kv_pb2

from electfsm import clock
from electfsm.chaos.records import INF, t_of
from electfsm.errors import EtcdError, WatchCompacted
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.etcd.security import Auth
from electfsm.sources.campaign import is_candidate_key

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
