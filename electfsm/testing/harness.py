"""Test your hooks without etcd and without threads.

:class:`Harness` drives the elector's own machine (the same :class:`~electfsm.dispatcher.Dispatcher`
an :class:`~electfsm.Elector` runs) with injected events and a virtual clock::

    from electfsm.testing import Harness
    from electfsm import SessionLost

    h = Harness(identity="node-a", ttl=5)
    seen = []
    h.on_enter_leader(lambda term: seen.append(term.token))
    h.connect()                      # SessionUp: a lease, the machine is a candidate
    h.elect()                        # Elected: our key confirmed first
    assert h.state == "leader" and seen == [h.term.token]
    h.advance(5.0)                   # no keepalive confirmed: the local deadline passes
    assert h.state == "disconnected"

Events you build yourself may leave ``generation`` out: the harness fills in the current
session. What the machine asks of etcd is recorded (``recampaigns``, ``resigns``, ``work``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from electfsm.config import check_election, default_margin, identity_bytes, safe_until
from electfsm.dispatcher import Dispatcher
from electfsm.events import Elected, Event, LeaderInfo, LeaderSeen, SessionLost, SessionUp
from electfsm.hooks import HookMethods, Hooks
from electfsm.machine import State
from electfsm.term import Term


class VirtualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.now += seconds


class Harness(HookMethods):
    """The elector's machine with injected events, a virtual clock, and no etcd or threads."""

    def __init__(self, *, election: str = "test/election", identity: str | bytes = "node-a",
                 ttl: int = 5, margin: float | None = None) -> None:
        self.election = check_election(election)
        self.ttl = ttl
        self.margin = default_margin(ttl) if margin is None else margin
        self.clock = VirtualClock()
        self._hooks = Hooks()
        self.recampaigns: list[int] = []
        self.resigns: list[tuple[int, str, int]] = []
        self.work: list[tuple[Callable[[Term], Any], Term]] = []
        self.shut_down = False
        self._deadlines: dict[int, float] = {}
        self._bound: dict[int, list[Term]] = {}
        self._revision = 100
        self._generation = 0
        self.dispatcher = Dispatcher(election=self.election, value=identity_bytes(identity),
                                     hooks=self._hooks, effects=self, clock=self.clock)

    # ------------------------------------------------------------------ driving
    def inject(self, event: Event) -> None:
        """Apply ``event`` now, as the dispatcher thread would; ``generation=None`` → current."""
        if getattr(event, "generation", 0) is None:
            event = attrs.evolve(event, generation=self.dispatcher.generation)  # type: ignore[arg-type]
        if isinstance(event, SessionUp):
            self._deadlines[event.generation or 0] = safe_until(
                self.clock(), event.ttl or self.ttl, self.margin)
        if isinstance(event, SessionLost) and event.generation is not None:
            self._lose(event.generation)
        self.dispatcher.apply(event)

    def advance(self, seconds: float) -> None:
        """Move the virtual clock; the session is lost at its deadline unless renewed."""
        self.clock.advance(seconds)
        generation = self.dispatcher.generation
        if generation is not None and self.clock() >= self.deadline(generation) > float("-inf"):
            self.inject(SessionLost(generation=generation,
                                    reason="no keepalive confirmed before the local deadline"))

    def renew(self) -> None:
        """A keepalive sent now was confirmed: the deadline moves to now + TTL - margin."""
        generation = self.dispatcher.generation
        if generation is not None and generation in self._deadlines:
            self._deadlines[generation] = safe_until(self.clock(), self.ttl, self.margin)

    # convenience events ------------------------------------------------
    def next_revision(self) -> int:
        self._revision += 1
        return self._revision

    def connect(self, lease: int | None = None) -> SessionUp:
        """Inject a fresh session (a new generation and lease)."""
        self._generation += 1
        event = SessionUp(generation=self._generation,
                          lease=lease if lease is not None else 0x1000 + self._generation,
                          ttl=self.ttl)
        self.inject(event)
        return event

    def elect(self) -> Elected:
        """Inject ``Elected`` for our own key, confirmed at a fresh revision."""
        key = self.dispatcher.our_key or f"{self.election}/0"
        create_revision = self.next_revision()
        event = Elected(generation=self.dispatcher.generation, key=key,
                        create_revision=create_revision, revision=self.next_revision())
        self.inject(event)
        return event

    def see_leader(self, identity: str | None, *, lease: int = 0xBEEF) -> LeaderSeen:
        """Inject what observe would report if ``identity`` led (None: nobody leads)."""
        revision = self.next_revision()
        leader = None if identity is None else LeaderInfo(
            identity=identity, key=f"{self.election}/{lease:x}", create_revision=revision,
            lease=lease, value=identity.encode())
        event = LeaderSeen(leader=leader, revision=revision)
        self.inject(event)
        return event

    # ------------------------------------------------------------------ views
    @property
    def state(self) -> State:
        return self.dispatcher.state

    @property
    def leader(self) -> LeaderInfo | None:
        return self.dispatcher.leader

    @property
    def term(self) -> Term | None:
        return self.dispatcher.term

    # ------------------------------------------------------------------ Effects
    def recampaign(self, generation: int) -> None:
        self.recampaigns.append(generation)

    def resign(self, generation: int, key: str, create_revision: int) -> None:
        self.resigns.append((generation, key, create_revision))

    def deadline(self, generation: int) -> float:
        return self._deadlines.get(generation, float("-inf"))

    def bind_term(self, term: Term) -> None:
        self._bound.setdefault(term.generation, []).append(term)

    def start_work(self, work: Callable[[Term], Any], term: Term) -> None:
        self.work.append((work, term))

    def shutdown(self) -> None:
        self.shut_down = True

    def _lose(self, generation: int) -> None:
        self._deadlines[generation] = float("-inf")
        for term in self._bound.pop(generation, []):
            term.cancelled.set()


__all__ = ["Harness", "VirtualClock"]
