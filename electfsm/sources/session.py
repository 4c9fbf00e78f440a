"""session-watch: grants the lease, keeps it alive, and owns the local deadline.

    safe_until = the time the last confirmed keepalive was *sent* + TTL - margin

on the package clock (:func:`electfsm.clock.now`, which counts time the host was suspended).
The first renewal is due TTL/3 after the grant was *sent*, not after it returned: a slow grant
has already used up part of the lease. No call on this thread may outlast the time left to
the deadline (a keepalive gets half of it at most, the auth token renewal on its way
included), and the deadline does not depend on this thread anyway: the process-wide
:class:`~electfsm.clock.Watchdog` fires it, so a session thread stuck in a call still steps
down on time.

``session_lost`` is emitted once per generation, by whichever sees it first: the watchdog at
``safe_until`` itself, or this thread when a keepalive answers TTL <= 0, when etcd no longer
knows the lease, or when a renewal comes back too late. The terms bound to the generation
(:meth:`SessionWatch.bind`) are cancelled just before. After a loss the lease is no longer
renewed and is revoked best-effort (otherwise a half-open link could keep it alive and nobody
could take over); a new lease is granted as soon as etcd answers again. A revoke that failed
(etcd unreachable, or without quorum) is tried again right after that grant, before
campaigning: our old key may still be first in line, and etcd renews every lease by its TTL
when its own leader changes, so waiting for it to expire could hold the election for a TTL.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import attrs

from electfsm import clock as _clock
from electfsm import logs
from electfsm.backoff import Backoff
from electfsm.config import ElectorConfig, safe_until
from electfsm.errors import EtcdError, EtcdUnavailable, LeaseNotFound
from electfsm.etcd import EtcdClient
from electfsm.events import ErrorReported, Event, SessionLost, SessionUp
from electfsm.sources.campaign import Campaign
from electfsm.sources.campaign import candidate_key as campaign_key

log = logs.logger("electfsm.session")

LATE = "no keepalive confirmed before the local deadline"
#: A call given less time than this could not be answered; it is not sent.
MIN_CALL = 0.01
STOPPED = "stopped"


@attrs.define(eq=False)
class Member:
    """One election on a session: its config, where its events go, its campaign."""

    config: ElectorConfig
    emit: Callable[[Event], None]
    owner: logs.Owner | None = None
    #: told how long each confirmed keepalive took (seconds), for metrics
    on_keepalive: Callable[[float], None] | None = None
    campaign: Campaign | None = None


class SessionWatch:
    """Owns the lease of each session generation and, for each election on it (a
    :class:`Member`), the campaign running for that lease.

    One elector alone gives its ``emit`` here and is the only member; a shared
    :class:`electfsm.Session` starts with none and electors :meth:`attach` and :meth:`detach`.
    ``clock`` defaults to the package clock; deadlines (:meth:`deadline`) are on it.
    """

    def __init__(self, client: EtcdClient, config: ElectorConfig,
                 emit: Callable[[Event], None] | None = None,
                 clock: Callable[[], float] | None = None, owner: logs.Owner | None = None,
                 on_keepalive: Callable[[float], None] | None = None) -> None:
        self._owner = owner
        self.members: list[Member] = []
        if emit is not None:
            self.members.append(Member(config=config, emit=emit, owner=owner,
                                       on_keepalive=on_keepalive))
        self._client = client
        self._config = config
        self._clock = _clock.now if clock is None else clock
        self._watchdog = _clock.watchdog(self._clock)
        self._stopping = threading.Event()
        self._revoke = True
        self._lock = threading.Lock()
        self.generation = 0
        self.lease = 0
        self.granted_ttl: int | None = None
        self._safe_until = float("-inf")
        self._lost = True  # the current generation's loss was declared (or none is up)
        self._alarm: _clock.Alarm | None = None
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
        # the watchdog thread exits once no elector of the process has a deadline armed
        self._watchdog.join_idle(1.0)

    def deadline(self, generation: int) -> float:
        """``safe_until`` of that generation's lease; -inf once it is gone or superseded."""
        with self._lock:
            return self._safe_until if generation == self.generation else float("-inf")

    def bind(self, generation: int, cancelled: threading.Event) -> None:
        """Set ``cancelled`` the moment this generation's lease is lost (now, if already)."""
        with self._lock:
            if generation == self.generation and not self._lost:
                self._on_lost.append(cancelled)
                return
        cancelled.set()

    def campaign(self, generation: int, member: Member | None = None) -> Campaign | None:
        with self._lock:
            if generation != self.generation:
                return None
            if member is None:
                member = self.members[0] if self.members else None
            return member.campaign if member is not None else None

    def attach(self, member: Member) -> None:
        """Add an election to the session; it campaigns at once if a lease is up."""
        with self._lock:
            self.members.append(member)
            campaign = None
            if not self._lost:
                campaign = member.campaign = Campaign(
                    self._client, member.config, self.generation, self.lease, member.emit,
                    member.owner)
                member.emit(SessionUp(generation=self.generation, lease=self.lease,
                                      ttl=self.granted_ttl or self._config.ttl))
        if campaign is not None:
            campaign.start()

    def detach(self, member: Member, timeout: float, *, delete_key: bool = True) -> None:
        """Take an election off the session; the lease goes on for the others. With
        ``delete_key``, our candidate key of the live lease is deleted (the lease is not
        revoked, so nothing else would delete it)."""
        with self._lock:
            if member in self.members:
                self.members.remove(member)
            campaign, member.campaign = member.campaign, None
            live, lease = not self._lost, self.lease
        if campaign is not None:
            campaign.cancel()
            campaign.join(timeout)
        if delete_key and live:
            key = campaign_key(member.config.prefix, lease)
            try:
                self._client.delete(key.encode(), timeout=min(timeout,
                                                              self._config.call_timeout))
            except EtcdError as exc:
                log.warning("%s: could not delete our key %s (%s); it goes when the session's "
                            "lease ends", member.config.election, key, exc)

    def _emit(self, event: Event) -> None:
        for member in list(self.members):
            member.emit(event)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        logs.run_owned(self._owner, self._loop)

    def _loop(self) -> None:
        backoff = Backoff(self._config.backoff_max)
        last_error = ""
        while not self._stopping.is_set():
            try:
                lease, ttl, sent = self._grant()
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
            margin = self._config.margin_for(ttl)
            until = safe_until(sent, ttl, margin)
            self._revoke_lost(ttl, sent, until)
            with self._lock:
                self.generation += 1
                generation = self.generation
                self.lease, self.granted_ttl = lease, ttl
                self._safe_until = until
                self._lost = False
                self._on_lost = []
                campaigns = []
                for member in self.members:
                    member.campaign = Campaign(self._client, member.config, generation, lease,
                                               member.emit, member.owner)
                    campaigns.append(member.campaign)
                # under the lock: no SessionLost of this generation can come before it
                self._emit(SessionUp(generation=generation, lease=lease, ttl=ttl))
                self._alarm = self._watchdog.arm(
                    until, functools.partial(self._deadline_passed, generation))
            for campaign in campaigns:
                campaign.start()
            reason = self._keep_alive(generation, lease, ttl, margin, sent)
            self._lose(generation, reason, announce=reason != STOPPED)
            with self._lock:
                ended = [m.campaign for m in self.members if m.campaign is not None]
            for campaign in {id(c): c for c in [*campaigns, *ended]}.values():
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

    def _grant(self) -> tuple[int, int, float]:
        """Grant a lease; returns (lease, granted TTL, when the grant was sent).

        The grant may take no longer than the lease it asks for would last (TTL - margin):
        one answered later could expire before its first renewal. etcd may grant more than
        we ask (its minimum), never less, so the TTL asked for bounds it."""
        ttl = self._config.ttl
        sent = self._clock()
        lease, granted = self._client.grant(
            ttl, timeout=min(self._config.call_timeout, ttl - self._config.margin_for(ttl)))
        if granted != ttl:
            log.warning("%s: asked etcd for a %ds lease, it granted %ds (its minimum); "
                        "using %ds", self._config.election, ttl, granted, granted)
        late = self._clock() - sent
        if late >= granted - self._config.margin_for(granted):
            self._revoke_now(lease, min(self._config.call_timeout, granted / 4))
            raise EtcdUnavailable(f"grant a {ttl}s lease: etcd answered after {late:.2f}s, too "
                                  "late to keep the lease alive; retrying")
        return lease, granted, sent

    def _revoke_now(self, lease: int, timeout: float) -> None:
        try:
            self._client.revoke(lease, timeout=timeout)
        except EtcdError as exc:
            log.info("%s: could not revoke lease %x (%s); trying again once etcd answers",
                     self._config.election, lease, exc)
            self._unrevoked.append(lease)

    def _revoke_lost(self, ttl: int, sent: float, until: float) -> None:
        """Revoke the lost leases whose revoke failed; etcd has just answered a grant. Once
        each: a lease that still cannot be revoked expires on its own. They get the first
        half of the new lease's time at most: the rest is for its first renewal."""
        leases, self._unrevoked = self._unrevoked, []
        budget_end = sent + (until - sent) / 2
        for lease in leases:
            timeout = min(self._config.call_timeout, ttl / 4, budget_end - self._clock())
            if timeout < MIN_CALL:
                log.info("%s: no time left to revoke lost lease %x; it expires on its own",
                         self._config.election, lease)
                continue
            try:
                self._client.revoke(lease, timeout=timeout)
                log.info("%s: revoked lost lease %x now that etcd answers",
                         self._config.election, lease)
            except EtcdError as exc:
                log.info("%s: could not revoke lost lease %x (%s); it expires on its own",
                         self._config.election, lease, exc)

    def _deadline_passed(self, generation: int) -> None:
        """The watchdog's callback at ``safe_until`` (on its thread: must not block)."""
        with self._lock:
            if generation != self.generation or self._lost:
                return
            if self._clock() < self._safe_until:
                # renewed just as the alarm went off: watch the new deadline
                self._alarm = self._watchdog.arm(
                    self._safe_until, functools.partial(self._deadline_passed, generation))
                return
        self._lose(generation, LATE, announce=True)

    def _lose(self, generation: int, reason: str, *, announce: bool) -> None:
        """End ``generation``: cancel its terms and its campaign, and (``announce``) emit
        ``SessionLost``. Only the first call for a generation does anything, whether the
        session thread or the watchdog makes it."""
        with self._lock:
            if generation != self.generation or self._lost:
                return
            self._lost = True
            self._safe_until = float("-inf")
            waiting, self._on_lost = self._on_lost, []
            alarm, self._alarm = self._alarm, None
            campaigns = [m.campaign for m in self.members if m.campaign is not None]
        if alarm is not None:
            alarm.cancel()
        for cancelled in waiting:
            cancelled.set()
        for campaign in campaigns:
            campaign.cancel()
        if announce:
            self._emit(SessionLost(generation=generation, reason=reason))
            log.warning("%s: session %d lost: %s", self._config.election, generation, reason)

    def _keep_alive(self, generation: int, lease: int, ttl: int, margin: float,
                    sent: float) -> str:
        """Renew ``lease`` every TTL/3 (from the grant's send time) until it is lost;
        returns why it ended."""
        interval = ttl / 3
        retry = min(0.25, interval / 2)
        next_at = sent + interval
        while True:
            deadline = self.deadline(generation)
            now = self._clock()
            if now >= deadline:
                return LATE
            if self._stopping.wait(max(0.0, min(next_at, deadline) - now)):
                return STOPPED
            now = self._clock()
            if now >= deadline:
                return LATE
            if now < next_at:
                continue
            # half the time left at most: a hung endpoint must leave room to retry on the
            # next one before the deadline
            timeout = min(self._config.call_timeout, (deadline - now) / 2)
            if timeout < MIN_CALL:  # no renewal could come back in time: wait for the end
                next_at = deadline
                continue
            try:
                granted = self._client.keepalive(lease, timeout=timeout)
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
            took = self._clock() - now
            for member in list(self.members):
                if member.on_keepalive is not None:
                    member.on_keepalive(took)
            with self._lock:
                # Taken in past the deadline (a stall while etcd answered), or after the
                # watchdog ended the term: someone may have seen it end, so it must not
                # come back.
                late = (generation != self.generation or self._lost
                        or self._clock() >= self._safe_until)
                if not late:
                    self._safe_until = safe_until(now, granted, margin)
                    if self._alarm is not None:
                        self._alarm.move(self._safe_until)
            if late:
                return LATE
            next_at = now + interval
