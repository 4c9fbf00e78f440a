"""The Elector: one node's candidacy in one election, as an explicit state machine."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from electfsm import clock, logs
from electfsm.config import ElectorConfig, connection
from electfsm.dispatcher import Dispatcher, Telemetry
from electfsm.errors import (
    ConfigError,
    ElectorForkedError,
    ElectorStopped,
    ElectorThreadError,
    EtcdError,
    NotLeaderError,
)
from electfsm.etcd import EtcdClient
from electfsm.etcd.security import TLS, Auth
from electfsm.events import ErrorReported, Event, LeaderInfo, Resign, Stop
from electfsm.hooks import HookMethods, Hooks
from electfsm.machine import State
from electfsm.sources.campaign import compare_create, op_range
from electfsm.sources.observe import Subscription
from electfsm.sources.session import Member, SessionWatch
from electfsm.term import Term

if TYPE_CHECKING:
    from electfsm.sessions import Session

log = logs.logger("electfsm")


@attrs.frozen(kw_only=True)
class TxnResult:
    """What :meth:`Elector.fenced_txn` returns: which branch ran, its ``ResponseOp`` messages,
    and the revision etcd answered at."""

    succeeded: bool
    responses: list[Any]
    revision: int


class Elector(HookMethods):
    """Run for leader in ``election``; fall back to follower; always know who leads.

    ::

        elector = Elector(endpoints=["127.0.0.1:2379"], election="jobs/scheduler",
                          identity="node-a", ttl=5)

        @elector.on_enter_leader
        def start(term):
            print("leading with fencing token", term.token)

        with elector:                      # start(); stop() on the way out
            elector.wait_for("leader", "follower", timeout=10)
            print(elector.state, elector.leader)

    Electors of one process may share a connection: ``client=EtcdClient.connect([...])``
    (the caller closes it after stopping them).

    Three threads (session-watch, campaign, observe) only put events on one queue; one
    dispatcher thread applies them to the machine and runs the hooks, so transitions never
    run concurrently. See :data:`electfsm.machine.TABLE` for every transition.

    ``work_grace`` bounds how long the end of a term (``resign()``, ``stop()``) waits for
    ``run_while_leader`` work to return before our key is released: the next leader's work
    cannot start while ours still runs, unless ours ignores ``term.cancelled`` that long.
    """

    def __init__(self, *, election: str, identity: str | bytes,
                 endpoints: str | Sequence[str] | None = None, ttl: int = 10,
                 margin: float | None = None, call_timeout: float = 2.0,
                 backoff_max: float = 2.0, tls: TLS | None = None, auth: Auth | None = None,
                 client: EtcdClient | None = None, work_grace: float = 5.0,
                 slow_hook: float | None = None, session: Session | None = None) -> None:
        self._pid = os.getpid()
        self._shared = session
        if session is not None:
            if endpoints is not None or tls is not None or auth is not None or client is not None:
                raise ConfigError("with session=, the connection is the session's: pass "
                                  "endpoints/tls/auth/client to Session, not to the Elector")
            sc = session.config
            endpoints, ttl, margin = list(sc.endpoints), sc.ttl, sc.margin
            call_timeout, backoff_max, tls, auth = (sc.call_timeout, sc.backoff_max, sc.tls,
                                                    sc.auth)
            client = session.client
        else:
            endpoints, call_timeout = connection(endpoints, client, tls, auth, call_timeout)
        if not work_grace > 0:
            raise ConfigError(f"work_grace must be a positive number of seconds, got "
                              f"{work_grace!r}")
        self.work_grace = float(work_grace)
        self.config = ElectorConfig(endpoints=endpoints, election=election, identity=identity,
                                    ttl=ttl, margin=margin, call_timeout=call_timeout,
                                    backoff_max=backoff_max, tls=tls, auth=auth)
        self._hooks = Hooks()
        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._owns_client = client is None
        self._client = client if client is not None else EtcdClient.for_config(self.config)
        self._member = Member(config=self.config, emit=self._queue.put, owner=self,
                              on_keepalive=self._renewed)
        if session is not None:
            self._session = session._watch
            session._join(self)
        else:
            self._session = SessionWatch(self._client, self.config, clock=clock.now,
                                         owner=self)
            self._session.members.append(self._member)
        self._observer = Subscription(self._client, self.config.election, self._queue.put,
                                      self.config.backoff_max)
        self._dispatcher = Dispatcher(election=self.config.election, value=self.config.identity,
                                      hooks=self._hooks, effects=_Effects(self),
                                      clock=clock.now)
        self._dispatcher.slow_hook = (self.config.margin_for(self.config.ttl) / 2
                                      if slow_hook is None else slow_hook)
        self._busy_since: float | None = None  # when the dispatcher began the current event
        self.last_renewal: float | None = None  # clock.now() of the last confirmed keepalive
        self._workers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._dispatch, daemon=True,
                                        name=f"electfsm-dispatch[{self.config.election}]")
        self._started = False
        self._stopped = False
        self._revoke = True
        self._stop_by = float("inf")  # when stop(timeout) wants teardown done
        self._torn_down = False
        self._lifecycle = threading.Lock()  # start()/stop() decide under it, once
        self._work_term = threading.local()  # the term a run_while_leader thread works for

    def __repr__(self) -> str:
        return (f"Elector(election={self.config.election!r}, "
                f"identity={self._dispatcher.identity!r}, state={self.state!r})")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Elector:
        """Start the threads. Returns at once: the elector is ``disconnected`` until etcd
        grants a lease, and keeps retrying (with backoff, logging why) while it cannot."""
        self._check_fork()
        with self._lifecycle:
            if self._stopped:
                raise ElectorStopped("this elector was stopped; create a new Elector to run "
                                     "again")
            if not self._started:
                if self._shared is not None:
                    self._shared.start()  # raises ElectorStopped if the session was stopped
                self._thread.start()
                self._observer.start()
                if self._shared is not None:
                    self._session.attach(self._member)
                else:
                    self._session.start()
                self._started = True
        return self

    def stop(self, timeout: float = 10.0, *, revoke: bool = True) -> None:
        """Leave the election: step down (``on_exit_leader`` runs), revoke the lease (which
        deletes our key), and end every thread. Safe to call twice and from a hook.

        ``revoke=False`` stops renewing but leaves the lease to expire on the server, as a
        crashed process would: others take over only after the TTL. The first call decides;
        a second call only waits. On a shared :class:`Session` the lease is the session's and
        lives on: this elector's key is deleted either way (``Session.stop(revoke=False)``
        is the crash there).

        ``timeout`` bounds the whole stop, including the wait for ``run_while_leader`` work
        (at most ``work_grace`` of it). Called from a hook or from ``run_while_leader`` work,
        it only asks: the elector stops once that hook or work has returned.
        """
        self._check_fork()
        with self._lifecycle:
            first = not self._stopped
            if first:
                self._stopped = True
                self._revoke = revoke
                self._stop_by = clock.now() + timeout
        if not first:
            if not self._on_own_thread() and self._thread.is_alive():
                self._thread.join(timeout)
            return
        if not self._started:
            if self._owns_client:
                self._client.close()
            return
        self._queue.put(Stop())
        if not self._on_own_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Elector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def resign(self, timeout: float | None = 10.0) -> None:
        """Step down if leader and queue again at the back; a no-op otherwise.

        Returns once the machine has left ``leader`` (``on_exit_leader`` has run), or after
        ``timeout``. Our key is deleted in etcd (guarded by its create revision) once this
        term's ``run_while_leader`` work has returned (``work_grace`` at most). The request
        belongs to the term leading when it is made: it never ends a later one. Called from a
        hook or from ``run_while_leader`` work, it only queues the request.
        """
        self._check_fork()
        term = self._caller_term()
        if term is None or self._stopped or not self._thread.is_alive():
            return
        done = threading.Event()
        self._queue.put(Resign(token=term.token, done=done))
        if self._on_own_thread():
            return
        end = None if timeout is None else clock.now() + timeout
        # A dispatcher that ended (stopped) will never apply it: stop waiting then.
        while not done.wait(0.1 if end is None else max(0.0, min(0.1, end - clock.now()))):
            if not self._thread.is_alive() or (end is not None and clock.now() >= end):
                return

    # ------------------------------------------------------------------ views
    @property
    def state(self) -> State:
        """``"disconnected"``, ``"candidate"``, ``"follower"`` or ``"leader"``."""
        self._check_fork()
        return self._dispatcher.state

    @property
    def leader(self) -> LeaderInfo | None:
        """Who leads (identity, key, create revision), or None when nobody does or we cannot
        tell (disconnected). Never reports us before etcd confirmed it."""
        self._check_fork()
        return self._dispatcher.leader

    @property
    def term(self) -> Term | None:
        """The current term if we lead, else None."""
        self._check_fork()
        return self._dispatcher.term

    @property
    def is_leader(self) -> bool:
        """True while we lead *and* the lease's local deadline has not passed."""
        self._check_fork()
        term = self._dispatcher.term
        return term is not None and term.valid

    @property
    def identity(self) -> str:
        return self._dispatcher.identity

    @property
    def ttl(self) -> int:
        """The TTL etcd granted (it raises a TTL below its minimum); the one asked for before
        the first session."""
        return self._session.granted_ttl or self.config.ttl

    @property
    def transitions(self) -> int:
        """How many transitions the machine has made."""
        return self._dispatcher.transitions

    def wait_for(self, *states: State, timeout: float | None = None) -> bool:
        """Block until the state is one of ``states``; False on timeout. Not from a hook:
        hooks run on the thread that changes the state (:class:`ElectorThreadError`)."""
        self._check_fork()
        self._refuse_on_dispatcher("wait_for()")
        with self._changed:
            return self._changed.wait_for(lambda: self.state in states, timeout)

    def wait_until(self, predicate: Callable[[Elector], bool],
                   timeout: float | None = None) -> bool:
        """Block until ``predicate(elector)`` holds after some event; False on timeout.
        Not from a hook (:class:`ElectorThreadError`)."""
        self._check_fork()
        self._refuse_on_dispatcher("wait_until()")
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    @property
    def dispatch_stalled_for(self) -> float:
        """Seconds the dispatcher has spent on the event it is applying (0 when idle): a
        large value means a hook is stuck and every event behind it waits."""
        since = self._busy_since
        return 0.0 if since is None else max(0.0, clock.now() - since)

    @property
    def deadline_remaining(self) -> float | None:
        """Seconds left before the current lease's local deadline (<= 0: passed); None while
        there is no session."""
        self._check_fork()
        deadline = self._session.deadline(self._session.generation)
        return None if deadline == float("-inf") else deadline - clock.now()

    def log_fields(self) -> dict[str, Any]:
        """The structured fields of this elector's log records (see :mod:`electfsm.logs`)."""
        term = self._dispatcher.term
        return {"election": self.config.election, "identity": self._dispatcher.identity,
                "state": self._dispatcher.state,
                "token": term.token if term is not None else None}

    def add_telemetry(self, telemetry: Telemetry) -> None:
        """Tell ``telemetry`` what this elector does (see :func:`electfsm.metrics.register`)."""
        self._dispatcher.telemetry.append(telemetry)

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            raise ElectorForkedError(
                f"this Elector ({self.config.election!r}) was created in process {self._pid}; "
                f"this is process {os.getpid()}, forked from it, where its threads and gRPC "
                "channel do not exist (grpcio does not survive fork), so it cannot tell who "
                "leads. Create electors after forking: in gunicorn's post_fork or "
                "post_worker_init hook, or use multiprocessing's 'spawn' start method.")

    def _renewed(self, seconds: float) -> None:
        self.last_renewal = clock.now()
        for t in self._dispatcher.telemetry:
            t.keepalive(seconds)

    def _fenced(self, result: str) -> None:
        for t in self._dispatcher.telemetry:
            t.fenced(result)

    def _refuse_on_dispatcher(self, call: str) -> None:
        if threading.current_thread() is self._thread:
            raise ElectorThreadError(
                f"{call} was called from a hook of {self.config.election!r}: hooks run on the "
                "dispatcher thread, the only one that changes the state, so it would wait on "
                "itself. Check elector.state in the hook, or wait from another thread.")

    def _caller_term(self) -> Term | None:
        """The term a call acts for: in run_while_leader work, that work's own term (an old
        term's work must never act for a newer term); elsewhere, the current one."""
        mine: Term | None = getattr(self._work_term, "term", None)
        return mine if mine is not None else self._dispatcher.term

    def _on_own_thread(self) -> bool:
        """True on the dispatcher thread or in run_while_leader work: threads that the
        dispatcher itself may wait for, so they must never wait for it."""
        current = threading.current_thread()
        return (current is self._thread or current in self._workers
                or getattr(self._work_term, "term", None) is not None)

    # ------------------------------------------------------------------ fenced writes
    def fenced_txn(self, compare: Sequence[Any] = (), success: Sequence[Any] = (),
                   failure: Sequence[Any] = (), *, timeout: float | None = None) -> TxnResult:
        """Run an etcd transaction only if we still lead.

        ``If(create_revision(our key) == token and compare...) Then success``: etcd applies
        ``success`` only while our key is the incarnation that won. Raises
        :class:`NotLeaderError` if we do not lead, the term's deadline passed, or etcd says
        our key is gone (then nothing was written). If only ``compare`` failed, ``failure``
        runs in a second transaction that is fenced the same way (not atomic with the first)
        and the result has ``succeeded=False``. Build operations with :mod:`electfsm.ops`.

        Why not one nested transaction: etcd releases before the fix for GHSA-rfx7-8w68-q57q
        (3.5.1 among them) skip permission checks inside nested transactions, so a nested
        fence would let a user write outside the keys their role allows.
        """
        self._check_fork()
        try:
            result = self._fenced_txn(compare, success, failure, timeout=timeout)
        except NotLeaderError:
            self._fenced("fenced_out")
            raise
        except Exception:
            self._fenced("error")
            raise
        self._fenced("committed" if result.succeeded else "compare_failed")
        return result

    def _fenced_txn(self, compare: Sequence[Any], success: Sequence[Any],
                    failure: Sequence[Any], *, timeout: float | None) -> TxnResult:
        term = self._caller_term()
        if term is None or not term.valid:
            raise NotLeaderError(f"{self.config.election}: not leader (state {self.state}); "
                                 "fenced_txn runs only while leading")
        key = term.key.encode()
        fence = compare_create(key, term.token)
        resp = self._client.txn([fence, *compare], list(success), [op_range(key)],
                                timeout=timeout, what="fenced transaction")
        if resp.succeeded:
            return TxnResult(succeeded=True, responses=list(resp.responses),
                             revision=int(resp.header.revision))
        ours = resp.responses[0].response_range.kvs
        if not ours or ours[0].create_revision != term.token:
            raise NotLeaderError(f"{self.config.election}: our key {term.key} (token "
                                 f"{term.token}) is gone: leadership was lost; nothing written")
        if not failure:
            return TxnResult(succeeded=False, responses=[], revision=int(resp.header.revision))
        resp = self._client.txn([fence], list(failure), timeout=timeout,
                                what="fenced transaction (failure branch)")
        if not resp.succeeded:
            raise NotLeaderError(f"{self.config.election}: leadership was lost before the "
                                 "failure branch ran; nothing written")
        return TxnResult(succeeded=False, responses=list(resp.responses),
                         revision=int(resp.header.revision))

    # ------------------------------------------------------------------ dispatcher thread
    def _dispatch(self) -> None:
        logs.own_thread(self)
        try:
            while not self._dispatcher.stopped:
                event = self._queue.get()
                self._busy_since = clock.now()
                try:
                    self._dispatcher.apply(event)
                except BaseException as exc:  # our own bug: never leave the lease renewed
                    log.critical("%s: the dispatcher failed applying %r; stopping the elector "
                                 "and releasing its lease", self.config.election, event,
                                 exc_info=True)
                    self._dispatcher.abort(exc)
                finally:
                    self._busy_since = None
                    if isinstance(event, Resign) and event.done is not None:
                        event.done.set()
                    with self._changed:
                        self._changed.notify_all()
        finally:
            # Whatever ended this thread, a machine that no longer runs holds nothing.
            if not self._torn_down:
                self._teardown()
            while True:  # nobody will apply what is still queued: release its waiters
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(event, Resign) and event.done is not None:
                    event.done.set()
            with self._changed:
                self._changed.notify_all()
            logs.disown_thread()

    def _teardown(self) -> None:
        self._torn_down = True
        self._stopped = True
        by = self._stop_by if self._stop_by < float("inf") else clock.now() + 10.0
        # The term is cancelled by now. Let run_while_leader work finish while the lease
        # (and so our key) still holds the election: the next leader's work cannot overlap.
        left = max(0.0, by - clock.now())
        try:
            # Half of what is left (at most a call's time) stays for the revoke and the joins.
            self._await_work(min(self.work_grace,
                                 left - min(left / 2, self.config.call_timeout)))
        finally:  # nothing may skip ending the session: it is what renews the lease
            # The revoke gets at least one call's time, whatever stop(timeout) asked for.
            budget = max(by - clock.now(), self.config.call_timeout + 1)
            if self._shared is not None:  # the lease goes on for the other elections
                # Our key is deleted unless the whole session is ending (its revoke takes
                # every key, or revoke=False leaves them to expire with it): a lease that
                # others keep renewing would hold our key, and the election, forever.
                self._session.detach(self._member, budget,
                                     delete_key=self._revoke or not self._shared.stopping)
            else:
                self._session.stop(budget, revoke=self._revoke)
            self._observer.stop(max(0.0, by - clock.now()))
        if not self._owns_client:
            return
        session = self._session._thread  # its end, not its state
        if session.is_alive():
            # Closing the channel now would cut the revoke short: close once it is done.
            threading.Thread(target=_close_after, args=(session, self._client), daemon=True,
                             name=f"electfsm-close[{self.config.election}]").start()
        else:
            self._client.close()

    def _await_work(self, timeout: float) -> None:
        """Wait up to ``timeout`` for every run_while_leader worker (but ourselves) to end."""
        end = clock.now() + timeout
        current = threading.current_thread()
        for worker in self._workers:
            if worker is not current and worker.ident is not None:  # started
                worker.join(max(0.0, end - clock.now()))
                if worker.is_alive():
                    log.warning("%s: run_while_leader work %s did not return within %.1fs of "
                                "its term's end; releasing the election anyway",
                                self.config.election, worker.name, timeout)

    def _run_work(self, work: Callable[[Term], Any], term: Term) -> None:
        self._work_term.term = term
        logs.own_thread(self)
        try:
            self._work(work, term)
        finally:
            logs.disown_thread()

    def _work(self, work: Callable[[Term], Any], term: Term) -> None:
        if not term.valid:  # ended between the dispatcher's check and this thread's start
            return
        try:
            work(term)
        except BaseException as exc:  # SystemExit too: it ends this work, reported, no more
            log.exception("%s: run_while_leader work %s raised", self.config.election,
                          getattr(work, "__qualname__", work))
            self._queue.put(ErrorReported(error=exc, where="run_while_leader"))


