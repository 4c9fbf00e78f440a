"""A term of leadership: the fencing token and the local deadline that bound it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import attrs

from electfsm.events import LeaderInfo


@attrs.define(kw_only=True, eq=False)
class Term:
    """One term of leadership, handed to ``on_enter_leader``/``on_exit_leader`` hooks and to
    ``run_while_leader`` work.

    ``token`` is the fencing token: the create revision of our candidate key. Tokens of later
    terms are always larger, so a resource that rejects tokens below the highest it has seen
    never accepts a write from a deposed leader::

        def work(term):
            while not term.cancelled.wait(1.0):
                storage.write(data, fencing_token=term.token)

    ``cancelled`` is set before ``on_exit_leader`` runs, and also by the session thread the
    moment the lease's local deadline passes, even while a hook is still running.
    """

    election: str
    identity: str
    key: str
    token: int
    lease: int
    generation: int
    value: bytes = attrs.field(repr=False)
    cancelled: threading.Event = attrs.field(factory=threading.Event, repr=False)
    ended_by: str | None = None
    _deadline: Callable[[], float] = attrs.field(repr=False, alias="deadline_fn")
    _clock: Callable[[], float] = attrs.field(repr=False, alias="clock")
    _info: LeaderInfo | None = attrs.field(default=None, init=False, repr=False)

    @property
    def deadline(self) -> float:
        """The time, on the elector's clock (:func:`electfsm.clock.now`), by which this term
        must end at the latest."""
        return self._deadline()

    def remaining(self) -> float:
        """Seconds left before :attr:`deadline`; zero or less means leadership is over."""
        # The clock first: a deadline already passed at that instant is never extended
        # afterwards (the session refuses a renewal taken in late), so an ended term stays
        # ended for every reader.
        now = self._clock()
        return self._deadline() - now

    @property
    def valid(self) -> bool:
        """True while the term is neither cancelled nor past its deadline."""
        return not self.cancelled.is_set() and self.remaining() > 0

    @property
    def info(self) -> LeaderInfo:
        """This term's leader as observe would report it (made once: read on every event)."""
        info = self._info
        if info is None:
            info = self._info = LeaderInfo(identity=self.identity, key=self.key,
                                           create_revision=self.token, lease=self.lease,
                                           value=self.value)
        return info
