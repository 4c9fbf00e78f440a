"""The candidate inside its process: an elector whose hooks and transitions are logged, its
leader work (fenced writes, guarded appends), and the faults the lab asks it to inflict on
itself (stalls, GC pauses, stale controls, clock skew, hook faults, the hidden breaks)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from etcd3 import etcdrpc

from electfsm import clock, ops
from electfsm.chaos.fenced import FencedClient
from electfsm.chaos.protocol import (
    PASSWORD_ENV,
    EventLog,
)
from electfsm.dispatcher import Change
from electfsm.elector import Elector
from electfsm.errors import EtcdError, NotLeaderError
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.etcd.security import Auth
from electfsm.events import Event, LeaderInfo, LeaderSeen
from electfsm.sources.campaign import compare_create
from electfsm.sources.session import SessionWatch
from electfsm.term import Term

# --------------------------------------------------------------------------- in the process


class ScaledClock:
    """A clock running ``rate`` times as fast as the package clock (:func:`clock.now`) from
    now on: the clock-rate skew of one process, without ``faketime``. ``real(local)`` maps
    an instant of this clock back onto the package clock (what the logs use)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._real0 = self._local0 = clock.now()

    def __call__(self) -> float:
        with self._lock:
            return self._local0 + (clock.now() - self._real0) * self.rate

    def set_rate(self, rate: float) -> None:
        """Run at ``rate`` from now on (the clock stays continuous)."""
        with self._lock:
            now = clock.now()
            self._local0 += (now - self._real0) * self.rate
            self._real0, self.rate = now, rate

    def real(self, local: float) -> float:
        """When this clock will read ``local``, on the real clock (at the current rate)."""
        if local in (float("inf"), float("-inf")):
            return local
        with self._lock:
            return self._real0 + (local - self._local0) / self.rate


