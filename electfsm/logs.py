"""Structured fields on every electfsm log record: ``election``, ``identity``, ``state`` and,
while leading, ``token``.

Each thread an elector owns (dispatcher, session-watch, campaign, leader work) is registered
here; a filter on electfsm's loggers adds the owner's fields to each record as attributes, so
JSON formatters (python-json-logger, structlog's stdlib bridge) get them without parsing
messages. Records from threads no elector owns carry the fields as ``None``.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

#: The attributes an elector's log records carry.
FIELDS = ("election", "identity", "state", "token")


class Owner(Protocol):
    def log_fields(self) -> dict[str, Any]: ...


_owners: dict[int, weakref.ReferenceType[Any]] = {}


def own_thread(owner: Owner) -> None:
    """Records logged from the current thread carry ``owner``'s fields (until it ends)."""
    _owners[threading.get_ident()] = weakref.ref(owner)


def disown_thread() -> None:
    """Call as the thread ends: its id may be reused by a thread someone else owns."""
    _owners.pop(threading.get_ident(), None)


def run_owned(owner: Owner | None, body: Callable[[], None]) -> None:
    """Run ``body`` on this thread with ``owner``'s fields on its records, then let go."""
    if owner is not None:
        own_thread(owner)
    try:
        body()
    finally:
        disown_thread()


class ElectorFields(logging.Filter):
    """Adds :data:`FIELDS` to each record (``extra=`` values given by the caller win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ref = _owners.get(record.thread) if record.thread is not None else None
        owner = ref() if ref is not None else None
        fields: dict[str, Any] = {}
        if owner is not None:
            try:
                fields = owner.log_fields()
            except Exception:  # a half-built owner must not cost the record
                fields = {}
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


_FILTER = ElectorFields()


def logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the fields filter on it (once)."""
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    return log
