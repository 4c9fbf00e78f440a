"""Hook registration, shared by :class:`electfsm.Elector` and :class:`electfsm.testing.Harness`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from electfsm.machine import STATES

if TYPE_CHECKING:
    from electfsm.events import LeaderInfo
    from electfsm.term import Term

H = TypeVar("H", bound=Callable[..., Any])
Work = Callable[["Term"], Any]


class Hooks:
    """User hooks by name: ``enter_<state>``, ``exit_<state>``, ``leader_change``, ``error``."""

    NAMES: tuple[str, ...] = (
        *(f"{kind}_{state}" for state in STATES for kind in ("enter", "exit")),
        "leader_change",
        "error",
    )

    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in self.NAMES}
        self.work: list[Work] = []

    def add(self, name: str, fn: H) -> H:
        if name not in self._hooks:
            raise ValueError(f"unknown hook {name!r}; known hooks: {', '.join(self.NAMES)}")
        if not callable(fn):
            raise TypeError(f"hook on_{name} must be callable, got {type(fn).__name__}")
        self._hooks[name].append(fn)
        return fn

    def get(self, name: str) -> list[Callable[..., Any]]:
        return self._hooks[name]


LeaderHook = Callable[["Term"], Any]
ChangeHook = Callable[[Any], Any]
LeaderChangeHook = Callable[["LeaderInfo | None", "LeaderInfo | None"], Any]
ErrorHook = Callable[[BaseException], Any]


class HookMethods:
    """Decorators to register hooks. Hooks run on the dispatcher thread, in registration order.

    ``on_enter_leader``/``on_exit_leader`` get the :class:`~electfsm.term.Term`; the other state
    hooks get a :class:`~electfsm.dispatcher.Change`; ``on_leader_change`` gets ``(old, new)``
    :class:`~electfsm.events.LeaderInfo` values (``None`` when nobody leads); ``on_error`` gets
    the exception. A hook that raises is logged and passed to ``on_error``; the machine goes on.
    Hooks must be quick: give long leader work to :meth:`run_while_leader`.
    """

    _hooks: Hooks

    def on_enter_leader(self, fn: LeaderHook) -> LeaderHook:
        """Register ``fn(term)``: called when a term of leadership begins."""
        return self._hooks.add("enter_leader", fn)

    def on_exit_leader(self, fn: LeaderHook) -> LeaderHook:
        """Register ``fn(term)``: called once when that term ends (``term.ended_by`` says why)."""
        return self._hooks.add("exit_leader", fn)

    def on_enter_follower(self, fn: ChangeHook) -> ChangeHook:
        """Register ``fn(change)``: called on becoming a follower."""
        return self._hooks.add("enter_follower", fn)

    def on_exit_follower(self, fn: ChangeHook) -> ChangeHook:
        """Register ``fn(change)``: called on leaving the follower state."""
        return self._hooks.add("exit_follower", fn)

    def on_enter_candidate(self, fn: ChangeHook) -> ChangeHook:
        """Register ``fn(change)``: called on becoming a candidate."""
        return self._hooks.add("enter_candidate", fn)

    def on_exit_candidate(self, fn: ChangeHook) -> ChangeHook:
        """Register ``fn(change)``: called on leaving the candidate state."""
        return self._hooks.add("exit_candidate", fn)

    def on_enter_disconnected(self, fn: ChangeHook) -> ChangeHook:
        """Register ``fn(change)``: called on losing (or never having) a session."""
        return self._hooks.add("enter_disconnected", fn)

    def on_exit_disconnected(self, fn: ChangeHook) -> ChangeHook:
        """Register ``fn(change)``: called when a session is up again."""
        return self._hooks.add("exit_disconnected", fn)

    def on_leader_change(self, fn: LeaderChangeHook) -> LeaderChangeHook:
        """Register ``fn(old, new)``: called whenever who leads changes (``None``: nobody)."""
        return self._hooks.add("leader_change", fn)

    def on_error(self, fn: ErrorHook) -> ErrorHook:
        """Register ``fn(error)``: called with what went wrong (a failed hook, etcd errors)."""
        return self._hooks.add("error", fn)

    def run_while_leader(self, work: Work) -> Work:
        """Run ``work(term)`` in its own thread for every term of leadership.

        ``term.cancelled`` is set when the term ends (before ``on_exit_leader`` runs, or at the
        lease's local deadline); ``work`` should return promptly then.
        """
        if not callable(work):
            raise TypeError(f"run_while_leader needs a callable, got {type(work).__name__}")
        self._hooks.work.append(work)
        return work