class Candidate:
    """One elector with logging hooks, a monitor thread and leader work (the process's body)."""

    def __init__(self, args: argparse.Namespace, log: EventLog) -> None:
        self.args = args
        self.log = log
        self.mutation: str | None = args.mutation
        auth = None
        if args.user:
            auth = Auth(user=args.user, password=os.environ.get(PASSWORD_ENV, ""))
        self.elector = Elector(endpoints=args.endpoints, election=args.election,
                               identity=args.identity, ttl=args.ttl, margin=args.margin,
                               call_timeout=args.call_timeout, backoff_max=args.backoff_max,
                               auth=auth)
        rate = 0.5 if self.mutation == "P5" else args.clock_rate
        self.clock = ScaledClock(rate)
        # Every deadline of this elector is measured on this clock: the session's safe_until
        # (and the watchdog that fires it) and the terms' validity (the dispatcher's clock).
        # At rate 1 it is the package clock itself.
        e = self.elector
        e._session = SessionWatch(e._client, e.config, clock=self.clock, owner=e)
        e._session.members.append(e._member)  # the elector's own election on it
        e._dispatcher.clock = self.clock
        self._relog = False  # the monitor logs the deadline again (the clock rate changed)
        self._hook_fault: str | None = None  # "slow" | "exit": the next hook's fault
        self.inc = f"{args.identity}#{os.getpid()}"
        self.fenced = FencedClient(args.fenced, timeout=0.5) if args.fenced else None
        self._raw: EtcdClient | None = None
        self._raw_auth = auth
        self._depth = 0
        self._n = 0
        self._depth_lock = threading.Lock()
        self.last_term: Term | None = None
        self._first_token: int | None = None
        self._stall_token: int | None = None  # the term a requested stall belongs to
        self._pause: tuple[int, str] | None = None  # (token, "write" | "txn"): a GC pause
        self._paused_in_txn = False
        self._stall_on_enter = args.stall_on_enter
        self._stopping = threading.Event()
        self._monitor = threading.Thread(target=self._watch_term, daemon=True,
                                         name="candidate-monitor")
        self._wrap_txn()
        self._side: list[grpc.Channel] = []  # mutation L4's second connection
        if self.mutation == "L4":  # a lost lease is not revoked (and see _keep_lost_lease)
            self.elector._session._revoke = False
        if self.mutation == "L2":
            self._deafen()
        self._register()

    def real(self, local: float) -> float:
        """An instant of the elector's clock on the real monotonic clock (what we log)."""
        return self.clock.real(local)

    def _wrap_txn(self) -> None:
        """A requested GC pause inside ``fenced_txn``: after its validity check, before the
        transaction leaves, so the fence etcd applies is all that stands in the way."""
        client = self.elector._client
        send = client.txn

        def txn(compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = (),
                **kwargs: Any) -> Any:
            pause = self._pause
            if kwargs.get("what") == "fenced transaction" and pause is not None \
                    and pause[1] == "txn":
                self._pause = None
                self._paused_in_txn = True
                self._gc_pause(pause[0], "txn")
                if self.mutation == "P3":
                    compare = list(compare)[1:]  # the fence dropped
            return send(compare, success, failure, **kwargs)

        client.txn = txn  # type: ignore[method-assign]

    def _deafen(self) -> None:
        """Mutation L2: the elector hears who leads once, then nothing more of the others
        (views showing its own key first still pass: the stream is how a follower is
        elected, so without them it could never lead)."""
        sub = self.elector._observer
        emit = sub._emit
        heard: list[bool] = []
        dispatcher = self.elector._dispatcher

        def filtered(event: Event) -> None:
            if isinstance(event, LeaderSeen):
                ours = event.leader is not None and event.leader.key == dispatcher.our_key
                if heard and not ours:
                    return
                if event.leader is not None:
                    heard.append(True)
            emit(event)

        sub._emit = filtered

    # ------------------------------------------------------------------ hooks
    def _hook(self, name: str, fn: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            mono, wall = clock.now(), time.time()  # the hook's start, not its end
            with self._depth_lock:
                self._depth += 1
                depth = self._depth
            try:
                fault, self._hook_fault = self._hook_fault, None
                if fault == "slow":  # the dispatcher is kept busy; other threads run
                    self.log.write("stall", phase="begin", where=f"hook {name}",
                                   seconds=self.args.stall, mode="sleep")
                    time.sleep(self.args.stall)
                    self.log.write("stall", phase="end", where=f"hook {name}")
                elif fault == "exit":
                    self.log.write("hook_raised", hook=name, error="SystemExit",
                                   state=self.elector.state)
                    raise SystemExit(3)
                fields = fn(*args)
                if fields:
                    kind = fields.pop("kind")
                    self.log.write(kind, hook=name, thread=threading.current_thread().name,
                                   depth=depth, mono=mono, wall=wall, **fields)
            finally:
                with self._depth_lock:
                    self._depth -= 1
        if self.mutation == "P7" and name == "leader_change":
            def off_thread(*args: Any) -> None:
                t = threading.Thread(target=run, args=args, name="candidate-hook")
                t.start()
                t.join()
            return off_thread
        return run

    def _register(self) -> None:
        e = self.elector
        for state in ("candidate", "follower", "disconnected"):
            getattr(e, f"on_enter_{state}")(self._hook(f"enter_{state}", self._entered))
            getattr(e, f"on_exit_{state}")(self._hook(f"exit_{state}", self._exited))
        e.on_enter_leader(self._hook("enter_leader", self._enter_leader))
        e.on_exit_leader(self._hook("exit_leader", self._exit_leader))
        e.on_leader_change(self._hook("leader_change", self._leader_change))
        e.on_error(self._hook("error", self._error))
        e.run_while_leader(self._work)

    def _transition(self, change: Change) -> dict[str, Any]:
        fields: dict[str, Any] = {"kind": "transition", "source": change.source,
                                  "dest": change.dest, "trigger": change.trigger,
                                  "reason": change.reason}
        if change.trigger == "elected":
            # the revision of the read or event that confirmed our key first (P6)
            dispatcher = self.elector._dispatcher
            revision = int(dispatcher._elected_revision)
            pending = dispatcher._pending
            if self.mutation == "P6" and pending is not None:
                revision = pending.token - 1
            fields["revision"] = revision
        return fields

    def _entered(self, change: Change) -> dict[str, Any]:
        return self._transition(change)

    def _exited(self, change: Change) -> dict[str, Any]:
        if change.dest != "leader":  # logged by the enter hook of the destination
            return {}
        return self._transition(change)

    def _token(self, term: Term) -> int:
        if self.mutation == "P1":
            return self._first_token if self._first_token is not None else term.token
        return term.token

    def _term_fields(self, term: Term) -> dict[str, Any]:
        return {"token": self._token(term), "key": term.key, "lease": term.lease,
                "generation": term.generation, "deadline": self.real(term.deadline)}

    def _enter_leader(self, term: Term) -> dict[str, Any]:
        self.last_term = term
        if self._first_token is None:
            self._first_token = term.token
        fields = {"kind": "enter_leader", **self._term_fields(term)}
        if self._stall_on_enter > 0:
            stall, self._stall_on_enter = self._stall_on_enter, 0.0
            self.log.write("stall", phase="begin", where="enter_leader", token=term.token,
                           seconds=stall, mode=self.args.stall_mode)
            _stall(stall, self.args.stall_mode)
            self.log.write("stall", phase="end", where="enter_leader", token=term.token,
                           valid=term.valid)
        if self.mutation == "L3":
            threading.Timer(1.5, self._churn, args=(term,)).start()
        if self.mutation == "L4" and not self._side:
            self._open_side_channel()
        return fields

    def _churn(self, term: Term) -> None:
        if self.elector.term is term and not self._stopping.is_set():
            self.elector.resign(timeout=2.0)

    def _exit_leader(self, term: Term) -> dict[str, Any]:
        if self.mutation == "L4" and term.ended_by == "session_lost" and self._side:
            threading.Thread(target=self._keep_lost_lease, args=(term.lease,), daemon=True,
                             name="candidate-stale-keepalive").start()
        return {"kind": "exit_leader", "token": self._token(term), "key": term.key,
                "lease": term.lease, "ended_by": term.ended_by}

    def _open_side_channel(self) -> None:
        """Mutation L4: a second connection, made while the link is healthy (a connection
        made through a half-open link never completes its handshake)."""
        channel = grpc.insecure_channel(self.elector.config.hosts[0])
        with contextlib.suppress(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=2)
            self._side.append(channel)
            return
        channel.close()

    def _keep_lost_lease(self, lease: int) -> None:
        """Mutation L4: renew a lease the session gave up, for 3 x TTL, on the side
        connection (on a half-open link the requests still land; nobody reads answers)."""
        end = clock.now() + 3 * self.args.ttl

        def requests() -> Iterator[Any]:
            while clock.now() < end and not self._stopping.is_set():
                yield etcdrpc.LeaseKeepAliveRequest(ID=lease)
                time.sleep(0.2)

        call = etcdrpc.LeaseStub(self._side[0]).LeaseKeepAlive(requests())
        self._stopping.wait(3 * self.args.ttl)
        call.cancel()

    def _leader_change(self, old: LeaderInfo | None, new: LeaderInfo | None
                       ) -> dict[str, Any]:
        return {"kind": "leader_change", "old": old.identity if old else None,
                "new": new.identity if new else None,
                "new_token": new.create_revision if new else None}

    @staticmethod
    def _error(exc: BaseException) -> dict[str, Any]:
        return {"kind": "error", "error": type(exc).__name__, "message": str(exc)[:300]}

    # ------------------------------------------------------------------ leader work
    def _next(self) -> int:
        """A number unique in this process: guarded keys of two terms never collide."""
        with self._depth_lock:
            self._n += 1
            return self._n

    def _leading_token(self) -> int:
        """Mutation P2: the token of whoever leads now, read from etcd."""
        prefix = (self.args.election + "/").encode()
        with contextlib.suppress(EtcdError):
            resp = self._raw_client().range(prefix, prefix_end(prefix))
            return min((int(kv.create_revision) for kv in resp.kvs), default=0)
        return 0

    def _gc_pause(self, token: int, where: str) -> None:
        self.log.write("stall", phase="begin", where=where, token=token,
                       seconds=self.args.stall, mode=self.args.stall_mode)
        _stall(self.args.stall, self.args.stall_mode)
        self.log.write("stall", phase="end", where=where, token=token)

    def _work(self, term: Term) -> None:
        while not term.cancelled.wait(self.args.work_interval):
            if self._stall_token == term.token:
                self._stall_token = None
                self.log.write("stall", phase="begin", where="work", token=term.token,
                               seconds=self.args.stall, mode=self.args.stall_mode)
                _stall(self.args.stall, self.args.stall_mode)
                self.log.write("stall", phase="end", where="work", token=term.token,
                               valid=term.valid)
            if not term.valid and self.mutation != "P4":
                self.log.write("work_refused", token=term.token, remaining=term.remaining())
                continue
            n = self._next()
            self.log.write("work", token=self._token(term), n=n,
                           deadline=self.real(term.deadline))
            if self.fenced is not None:
                self._fenced_write(term, n)
            if self.args.guarded_set:
                self._guarded_append(term, n)

    def _fenced_write(self, term: Term, n: int) -> None:
        assert self.fenced is not None
        if not term.valid and self.mutation != "P4":
            return
        start, deadline = clock.now(), self.real(term.deadline)
        token = self._token(term)
        stale_attempt = False
        pause = self._pause
        if pause is not None and pause[0] == term.token and pause[1] == "write":
            # the classic: the lease was checked, then the process stops the world
            self._pause = None
            self._gc_pause(term.token, "write")
            stale_attempt = True
            if self.mutation == "P2":
                token = max(token, self._leading_token())
        fields: dict[str, Any] = {"token": token, "n": n, "start": start, "deadline": deadline,
                                  "sent": clock.now(), "stale_attempt": stale_attempt}
        try:
            ok = self.fenced.write(token=token, identity=self.args.identity,
                                   payload={"inc": self.inc, "n": n})
        except OSError as exc:
            self.log.write("fenced_write", **fields, result="error", error=str(exc)[:200])
            return
        self.log.write("fenced_write", **fields, result="accepted" if ok else "rejected")

    def _guarded_append(self, term: Term, n: int) -> None:
        if not term.valid and self.mutation != "P4":
            return
        key = f"{self.args.guarded_set}/{self.inc}-{n}"
        value = json.dumps({"token": term.token, "inc": self.inc, "n": n})
        start, deadline = clock.now(), self.real(term.deadline)
        fields: dict[str, Any] = {"token": self._token(term), "n": n, "key": key,
                                  "start": start, "deadline": deadline}
        self._paused_in_txn = False
        try:
            result = self.elector.fenced_txn(success=[ops.put(key, value)])
        except NotLeaderError as exc:
            # stale_attempt: refused by etcd's fence, after the local check had passed
            self.log.write("guarded_append", **fields, result="not_leader",
                           stale_attempt=self._paused_in_txn, error=str(exc)[:200])
            return
        except EtcdError as exc:  # ambiguous: it may or may not have been applied
            self.log.write("guarded_append", **fields, result="unknown",
                           stale_attempt=self._paused_in_txn, error=str(exc)[:200])
            return
        self.log.write("guarded_append", **fields,
                       result="ack" if result.succeeded else "failed",
                       stale_attempt=self._paused_in_txn, revision=result.revision)

    # ------------------------------------------------------------------ monitor
    def _watch_term(self) -> None:
        token: int | None = None
        deadline = float("-inf")
        was_valid = False
        next_stats = 0.0
        view: tuple[str | None, int | None] | None = None
        while not self._stopping.wait(self.args.monitor_interval):
            term = self.elector.term
            now = clock.now()
            if term is not None:
                if term.token != token:
                    token, deadline, was_valid = term.token, float("-inf"), True
                d = term.deadline
                if d > deadline and d != float("inf"):
                    deadline = d
                    self.log.write("renew", token=self._token(term), deadline=self.real(d))
            if self._relog and term is not None:
                self._relog = False
                self.log.write("renew", token=self._token(term),
                               deadline=self.real(term.deadline))
            valid = term is not None and term.valid
            if was_valid and not valid:
                self.log.write("invalid", token=token, state=self.elector.state)
            was_valid = valid
            leader = self.elector.leader  # what the elector says leads (L2)
            seen = (leader.identity, leader.create_revision) if leader else (None, None)
            if seen != view:
                view = seen
                self.log.write("view", leader=seen[0], leader_token=seen[1],
                               state=self.elector.state)
            if now >= next_stats:
                next_stats = now + 1.0
                self.log.write("stats", threads=threading.active_count(),
                               electfsm_threads=_electfsm_threads(),
                               state=self.elector.state)

    # ------------------------------------------------------------------ control
    def request_stall(self) -> None:
        """Stall the work callback of the term that leads now. Asked of a candidate that does
        not lead, it is ignored (logged). The stall is bound to that term's token, so it can
        never fire in a later term, long after the fault that asked for it."""
        term = self.last_term
        if self.elector.state != "leader" or term is None:
            self.log.write("stall_ignored", state=self.elector.state)
            return
        self._stall_token = term.token

    def request_pause(self, where: str) -> None:
        """A GC pause of ``--stall`` seconds in the current term's next action, after its
        validity check and before the write leaves (``write``: the fenced write; ``txn``:
        inside ``fenced_txn``). Ignored (logged) when we do not lead."""
        term = self.last_term
        if self.elector.state != "leader" or term is None:
            self.log.write("stall_ignored", state=self.elector.state, where=where)
            return
        self._pause = (term.token, where)

    def set_clock_rate(self, rate: float) -> None:
        """The elector's clock runs at ``rate`` from now on (a clock-rate skew)."""
        self.clock.set_rate(rate)
        self._relog = True
        self.log.write("clock", rate=rate)

    def arm_hook_fault(self, fault: str) -> None:
        """The next hook (whichever runs next) sleeps (``slow``) or raises SystemExit."""
        self._hook_fault = fault
        self.log.write("hook_fault_armed", fault=fault, state=self.elector.state)

    def _raw_client(self) -> EtcdClient:
        if self._raw is None:
            self._raw = EtcdClient(list(self.elector.config.hosts),
                                   timeout=self.args.call_timeout, auth=self._raw_auth)
        return self._raw

    def _guarded(self, op: str, term: Term) -> None:
        """One resign (guarded delete) or proclaim (guarded put) with ``term``, logged with
        ``start``: the instant the request left."""
        key = term.key.encode()
        guard = [compare_create(key, term.token)]
        if op == "resign":
            req = etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=key))
        else:
            lease = term.lease
            if self.mutation == "P8":
                guard, lease = [], 0
            req = etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                key=key, value=self.args.identity.encode(), lease=lease))
        start = clock.now()
        try:
            resp = self._raw_client().txn(guard, [req], what=f"stale {op}")
            result = "applied" if resp.succeeded else "rejected"
            revision = int(resp.header.revision)
        except EtcdError as exc:
            result, revision = f"error: {str(exc)[:150]}", 0
        self.log.write("control", op=op, token=self._token(term), state=self.elector.state,
                       result=result, revision=revision, start=start)

    def control(self) -> None:
        """Resign, then try a guarded proclaim with the latest term (stale or not)."""
        term = self.last_term
        token = self._token(term) if term is not None else None
        state = self.elector.state
        current = self.elector.term
        self.log.write("control", op="resign", token=token, state=state,
                       current=current is not None and current is term,
                       valid=bool(current is not None and current.valid),
                       start=clock.now())
        self.elector.resign(timeout=2.0)
        self.log.write("control_done", op="resign", token=token, state=self.elector.state)
        if term is None:
            return
        self._guarded("proclaim", term)

    def stale_control(self) -> None:
        """A former leader's resign and proclaim, sent with its last term whatever the
        elector now thinks (as a process paused since then would, before it noticed): etcd's
        guard must refuse both once a newer term leads."""
        term = self.last_term
        if term is None:
            self.log.write("stall_ignored", state=self.elector.state, where="stale_control")
            return
        self._guarded("resign", term)
        self._guarded("proclaim", term)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.log.write("start", election=self.args.election, ttl=self.args.ttl,
                       margin=self.args.margin, endpoints=self.args.endpoints,
                       call_timeout=self.args.call_timeout, clock_rate=self.clock.rate,
                       mutation=self.mutation)
        self._monitor.start()
        self.elector.start()

    def stop(self, *, revoke: bool = True) -> None:
        if self.mutation == "L1":
            revoke = False
        if self.mutation == "L5":
            threading.Thread(target=threading.Event().wait, args=(3600,), daemon=True,
                             name="electfsm-leaked").start()
        self.elector.stop(revoke=revoke)
        self._stopping.set()
        self._monitor.join(2.0)
        if self._raw is not None:
            self._raw.close()
        if self.fenced is not None:
            self.fenced.close()
        self.log.write("stopped", leftover=_electfsm_threads(), state=self.elector.state,
                       transitions=self.elector.transitions)


def _electfsm_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate()
                  if t.name.startswith("electfsm-") and t.is_alive())


def _stall(seconds: float, mode: str) -> None:
    """Stall the calling thread: ``sleep`` (the GIL is released: other threads go on) or
    ``gil`` (busy, never letting another Python thread run: a stop-the-world pause)."""
    end = clock.now() + seconds
    if mode == "sleep":
        time.sleep(seconds)
        return
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds + 5.0)
    try:
        while clock.now() < end:
            pass
    finally:
        sys.setswitchinterval(old)
