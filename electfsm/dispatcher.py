"""The dispatcher: the one place events become transitions and hooks run.

:class:`Dispatcher` holds the ``transitions`` machine and applies one event at a time. It
owns no thread and does no I/O: :class:`electfsm.Elector` calls :meth:`Dispatcher.apply`
from its dispatcher thread, and :class:`electfsm.testing.Harness` calls it directly with a
virtual clock. What the machine needs done in etcd it asks of an :class:`Effects`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from electfsm import logs
from electfsm.errors import HookError
from electfsm.events import (
    Elected,
    ErrorReported,
    Event,
    LeaderInfo,
    LeaderSeen,
    Resign,
    SessionLost,
    SessionUp,
    Stop,
)
from electfsm.hooks import Hooks
from electfsm.machine import State, attach, internal, legal
from electfsm.term import Term

log = logs.logger("electfsm")

class Effects(Protocol):
    """What the machine asks of the outside world. Calls must return quickly."""

    def recampaign(self, generation: int) -> None:
        """Our key is gone or not first: campaign again in this session."""

    def resign(self, generation: int, key: str, create_revision: int) -> None:
        """Delete our key if it is still this incarnation, then campaign again at the back."""

    def deadline(self, generation: int) -> float:
        """The local deadline (``safe_until``) of that session's lease."""

    def bind_term(self, term: Term) -> None:
        """Set ``term.cancelled`` the moment the term's lease is lost, even mid-hook."""

    def start_work(self, work: Callable[[Term], Any], term: Term) -> None:
        """Run ``work(term)`` for a ``run_while_leader`` registration."""

    def shutdown(self) -> None:
        """The machine has stopped: end the session and every thread."""


class Telemetry(Protocol):
    """Told what the machine does, for metrics (:mod:`electfsm.metrics`). Calls are quick."""

    def transition(self, source: State, dest: State, trigger: str) -> None: ...

    def hook(self, name: str, seconds: float) -> None: ...

    def leader_change(self) -> None: ...

    def error(self, where: str) -> None: ...

    def keepalive(self, seconds: float) -> None: ...

    def fenced(self, result: str) -> None: ...


@attrs.frozen(kw_only=True)
class Change:
    """Passed to ``on_enter_<state>``/``on_exit_<state>`` hooks of states other than leader."""

    source: State
    dest: State
    trigger: str
    reason: str = ""


class _Model:
    """The object ``transitions`` binds triggers to; only the dispatcher holds it."""

    fsm_state: State


