"""Events: the only way anything reaches the machine.

Threads (session-watch, campaign, observe) and user calls put these on one queue;
the dispatcher applies them in order. Events that belong to a session carry its
``generation`` so the dispatcher can drop those of a session that is already gone.
Tests can build and inject them directly (see :class:`electfsm.testing.Harness`); there a
``generation`` of ``None`` means "the current session".

No thread reports ``deposed``: observe reports what etcd shows (:class:`LeaderSeen`), and the
dispatcher, which alone knows our key and term, deposes us when a newer view shows another
leader or none.
"""

from __future__ import annotations

import threading

import attrs


@attrs.frozen(kw_only=True)
class LeaderInfo:
    """Who leads: the leader's identity, its candidate key and that key's create revision.

    ``create_revision`` is also the leader's fencing token.
    """

    identity: str
    key: str
    create_revision: int
    lease: int = 0
    value: bytes = b""

    @property
    def token(self) -> int:
        return self.create_revision


@attrs.frozen(kw_only=True)
class SessionUp:
    """session-watch granted a fresh lease (``ttl`` is what etcd granted)."""

    generation: int | None = None
    lease: int = 0
    ttl: int = 0


@attrs.frozen(kw_only=True)
class SessionLost:
    """The session's lease expired, was revoked, or was unconfirmed past its deadline."""

    generation: int | None = None
    reason: str = "lost"


@attrs.frozen(kw_only=True)
class Elected:
    """campaign confirmed in one read at ``revision``: our key is first and holds our lease."""

    generation: int | None = None
    key: str = ""
    create_revision: int = 0
    revision: int = 0


@attrs.frozen(kw_only=True)
class LeaderSeen:
    """observe's view of the election at ``revision``: the leader, or None when nobody leads.

    ``deleted``: the candidate keys whose deletion this view is the first to include (the
    events since observe's previous view). ``present``: for a view made by a read (at the
    start, or after a gap in the stream, when keys may have gone unseen), every candidate key
    it found; None for a view the stream's events made. A waiting candidate whose own key
    went, either way, campaigns again: its campaign does not watch the line, the stream does.
    """

    leader: LeaderInfo | None = None
    revision: int = 0
    deleted: tuple[str, ...] = ()
    present: frozenset[str] | None = attrs.field(default=None, repr=False)


@attrs.frozen(kw_only=True)
class Resign:
    """User call: step down and queue again at the back. ``done`` is set once applied.

    ``token`` binds the request to the term it was made in: a resign queued while one term
    ended is not applied to the next one. ``None`` (for tests) means the current term.
    """

    token: int | None = None
    done: threading.Event | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class Stop:
    """User call: leave the election for good."""


@attrs.frozen(kw_only=True)
class ErrorReported:
    """A thread hit an error worth telling the user about; runs the ``on_error`` hooks."""

    error: BaseException
    where: str = ""


Event = SessionUp | SessionLost | Elected | LeaderSeen | Resign | Stop | ErrorReported