class _Effects:
    """What the dispatcher asks of the elector's threads (all calls return at once)."""

    def __init__(self, elector: Elector) -> None:
        self._e = elector

    def recampaign(self, generation: int) -> None:
        campaign = self._e._session.campaign(generation, self._e._member)
        if campaign is not None:
            campaign.recampaign()

    def resign(self, generation: int, key: str, create_revision: int) -> None:
        # The term is cancelled: our key stays first until its work has returned, so the
        # next leader's work cannot overlap it (the same rule as stop()).
        self._e._await_work(self._e.work_grace)
        campaign = self._e._session.campaign(generation, self._e._member)
        if campaign is not None:
            campaign.resign(create_revision)

    def deadline(self, generation: int) -> float:
        return self._e._session.deadline(generation)

    def bind_term(self, term: Term) -> None:
        self._e._session.bind(term.generation, term.cancelled)

    def start_work(self, work: Callable[[Term], Any], term: Term) -> None:
        thread = threading.Thread(target=self._e._run_work, args=(work, term), daemon=True,
                                  name=f"electfsm-work[{self._e.config.election}]")
        thread.start()  # may raise ("can't start new thread"): then it is not a worker
        self._e._workers = [w for w in self._e._workers if w.is_alive()] + [thread]

    def shutdown(self) -> None:
        self._e._teardown()


def _close_after(thread: threading.Thread, client: EtcdClient) -> None:
    thread.join()
    client.close()


__all__ = ["Elector", "EtcdError"]