class Dispatcher:
    """Applies events to the machine, one at a time, and runs the hooks."""

    def __init__(self, *, election: str, value: bytes, hooks: Hooks, effects: Effects,
                 clock: Callable[[], float]) -> None:
        self.election = election
        self.prefix = election + "/"
        self.value = value
        self.identity = value.decode("utf-8", "backslashreplace")
        self.hooks = hooks
        self.effects = effects
        self.clock = clock
        self.generation: int | None = None
        self.lease = 0
        self.ttl = 0
        self.term: Term | None = None
        self.observed: LeaderInfo | None = None
        self.observed_revision = 0
        self.stopped = False
        self.transitions = 0
        #: listeners for metrics; see :class:`Telemetry`
        self.telemetry: list[Telemetry] = []
        #: a hook that takes longer (on ``clock``) is logged as a warning; None: never
        self.slow_hook: float | None = None
        self._reported: LeaderInfo | None = None
        self._pending: Term | None = None
        self._reason = ""
        self._elected_revision = 0
        self._begun = False  # whether the current term was alive when it entered leader
        #: the largest fencing token a term of ours has had: a key incarnation whose term
        #: ended (being deleted after resign, say) or an older one never leads again, and
        #: tokens only grow (P1), whatever a late view or read says
        self._last_token = 0
        #: The non-``Exception`` a hook raised (or our own failure): the machine stops on it.
        self.fatal: BaseException | None = None
        self._model = _Model()
        attach(self._model)

    # ------------------------------------------------------------------ views
    @property
    def state(self) -> State:
        return self._model.fsm_state

    @property
    def our_key(self) -> str | None:
        if self.generation is None or not self.lease:
            return None
        return f"{self.prefix}{self.lease:x}"

    @property
    def leader(self) -> LeaderInfo | None:
        """Who leads as far as this node can tell; never an unconfirmed "us"."""
        # One read of each field: other threads call this while the dispatcher changes them.
        state, term, observed, our_key = self.state, self.term, self.observed, self.our_key
        if state == "leader" and term is not None:
            # A term past its deadline is over even before session_lost is applied.
            return term.info if term.valid and self.fatal is None else None
        if state == "disconnected":
            return None
        if observed is not None and (observed.key == our_key or state == "leader"):
            return None
        return observed

    # ------------------------------------------------------------------ events
    def apply(self, event: Event) -> None:
        """Apply one event. Never raises for a hook's error; drops stale and late events.

        A hook that raises something other than an :class:`Exception` (``SystemExit``,
        ``KeyboardInterrupt``, ...) stops the machine once this event is applied, as
        :meth:`Elector.stop` would: leadership ends, the lease is revoked, the threads end.
        """
        if self.stopped:
            log.debug("%s: stopped, dropping %r", self.election, event)
            return
        self._apply(event)
        if self.fatal is not None and not self.stopped:
            self.abort(self.fatal)
            self._announce_leader()

    def abort(self, error: BaseException) -> None:
        """Stop the machine because ``error`` makes going on unsafe; release everything."""
        if self.stopped:
            return
        self.fatal = self.fatal or error
        log.error("%s: stopping the elector and releasing its lease: %s", self.election, error)
        self._fire("stop", f"stopped: {error}")
        self.stopped = True
        self.effects.shutdown()

    def _apply(self, event: Event) -> None:
        if isinstance(event, SessionUp):
            self._session_up(event)
        elif isinstance(event, SessionLost):
            if self._current(event.generation, event):
                self._fire("session_lost", event.reason)
        elif isinstance(event, Elected):
            self._elected(event)
        elif isinstance(event, LeaderSeen):
            self._leader_seen(event)
        elif isinstance(event, Resign):
            self._resign(event.token)
        elif isinstance(event, Stop):
            self._fire("stop", "stop() called")
            self.stopped = True
            self.effects.shutdown()
        elif isinstance(event, ErrorReported):
            self._report(event.error, event.where)
        self._announce_leader()

    def _current(self, generation: int | None, event: Event) -> bool:
        if generation is None or generation != self.generation:
            log.debug("%s: dropping stale %r (session %s)", self.election, event, self.generation)
            return False
        return True

    def _session_up(self, event: SessionUp) -> None:
        if self.state != "disconnected" or event.generation is None:
            log.warning("%s: session_up while %s; ignored", self.election, self.state)
            return
        self.generation, self.lease, self.ttl = event.generation, event.lease, event.ttl
        self._fire("session_up", f"lease {event.lease:x} granted, ttl {event.ttl}s")
        self._follow_observed()

    def _elected(self, event: Elected, by: str = "a read") -> None:
        if not self._current(event.generation, event) or self.state not in ("candidate",
                                                                            "follower"):
            return
        assert self.generation is not None
        seen = self.observed
        if self.observed_revision > event.revision and (
            seen is None or seen.key != event.key or seen.create_revision != event.create_revision
        ):
            # observe saw a newer world in which our key is not first: the confirmation is stale.
            log.info("%s: elected at rev %d but rev %d shows %s leading; campaigning again",
                     self.election, event.revision, self.observed_revision,
                     seen.identity if seen else "nobody")
            self.effects.recampaign(self.generation)
            return
        if event.create_revision <= self._last_token:
            # That incarnation of our key (or an older one) led a term that ended: after a
            # resign it is being deleted, and the next term needs the key campaigned anew.
            log.info("%s: key %s created at revision %d is not newer than our last term's "
                     "(token %d); not leading on it", self.election, event.key,
                     event.create_revision, self._last_token)
            return
        generation = self.generation
        late = self.clock() - self.effects.deadline(generation)
        if late >= 0:
            # The confirmation waited in the queue (behind a slow hook, say) past the session's
            # deadline: etcd may have expired our key since, so it proves nothing any more.
            log.warning("%s: elected at revision %d, but the session's deadline passed %.3fs "
                        "ago; not leading a term that is already over", self.election,
                        event.revision, late)
            return
        self._pending = Term(
            election=self.election, identity=self.identity, value=self.value, key=event.key,
            token=event.create_revision, lease=self.lease, generation=generation,
            deadline_fn=lambda: self.effects.deadline(generation), clock=self.clock,
        )
        self._elected_revision = event.revision
        self._fire("elected", f"key {event.key} shown first at revision {event.revision} "
                              f"by {by}")

    def _leader_seen(self, event: LeaderSeen) -> None:
        if event.revision < self.observed_revision:
            return
        self.observed, self.observed_revision = event.leader, event.revision
        if self.state == "leader" and self.term is not None:
            if event.revision > self._elected_revision and (
                event.leader is None or event.leader.key != self.term.key
                or event.leader.create_revision != self.term.token
            ):
                who = event.leader.identity if event.leader else "nobody"
                self._depose(f"at revision {event.revision} {who} leads, not us")
            return
        leader, our_key = event.leader, self.our_key
        if (leader is not None and self.generation is not None
                and self.state in ("candidate", "follower") and leader.key == our_key
                and leader.lease == self.lease):
            # etcd's ordered event stream of the election shows our key (our lease: this
            # session's) first once the event at this revision is applied: the same fact a
            # read at that revision gives. Any later delete of it comes on the same stream.
            # A follower's campaign does not wait for its predecessor: this is where it leads.
            self._elected(Elected(generation=self.generation, key=leader.key,
                                  create_revision=leader.create_revision,
                                  revision=event.revision), by="the election's event stream")
            if self.term is not None:  # elected (else: too late, or a newer view; go on)
                return
        if (self.generation is not None and self.state in ("candidate", "follower")
                and our_key is not None and (our_key in event.deleted or (
                    event.present is not None and our_key not in event.present))):
            # Our key went (deleted by hand, say), or a read does not find it: no campaign
            # watches the line, so campaign again (it puts the key if it is gone, and reads
            # where it stands). A read made before our key was put costs one extra campaign.
            self.effects.recampaign(self.generation)
        self._follow_observed()

    def _follow_observed(self) -> None:
        """Move between candidate and follower to match what observe last saw."""
        other = self.leader
        if self.state == "candidate" and other is not None:
            self._fire("leader_seen", f"{other.identity} leads")
        elif self.state == "follower":
            if other is None:
                self._fire("leader_gone", "nobody else leads")
            elif self._reported is None or other.key != self._reported.key:
                self._fire("leader_seen", f"{other.identity} leads")

    def _depose(self, reason: str) -> None:
        generation = self.generation
        self._fire("deposed", reason)
        if generation is not None:
            self.effects.recampaign(generation)
        self._follow_observed()

    def _resign(self, token: int | None) -> None:
        if self.state != "leader" or self.term is None or self.generation is None:
            log.info("%s: resign() while %s: nothing to resign", self.election, self.state)
            return
        if token is not None and token != self.term.token:
            log.info("%s: resign() was meant for the term with token %d, not this one (%d); "
                     "ignored", self.election, token, self.term.token)
            return
        key, token, generation = self.term.key, self.term.token, self.generation
        self._fire("resign", "resign() called")
        self.effects.resign(generation, key, token)
        self._follow_observed()

    # ------------------------------------------------------------------ machine plumbing
    def _fire(self, trigger: str, reason: str) -> None:
        """Take the table's transition for ``trigger``, running the exit hooks first.

        The source's exit hooks run here rather than inside the ``transitions`` machine, so
        that a term that died while they ran (a slow ``on_exit_follower`` outlasting the
        deadline) is never entered: the machine goes to ``disconnected`` instead, as the
        session's own ``session_lost`` would take it.
        """
        source = self.state
        dest = legal(source, trigger)
        if dest is None:
            return
        self._reason = reason
        if not internal(source, trigger):
            self._exit(source, Change(source=source, dest=dest, trigger=trigger, reason=reason))
            if dest == "leader" and not self._pending_alive():
                self._pending = None
                trigger, dest = "session_lost", "disconnected"
                reason = self._reason = ("the term ended before it began (deadline passed or "
                                         f"elector stopping while leaving {source})")
        if self._model.trigger(trigger):  # type: ignore[attr-defined]
            self._on_enter(source, dest, trigger)
            self.transitions += 1
            log.info("%s: %s --%s--> %s (%s)", self.election, source, trigger, self.state, reason)
            for t in self.telemetry:
                t.transition(source, self.state, trigger)
        if self.state == "leader" and not self._begun:
            # Died between that check and the first hook: leave before anyone sees us lead.
            self._fire("session_lost", "the term ended as it began")

    def _pending_alive(self) -> bool:
        term = self._pending
        return self.fatal is None and term is not None and term.valid

    def _on_enter(self, source: State, dest: State, trigger: str) -> None:
        """The state's enter hooks, once the machine is in ``dest``."""
        if dest == "leader":
            term, self._pending = self._pending, None
            assert term is not None
            self._begun = False
            self.term = term
            self._last_token = max(self._last_token, term.token)
            self.effects.bind_term(term)
            # The term begins here or never: this one check also admits the first hook (no
            # second look at the clock in between), so on_exit_leader runs exactly when it did.
            self._begun = self._alive(term)
            if not self._begun:
                return
            # Each later leader hook and each piece of work starts only while the term is
            # alive: a slow earlier hook can outlast the deadline (the session ends the term).
            self._run_hooks("enter_leader", term, alive=lambda: self._alive(term),
                            first_admitted=True)
            for work in self.hooks.work:
                if not self._alive(term):
                    log.warning("%s: term %d ended before run_while_leader work %s could start",
                                self.election, term.token, getattr(work, "__qualname__", work))
                    break
                try:
                    self.effects.start_work(work, term)
                except Exception as exc:  # e.g. "can't start new thread"
                    # Leading without the work the user asked for is not leading: stop and
                    # release the election rather than hold it idle.
                    self.fatal = self.fatal or exc
                    self._report(exc, "run_while_leader")
                    break
        else:
            self._run_hooks(f"enter_{dest}", Change(source=source, dest=dest, trigger=trigger,
                                                    reason=self._reason))

    def _exit(self, source: State, change: Change) -> None:
        if source == "leader" and self.term is not None:
            term, self.term = self.term, None
            term.ended_by = change.trigger
            term.cancelled.set()
            begun, self._begun = self._begun, False
            if begun:  # on_exit_leader pairs with the on_enter_leader of a term that began
                self._run_hooks("exit_leader", term)
        elif source != "leader":
            self._run_hooks(f"exit_{source}", change)

    def _alive(self, term: Term) -> bool:
        return self.fatal is None and self.term is term and term.valid

    def _announce_leader(self) -> None:
        now = self.leader
        old = self._reported
        if _same_leader(old, now):
            return
        self._reported = now
        for t in self.telemetry:
            t.leader_change()
        term = self.term
        if now is not None and term is not None and now.key == term.key:
            # Naming us: each hook starts only while the term is alive (a slow one before it
            # can outlast the deadline).
            self._run_hooks("leader_change", old, now, alive=lambda: self._alive(term))
        else:
            self._run_hooks("leader_change", old, now)

    # ------------------------------------------------------------------ hooks
    def _run_hooks(self, name: str, *args: Any, alive: Callable[[], bool] | None = None,
                   first_admitted: bool = False) -> None:
        fns = self.hooks.get(name)
        if not fns:
            return
        for i, fn in enumerate(list(fns)):
            if alive is not None and not (first_admitted and i == 0) and not alive():
                log.warning("%s: the term ended while on_%s hooks ran; %s not run",
                            self.election, name, getattr(fn, "__qualname__", fn))
                return
            started = self.clock()
            try:
                fn(*args)
            except Exception as exc:
                log.exception("%s: hook on_%s (%s) raised; the elector goes on",
                              self.election, name, getattr(fn, "__qualname__", fn))
                self._report(HookError(f"on_{name}", exc), f"on_{name}")
            except BaseException as exc:
                # SystemExit, KeyboardInterrupt, ...: it would end only the dispatcher thread
                # while the lease stays renewed; instead the machine stops and releases it.
                log.error("%s: hook on_%s (%s) raised %s; the elector stops",
                          self.election, name, getattr(fn, "__qualname__", fn),
                          type(exc).__name__)
                error = HookError(f"on_{name}", exc)
                self.fatal = self.fatal or error
                self._report(error, f"on_{name}")
            finally:
                self._timed(name, fn, self.clock() - started)

    def _timed(self, name: str, fn: Callable[..., Any], seconds: float) -> None:
        for t in self.telemetry:
            t.hook(name, seconds)
        if self.slow_hook is not None and seconds > self.slow_hook:
            log.warning("%s: hook on_%s (%s) took %.3fs: every event behind it waited; keep "
                        "hooks short and give long work to run_while_leader", self.election,
                        name, getattr(fn, "__qualname__", fn), seconds)

    def _report(self, error: BaseException, where: str) -> None:
        for t in self.telemetry:
            t.error(where)
        for fn in list(self.hooks.get("error")):
            try:
                fn(error)
            except Exception:
                log.exception("%s: on_error hook raised while reporting %r from %s",
                              self.election, error, where)
            except BaseException as exc:
                log.error("%s: on_error hook raised %s; the elector stops", self.election,
                          type(exc).__name__)
                self.fatal = self.fatal or HookError("on_error", exc)


def _same_leader(a: LeaderInfo | None, b: LeaderInfo | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return a is b
    return ((a.key, a.create_revision, a.lease, a.value)
            == (b.key, b.create_revision, b.lease, b.value))
