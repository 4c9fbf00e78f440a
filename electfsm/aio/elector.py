"""AsyncElector: the elector for asyncio and trio code, on the threaded core."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs

from electfsm.aio._loop import Post, current_poster
from electfsm.elector import Elector, TxnResult
from electfsm.errors import ElectorStopped, HookError
from electfsm.events import LeaderInfo
from electfsm.hooks import Hooks
from electfsm.machine import STATES, State
from electfsm.term import Term

log = logging.getLogger("electfsm.aio")

H = TypeVar("H", bound=Callable[..., Any])
AsyncWork = Callable[[Term], Awaitable[Any]]


@attrs.define(eq=False)
class _TermBodies:
    """The async bodies running in one term, and the signal the core's term-end waits on."""

    done: threading.Event
    scopes: set[anyio.CancelScope] = attrs.field(factory=set)
    ended: bool = False

    def settle(self) -> None:
        if self.ended and not self.scopes:
            self.done.set()


class AsyncElector:
    """Run for leader from asyncio or trio code; the body of a term is cancelled when it ends.

    ::

        from electfsm.aio import AsyncElector

        async with AsyncElector(endpoints=["127.0.0.1:2379"], election="jobs/scheduler",
                                identity="node-a", ttl=5) as el:
            async with el.leadership() as term:   # waits until elected
                await run_scheduler(term.token)   # cancelled the moment the term ends

    It wraps a threaded :class:`~electfsm.Elector` (same arguments) and never blocks the event
    loop: etcd calls run in worker threads, and the elector's threads post to the loop without
    waiting for it. When a term ends (resign, deposed, session lost, or the lease's local
    deadline passing with no renewal), every ``leadership()`` body of that term is cancelled,
    and our key is released only once their cleanup has finished (at most ``work_grace``
    seconds), so two leaders' bodies never overlap while the lease holds.
    """

    def __init__(self, **elector_kwargs: Any) -> None:
        self._elector = Elector(**elector_kwargs)
        self._hooks = Hooks()
        self._post: Post | None = None
        self._bodies: dict[int, _TermBodies] = {}  # id(term) -> its bodies
        self._term: Term | None = None  # the term the loop knows to be live
        self._waiters: set[anyio.Event] = set()
        self._leader_feeds: list[deque[LeaderInfo | None]] = []
        self._term_feeds: list[deque[Term]] = []
        self._entered: set[int] = set()  # terms whose async on_enter_leader hooks ran
        #: (hook name, its arguments, the term an on_leader_change naming us belongs to)
        self._hook_queue: deque[tuple[str, tuple[Any, ...], Term | None]] = deque()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._elector.run_while_leader(self._term_bridge)
        for state in STATES:
            for kind in ("enter", "exit"):
                register = getattr(self._elector, f"on_{kind}_{state}")
                register(self._forward(f"{kind}_{state}"))
        self._elector.on_leader_change(self._forward_leader_change)
        self._elector.on_error(self._forward("error"))

    def __repr__(self) -> str:
        return f"Async{self._elector!r}"

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> AsyncElector:
        if self._closed:
            raise ElectorStopped("this AsyncElector was stopped; create a new one to run again")
        self._post = current_poster()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run_hooks)
        self._elector.start()
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        try:
            await self.stop()
            with anyio.CancelScope(shield=True):
                await self._flush()  # the hooks of the stop itself (on_exit_leader...) run
        finally:
            assert self._task_group is not None
            self._task_group.cancel_scope.cancel()
            await self._task_group.__aexit__(None, None, None)
        return None

    async def stop(self, timeout: float = 10.0, *, revoke: bool = True) -> None:
        """Leave the election: bodies are cancelled and awaited, the lease revoked, the
        threads ended (see :meth:`electfsm.Elector.stop`). Safe to call twice."""
        self._closed = True
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(
                functools.partial(self._elector.stop, timeout, revoke=revoke))
        self._notify()

    # ------------------------------------------------------------------ views
    @property
    def state(self) -> State:
        return self._elector.state

    @property
    def leader(self) -> LeaderInfo | None:
        return self._elector.leader

    @property
    def is_leader(self) -> bool:
        return self._elector.is_leader

    @property
    def term(self) -> Term | None:
        return self._elector.term

    @property
    def identity(self) -> str:
        return self._elector.identity

    @property
    def elector(self) -> Elector:
        """The threaded elector underneath (for its config, ttl, transitions count...)."""
        return self._elector

    # ------------------------------------------------------------------ waiting
    async def wait_for(self, *states: State, timeout: float | None = None) -> bool:
        """Wait until the state is one of ``states``; False on timeout."""
        with anyio.move_on_after(timeout):
            while self.state not in states:
                await self._changed()
            return True
        return False

    async def leaders(self) -> AsyncIterator[LeaderInfo | None]:
        """The current leader (``None``: nobody, or we cannot tell), then each change."""
        feed: deque[LeaderInfo | None] = deque([self.leader])
        self._leader_feeds.append(feed)
        try:
            while True:
                while feed:
                    yield feed.popleft()
                await self._changed()
        finally:
            self._leader_feeds.remove(feed)

    async def terms(self) -> AsyncIterator[Term]:
        """Each term of ours as it begins (the current one first, if we lead)."""
        feed: deque[Term] = deque()
        if self._term is not None and self._term.valid:
            feed.append(self._term)
        self._term_feeds.append(feed)
        try:
            while not self._closed:
                while feed:
                    term = feed.popleft()
                    if term.valid:
                        yield term
                await self._changed()
        finally:
            self._term_feeds.remove(feed)

    # ------------------------------------------------------------------ leadership
    @asynccontextmanager
    async def leadership(self) -> AsyncIterator[Term]:
        """Wait until elected, then run the block as this term's body.

        The body is cancelled the moment the term ends — like ``move_on_after``, the block
        then exits quietly; ``term.ended_by`` says why. Leaving the block by any other way
        (it finished, raised, or its task was cancelled) resigns the term: our key is deleted
        once the body has exited, and the elector campaigns again. An exception in the body
        propagates out of the ``async with``.
        """
        term, bodies = await self._live_term()
        scope = anyio.CancelScope()
        bodies.scopes.add(scope)
        try:
            with scope:
                yield term
        finally:
            bodies.scopes.discard(scope)
            bodies.settle()
            if not bodies.ended and not self._closed:
                # The body left before its term ended: give the term up, after the body.
                with anyio.CancelScope(shield=True):
                    await self.resign()

    async def run_while_leader(self, work: AsyncWork) -> None:
        """Run ``await work(term)`` for every term of ours until the elector stops.

        ``work`` is cancelled when its term ends. If it raises, the error goes to the
        ``on_error`` hooks, the term is resigned and the elector campaigns again.
        """
        while not self._closed:
            try:
                async with self.leadership() as term:
                    await work(term)
            except ElectorStopped:
                return
            except Exception as exc:
                log.exception("%s: run_while_leader work %s raised",
                              self._elector.config.election, getattr(work, "__qualname__", work))
                await self._call_hooks("error", (exc,))

    async def resign(self, timeout: float | None = 10.0) -> None:
        """Step down if leader and queue again at the back (see :meth:`electfsm.Elector.resign`)."""
        await anyio.to_thread.run_sync(self._elector.resign, timeout)

    async def fenced_txn(self, compare: Sequence[Any] = (), success: Sequence[Any] = (),
                         failure: Sequence[Any] = (), *,
                         timeout: float | None = None) -> TxnResult:
        """:meth:`electfsm.Elector.fenced_txn`, run in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(
            self._elector.fenced_txn, compare, success, failure, timeout=timeout))

    # ------------------------------------------------------------------ hooks
    def _add(self, name: str, fn: H) -> H:
        return self._hooks.add(name, fn)

    def on_enter_leader(self, fn: H) -> H:
        """``fn(term)``, plain or ``async``, run on the loop when a term begins."""
        return self._add("enter_leader", fn)

    def on_exit_leader(self, fn: H) -> H:
        """``fn(term)`` when a term ends; once after each ``on_enter_leader``."""
        return self._add("exit_leader", fn)

    def on_enter_follower(self, fn: H) -> H:
        return self._add("enter_follower", fn)

    def on_exit_follower(self, fn: H) -> H:
        return self._add("exit_follower", fn)

    def on_enter_candidate(self, fn: H) -> H:
        return self._add("enter_candidate", fn)

    def on_exit_candidate(self, fn: H) -> H:
        return self._add("exit_candidate", fn)

    def on_enter_disconnected(self, fn: H) -> H:
        return self._add("enter_disconnected", fn)

    def on_exit_disconnected(self, fn: H) -> H:
        return self._add("exit_disconnected", fn)

    def on_leader_change(self, fn: H) -> H:
        """``fn(old, new)``: :class:`~electfsm.LeaderInfo` values or ``None``."""
        return self._add("leader_change", fn)

    def on_error(self, fn: H) -> H:
        return self._add("error", fn)

    # ------------------------------------------------------------------ from the core's threads
    def _forward(self, name: str) -> Callable[..., None]:
        """A core hook that hands ``(name, args)`` to the loop and returns at once."""
        def hook(*args: Any) -> None:
            post = self._post
            if post is not None:
                post(functools.partial(self._on_loop_hook, name, args))
        return hook

    def _forward_leader_change(self, old: LeaderInfo | None, new: LeaderInfo | None) -> None:
        """Like :meth:`_forward`, noting the term when the change names us: the loop may get
        to it only after that term ended, and then it must not say we lead."""
        post = self._post
        if post is None:
            return
        term = self._elector.term  # on the dispatcher thread: the term this change is about
        ours = term if new is not None and term is not None and new.key == term.key else None
        post(functools.partial(self._on_loop_hook, "leader_change", (old, new), ours))

    def _term_bridge(self, term: Term) -> None:
        """The core's run_while_leader work for each term (a core worker thread): tell the
        loop the term began; when it ends, tell the loop and wait for its bodies to exit, so
        the core releases our key only after them (bounded by the core's ``work_grace``)."""
        post = self._post
        if post is None:
            return
        done = threading.Event()
        post(functools.partial(self._term_began, term, done))
        term.cancelled.wait()
        post(functools.partial(self._term_ended, term))
        done.wait(self._elector.work_grace)

    # ------------------------------------------------------------------ on the loop
    def _notify(self) -> None:
        for ev in list(self._waiters):
            ev.set()

    async def _changed(self) -> None:
        ev = anyio.Event()
        self._waiters.add(ev)
        try:
            await ev.wait()
        finally:
            self._waiters.discard(ev)

    def _term_began(self, term: Term, done: threading.Event) -> None:
        self._bodies[id(term)] = _TermBodies(done=done)
        self._term = term
        for feed in self._term_feeds:
            feed.append(term)
        self._notify()

    def _term_ended(self, term: Term) -> None:
        bodies = self._bodies.pop(id(term), None)
        if self._term is term:
            self._term = None
        if bodies is not None:
            bodies.ended = True
            for scope in list(bodies.scopes):
                scope.cancel()
            bodies.settle()
        self._notify()

    async def _live_term(self) -> tuple[Term, _TermBodies]:
        while True:
            if self._closed:
                raise ElectorStopped("the AsyncElector was stopped")
            term = self._term
            if term is not None and term.valid:
                bodies = self._bodies.get(id(term))
                if bodies is not None and not bodies.ended:
                    return term, bodies
            await self._changed()

    def _on_loop_hook(self, name: str, args: tuple[Any, ...], term: Term | None = None) -> None:
        if name == "leader_change" and (term is None or term.valid):
            for feed in self._leader_feeds:
                feed.append(args[1])
        self._hook_queue.append((name, args, term))
        self._notify()

    async def _flush(self) -> None:
        """Run every hook the core's threads posted so far (posts run in order)."""
        posted = anyio.Event()
        if self._post is not None:
            self._post(posted.set)
            await posted.wait()
        await self._drain_hooks()

    async def _run_hooks(self) -> None:
        """Runs the user's hooks in order, one at a time, on the loop."""
        while True:
            await self._drain_hooks()
            await self._changed()

    async def _drain_hooks(self) -> None:
        while self._hook_queue:
            name, args, term = self._hook_queue.popleft()
            if term is not None and not term.valid:
                # names us for a term that ended before the loop got to it (a blocked loop)
                log.warning("%s: on_leader_change naming us for term %d not run: the term "
                            "ended before the loop got to it", self._elector.config.election,
                            term.token)
                continue
            if name == "enter_leader":
                if not args[0].valid:  # ended before the loop got to it: not begun here
                    continue
                self._entered.add(id(args[0]))
            elif name == "exit_leader":
                if id(args[0]) not in self._entered:
                    continue
                self._entered.discard(id(args[0]))
            await self._call_hooks(name, args)

    async def _call_hooks(self, name: str, args: tuple[Any, ...]) -> None:
        for fn in list(self._hooks.get(name)):
            try:
                result = fn(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.exception("%s: async hook on_%s raised", self._elector.config.election,
                              name)
                if name != "error":
                    await self._call_hooks("error", (HookError(f"on_{name}", exc),))
