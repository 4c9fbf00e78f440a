"""Posting from electfsm's threads to an event loop without ever waiting for it.

The dispatcher thread must not block on a busy loop (anyio's blocking portal would: it waits
for the loop to run the call), so calls are handed over with the backend's own non-blocking
primitive: ``loop.call_soon_threadsafe`` on asyncio, ``TrioToken.run_sync_soon`` on trio.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio.lowlevel

log = logging.getLogger("electfsm.aio")

Post = Callable[[Callable[[], Any]], None]


def current_poster() -> Post:
    """A function that runs a callable on the current event loop soon, from any thread.

    Call it inside the loop (it captures the running asyncio loop or trio token). Posting
    after the loop has ended is a no-op: there is nobody left to tell.
    """
    native = anyio.lowlevel.current_token().native_token
    call_soon_threadsafe = getattr(native, "call_soon_threadsafe", None)
    if call_soon_threadsafe is not None:  # an asyncio event loop

        def post_asyncio(fn: Callable[[], Any]) -> None:
            try:
                call_soon_threadsafe(fn)
            except RuntimeError:  # the loop is closed
                log.debug("event loop closed; dropped %r", fn)

        return post_asyncio
    run_sync_soon = getattr(native, "run_sync_soon", None)
    if run_sync_soon is not None:  # a trio token
        import trio

        def post_trio(fn: Callable[[], Any]) -> None:
            try:
                run_sync_soon(fn)
            except trio.RunFinishedError:
                log.debug("trio run finished; dropped %r", fn)

        return post_trio
    raise RuntimeError(f"electfsm.aio runs on asyncio or trio, not on {native!r}")
