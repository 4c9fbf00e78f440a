"""session-watch: grants the lease, keeps it alive, and owns the local deadline.

    safe_until = monotonic time the last confirmed keepalive was *sent* + TTL - margin

``session_lost`` is emitted at ``safe_until`` itself (no waiting for another tick), when a
keepalive answers TTL <= 0, or when etcd no longer knows the lease. After a loss the lease is
no longer renewed and is revoked best-effort (otherwise a half-open link could keep it alive and
nobody could take over); a new lease is granted as soon as etcd answers again. A revoke that
failed (etcd unreachable, or without quorum) is tried again right after that grant, before
campaigning: our old key may still be first in line, and etcd renews every lease by its TTL
when its own leader changes, so waiting for it to expire could hold the election for a TTL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from electfsm.backoff import Backoff
from electfsm.campaign import Campaign
from electfsm.config import ElectorConfig, safe_until
from electfsm.errors import EtcdError, LeaseNotFound
from electfsm.etcd import EtcdClient
from electfsm.events import ErrorReported, Event, SessionLost, SessionUp

log = logging.getLogger("electfsm.session")


class SessionWatch:
    """Owns the lease of each session generation and the campaign running for it."""

    def __init__(self, client: EtcdClient, config: ElectorConfig, emit: Callable[[Event], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._config = config
        self._emit = emit
        self._clock = clock
        self._stopping = threading.Event()
        self._revoke = True
        self._lock = threading.Lock()
        self.generation = 0
        self.lease = 0
        self.granted_ttl: int | None = None
        self._safe_until = float("-inf")
        self._campaign: Campaign | None = None
        self._on_lost: list[threading.Event] = []
        self._unrevoked: list[int] = []  # lost leases whose revoke failed
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"electfsm-session[{config.election}]")

    # ------------------------------------------------------------------ called by others
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float, *, revoke: bool = True) -> None:
        self._revoke = revoke
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def deadline(self, generation: int) -> float:
        """``safe_until`` of that generation's lease; -inf once it is gone or superseded."""
        with self._lock:
            return self._safe_until if generation == self.generation else float("-inf")

    def bind(self, generation: int, cancelled: threading.Event) -> None:
        """Set ``cancelled`` the moment this generation's lease is lost (now, if already)."""
        with self._lock:
            if generation == self.generation and self._safe_until > float("-inf"):
                self._on_lost.append(cancelled)
                return
        cancelled.set()

    def campaign(self, generation: int) -> Campaign | None:
        with self._lock:
            return self._campaign if generation == self.generation else None

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        backoff = Backoff(self._config.backoff_max)
        last_error = ""
        while not self._stopping.is_set():
            sent = self._clock()
            try:
                lease, ttl = self._client.grant(self._config.ttl)
            except Exception as exc:  # EtcdError, or a bug below us: retry either way
                if not isinstance(exc, EtcdError):
                    log.exception("%s: grant raised unexpectedly", self._config.election)
                if str(exc) != last_error:
                    log.warning("%s: cannot start a session, retrying: %s",
                                self._config.election, exc)
                    self._emit(ErrorReported(error=exc, where="session"))
                    last_error = str(exc)
                self._stopping.wait(backoff.next())
                continue
            backoff.reset()
            last_error = ""
            if ttl != self._config.ttl:
                log.warning("%s: asked etcd for a %ds lease, it granted %ds (its minimum); "
                            "using %ds", self._config.election, self._config.ttl, ttl, ttl)
            margin = self._config.margin_for(ttl)
            self._revoke_lost(ttl)
            campaign = Campaign(self._client, self._config, self.generation + 1, lease,
                                self._emit)
            with self._lock:
                self.generation += 1
                self.lease, self.granted_ttl = lease, ttl
                self._safe_until = safe_until(sent, ttl, margin)
                self._campaign = campaign
                self._on_lost = []
                generation = self.generation
            self._emit(SessionUp(generation=generation, lease=lease, ttl=ttl))
            campaign.start()
            reason = self._keep_alive(lease, ttl, margin)
            self._lose(generation, reason)
            campaign.cancel()
            if reason != "stopped":
                self._emit(SessionLost(generation=generation, reason=reason))
                log.warning("%s: session %d lost: %s", self._config.election, generation, reason)
            campaign.join(self._config.call_timeout + 1)
            if not self._revoke:
                log.info("%s: leaving lease %x to expire on its own", self._config.election, lease)
                continue
            try:  # best-effort: a lease we stopped renewing must not keep our key alive
                self._client.revoke(lease)
            except EtcdError as exc:
                log.info("%s: could not revoke lease %x (%s); trying again once etcd answers",
                         self._config.election, lease, exc)
                self._unrevoked.append(lease)

    def _revoke_lost(self, ttl: int) -> None:
        """Revoke the lost leases whose revoke failed; etcd has just answered a grant. Once
        each: a lease that still cannot be revoked expires on its own."""
        leases, self._unrevoked = self._unrevoked, []
        for lease in leases:
            try:
                self._client.revoke(lease, timeout=min(self._config.call_timeout, ttl / 4))
                log.info("%s: revoked lost lease %x now that etcd answers",
                         self._config.election, lease)
            except EtcdError as exc:
                log.info("%s: could not revoke lost lease %x (%s); it expires on its own",
                         self._config.election, lease, exc)

    def _lose(self, generation: int, reason: str) -> None:
        with self._lock:
            self._safe_until = float("-inf")
            waiting, self._on_lost = self._on_lost, []
        for cancelled in waiting:
            cancelled.set()

    def _keep_alive(self, lease: int, ttl: int, margin: float) -> str:
        """Renew ``lease`` every TTL/3 until it is lost; returns why it ended."""
        interval = ttl / 3
        retry = min(0.25, interval / 2)
        next_at = self._clock() + interval
        while True:
            deadline = self.deadline(self.generation)
            now = self._clock()
            if now >= deadline:
                return "no keepalive confirmed before the local deadline"
            if self._stopping.wait(max(0.0, min(next_at, deadline) - now)):
                return "stopped"
            now = self._clock()
            if now >= deadline:
                return "no keepalive confirmed before the local deadline"
            if now < next_at:
                continue
            try:
                # half the time left at most: a hung endpoint must leave room to retry on
                # the next one before the deadline
                granted = self._client.keepalive(
                    lease, timeout=min(self._config.call_timeout,
                                       max(0.05, (deadline - now) / 2)))
            except LeaseNotFound:
                return "etcd no longer knows the lease"
            except EtcdError as exc:
                log.debug("%s: keepalive failed, %.2fs left: %s", self._config.election,
                          deadline - self._clock(), exc)
                next_at = self._clock() + retry
                continue
            except Exception as exc:  # a bug below us must not end the session thread
                log.exception("%s: keepalive raised unexpectedly; retrying", self._config.election)
                self._emit(ErrorReported(error=exc, where="session"))
                next_at = self._clock() + retry
                continue
            if granted <= 0:
                return "etcd says the lease expired or was revoked (TTL 0)"
            with self._lock:
                # Taken in past the deadline (a stall while etcd answered): someone may have
                # seen the term end already, so it must not come back.
                late = self._clock() >= self._safe_until
                if not late:
                    self._safe_until = safe_until(now, granted, margin)
            if late:
                return "no keepalive confirmed before the local deadline"
            next_at = now + interval
