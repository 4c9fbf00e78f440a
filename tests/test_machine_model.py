"""Model-based tests of the machine: hypothesis explores interleavings of every event, clock
advances, slow hooks, raising hooks (``BaseException`` included), resign and stop from hooks,
and checks the safety rules after every step. No etcd and no threads: the dispatcher runs on
the harness's virtual clock.

``make test`` runs the ``default`` profile; ``ELECTFSM_MODEL_EXAMPLES=5000 make test`` (or any
number) explores more. The example database stays out of the repository (``.hypothesis/`` is
ignored).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from electfsm import Elected, LeaderInfo, LeaderSeen, Resign, SessionLost, Stop, Term
from electfsm.dispatcher import Change
from electfsm.machine import STATES, legal
from electfsm.testing import Harness

EXAMPLES = int(os.environ.get("ELECTFSM_MODEL_EXAMPLES", "1000"))
HOOKS = [*(f"{kind}_{state}" for state in STATES for kind in ("enter", "exit")),
         "leader_change"]
RAISES: dict[str, Callable[[], BaseException]] = {
    "Exception": lambda: RuntimeError("hook bug"),
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": lambda: KeyboardInterrupt(),
}


class CheckedHarness(Harness):
    """A harness that also checks each run_while_leader start against the term's life."""

    violations: list[str]

    def start_work(self, work: Callable[[Term], Any], term: Term) -> None:
        if not term.valid:
            self.violations.append(f"work started with a dead term {term.token}")
        super().start_work(work, term)


class ElectorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = CheckedHarness(identity="node-a", ttl=5)
        self.violations: list[str] = []
        self.h.violations = self.violations
        self.slow: dict[str, float] = {}  # hook name -> virtual seconds it takes
        self.raising: dict[str, str] = {}  # hook name -> what it raises, once
        self.requests: list[Any] = []  # Resign/Stop asked from hooks: queued after the step
        self.ask_from: dict[str, str] = {}  # hook name -> "resign" | "stop", once
        self.entered: dict[int, int] = {}  # id(term) -> on_enter_leader runs (first hook)
        self.exited: dict[int, int] = {}
        self.terms: dict[int, Term] = {}
        self.tokens: list[int] = []  # of each term entered, in order
        self.valid_elected: bool | None = None
        self.revision = 1000
        for name in HOOKS:
            self.h._hooks.add(name, self._hook(name))
        self.h.run_while_leader(lambda term: None)

    # ------------------------------------------------------------------ the hooks
    def _hook(self, name: str) -> Callable[..., None]:
        def hook(*args: Any) -> None:
            self._check(name, args)
            if name in self.slow:
                self.h.clock.advance(self.slow[name])  # time passes while the hook runs
            ask = self.ask_from.pop(name, None)
            if ask == "resign":
                term = self.h.term
                self.requests.append(Resign(token=term.token if term else -1))
            elif ask == "stop":
                self.requests.append(Stop())
            kind = self.raising.pop(name, None)
            if kind is not None:
                raise RAISES[kind]()
        hook.__qualname__ = f"model_{name}"
        return hook

    def _check(self, name: str, args: tuple[Any, ...]) -> None:
        d = self.h.dispatcher
        if name == "enter_leader":
            term: Term = args[0]
            if not term.valid:
                self.violations.append(f"on_enter_leader with a dead term {term.token}")
            if d.generation != term.generation:
                self.violations.append("on_enter_leader for another session's term")
            if id(term) not in self.entered:
                self.entered[id(term)] = 1
                self.terms[id(term)] = term
                if self.tokens and term.token <= self.tokens[-1]:
                    self.violations.append(f"token {term.token} after {self.tokens[-1]}")
                self.tokens.append(term.token)
        elif name == "exit_leader":
            term = args[0]
            if id(term) not in self.entered:
                self.violations.append(f"on_exit_leader without on_enter_leader ({term.token})")
            if id(term) not in self.exited:  # first exit hook of that term
                self.exited[id(term)] = 1
            if not term.cancelled.is_set():
                self.violations.append("on_exit_leader before term.cancelled was set")
        elif name == "leader_change":
            # "Us" is our key in this session; a key of our previous session that etcd still
            # shows first is a former incarnation, reported as the leader it is.
            new: LeaderInfo | None = args[1]
            if new is not None and new.key == d.our_key:
                term = d.term
                if d.state != "leader" or term is None or not term.valid:
                    self.violations.append("on_leader_change named us without a live term")
        else:
            change: Change = args[0]
            if legal(change.source, change.trigger) != change.dest:
                self.violations.append(f"not a table transition: {change}")

    # ------------------------------------------------------------------ steps
    def _after(self) -> None:
        while self.requests and not self.h.dispatcher.stopped:
            self.h.inject(self.requests.pop(0))
        self.requests.clear()

    def _next_revision(self) -> int:
        self.revision += 1
        return self.revision

    @precondition(lambda self: self.h.state == "disconnected" and not self.h.dispatcher.stopped)
    @rule()
    def connect(self) -> None:
        self.h.connect()
        self._after()

    @rule(stale=st.booleans(), behind_view=st.booleans())
    def elected(self, stale: bool, behind_view: bool) -> None:
        d = self.h.dispatcher
        generation = d.generation
        if generation is None:
            return
        if stale:
            generation -= 1
        revision = (d.observed_revision - 1) if behind_view else self._next_revision()
        before = self.h.state
        now_valid = (not stale and before in ("candidate", "follower")
                     and self.h.clock() < self.h.deadline(generation)
                     and not d.stopped)
        self.h.inject(Elected(generation=generation, key=d.our_key or "",
                              create_revision=self._next_revision(), revision=revision))
        if self.h.state == "leader" and before != "leader" and not now_valid:
            self.violations.append("leader after an Elected of a dead or stale session")
        self._after()

    @rule(identity=st.sampled_from(["node-b", "node-c", None]), older=st.booleans())
    def leader_seen(self, identity: str | None, older: bool) -> None:
        d = self.h.dispatcher
        revision = max(0, d.observed_revision - 1) if older else self._next_revision()
        leader = None if identity is None else LeaderInfo(
            identity=identity, key=f"{self.h.election}/{hash(identity) & 0xffff:x}",
            create_revision=revision, lease=1, value=identity.encode())
        self.h.inject(LeaderSeen(leader=leader, revision=revision))
        self._after()

    @rule(old_incarnation=st.booleans())
    def we_are_seen_first(self, old_incarnation: bool) -> None:
        d = self.h.dispatcher
        key = d.our_key
        if key is None:
            return
        revision = self._next_revision()
        token = d.term.token if d.term is not None else revision
        if old_incarnation and self.tokens:  # the key of an ended term, not yet deleted
            token = self.tokens[-1]  # (a real etcd never shows it in a later session; the
            # machine must refuse it anyway: tokens only grow)
        self.h.inject(LeaderSeen(leader=LeaderInfo(identity="node-a", key=key,
                                                   create_revision=token, lease=d.lease,
                                                   value=b"node-a"), revision=revision))
        self._after()

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 4.0, 6.0]))
    def advance(self, seconds: float) -> None:
        self.h.advance(seconds)
        self._after()

    @rule()
    def renew(self) -> None:
        generation = self.h.dispatcher.generation
        # The session refuses a renewal taken in after the deadline.
        if generation is not None and self.h.clock() < self.h.deadline(generation):
            self.h.renew()

    @rule()
    def session_lost(self) -> None:
        if self.h.dispatcher.generation is not None:
            self.h.inject(SessionLost())
        self._after()

    @rule(this_term=st.booleans())
    def resign(self, this_term: bool) -> None:
        term = self.h.term
        before = term
        self.h.inject(Resign(token=term.token if term is not None and this_term else -1))
        if not this_term and before is not None and self.h.term is not before:
            self.violations.append("a resign for another term ended this one")
        self._after()

    @rule()
    def stop(self) -> None:
        self.h.inject(Stop())
        self._after()

    @rule(hook=st.sampled_from(HOOKS), seconds=st.sampled_from([0.0, 1.0, 3.0, 5.0]))
    def slow_hook(self, hook: str, seconds: float) -> None:
        self.slow[hook] = seconds

    @rule(hook=st.sampled_from(HOOKS), kind=st.sampled_from(sorted(RAISES)))
    def raising_hook(self, hook: str, kind: str) -> None:
        self.raising[hook] = kind

    @rule(hook=st.sampled_from(HOOKS), ask=st.sampled_from(["resign", "stop"]))
    def ask_from_hook(self, hook: str, ask: str) -> None:
        self.ask_from[hook] = ask

    # ------------------------------------------------------------------ invariants
    @invariant()
    def no_violation(self) -> None:
        assert self.violations == []

    @invariant()
    def leader_view_never_names_an_unconfirmed_us(self) -> None:
        d = self.h.dispatcher
        leader = d.leader
        if leader is not None and leader.key == d.our_key:
            assert d.state == "leader" and d.term is not None and d.term.valid

    @invariant()
    def leader_state_has_the_live_sessions_term(self) -> None:
        d = self.h.dispatcher
        if d.state == "leader":
            assert d.term is not None and d.term.generation == d.generation
            assert id(d.term) in self.entered, "leader without its on_enter_leader"

    @invariant()
    def each_ended_term_exited_once(self) -> None:
        current = self.h.dispatcher.term
        for key in self.entered:
            if self.terms[key] is not current:
                assert self.exited.get(key) == 1, "a term ended without on_exit_leader"

    @invariant()
    def a_stopped_machine_released_everything(self) -> None:
        d = self.h.dispatcher
        if d.stopped:
            assert d.state == "disconnected" and self.h.shut_down and d.term is None


ElectorMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None)
TestElectorMachine = ElectorMachine.TestCase


def test_the_model_can_see_a_term_started_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's checks are live: with the dispatcher's term checks removed, a slow
    on_exit_follower lets a dead term in, and the model reports it."""
    from electfsm.dispatcher import Dispatcher

    monkeypatch.setattr(Dispatcher, "_pending_alive", lambda self: True)
    monkeypatch.setattr(Dispatcher, "_alive", lambda self, term: self.term is term)
    m = ElectorMachine()
    m.connect()
    m.leader_seen("node-b", older=False)
    m.slow_hook("exit_follower", 6.0)
    m.elected(stale=False, behind_view=False)
    assert any("dead term" in v for v in m.violations), m.violations
