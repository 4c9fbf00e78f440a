"""campaign: the Go-compatible election recipe for one session (lease).

1. ``If(create_revision(key) == 0) Then Put(key, identity, lease) Else Get(key)`` with
   ``key = <election>/<lease hex>`` — the same key Go's ``concurrency.Election`` uses.
2. Get the newest candidate older than us; watch *that one key* for DELETE from the Get's
   revision; repeat until nobody older is left (no thundering herd).
3. Each of those reads also checks that our key exists and carries our lease; the read that
   finds nobody older confirms leadership and emits ``Elected`` (Go skips the check: phantoms).

Only keys ``<election>/<lower-case hex>`` count as candidates, so a nested election
``<election>/x`` never blocks this one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from electfsm import logs
from electfsm.backoff import Backoff
from electfsm.config import ElectorConfig
from electfsm.errors import EtcdError, LeaseNotFound
from electfsm.etcd import EtcdClient, Watch, prefix_end
from electfsm.events import Elected, ErrorReported, Event

log = logs.logger("electfsm.campaign")

_CANDIDATE = re.compile(rb"[0-9a-f]+")


def is_candidate_key(prefix: bytes, key: bytes) -> bool:
    """True for ``<prefix><lease hex>``: a candidate of this election, not of a nested one."""
    return key.startswith(prefix) and bool(_CANDIDATE.fullmatch(key[len(prefix):]))


def candidate_key(prefix: str, lease: int) -> str:
    return f"{prefix}{lease:x}"


def compare_create(key: bytes, revision: int) -> Any:
    return etcdrpc.Compare(key=key, target=etcdrpc.Compare.CREATE,
                           result=etcdrpc.Compare.EQUAL, create_revision=revision)


def op_range(key: bytes, range_end: bytes = b"", **fields: Any) -> Any:
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(key=key, range_end=range_end,
                                                                **fields))


#: After resigning while others wait, our key goes back in line only after this pause. Our
#: new key is a raft write; sent at once, it lands just as the successor's confirming read
#: does, and etcd serves that read only after the write is persisted (the raft loop orders
#: them), so the handover would wait for our fsync. Alone, we campaign again at once.
RESIGN_PAUSE = 0.05


class _KeyGone(Exception):
    """Our key vanished under us; campaign again from the transaction."""


class Campaign:
    """Runs the recipe for one lease in its own thread; commands come from the dispatcher."""

    def __init__(self, client: EtcdClient, config: ElectorConfig, generation: int, lease: int,
                 emit: Callable[[Event], None], owner: logs.Owner | None = None) -> None:
        self._owner = owner
        self._client = client
        self._config = config
        self._generation = generation
        self._lease = lease
        self._emit = emit
        self._prefix = config.prefix.encode()
        self._end = prefix_end(self._prefix)
        self.key = candidate_key(config.prefix, lease).encode()
        self._cond = threading.Condition()
        self._want = True
        self._resign: int | None = None
        self._cancelled = False
        self._watch: Watch | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"electfsm-campaign[{config.election}:{lease:x}]")

    # ------------------------------------------------------------------ commands
    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel(self) -> None:
        self._command(cancel=True)

    def recampaign(self) -> None:
        self._command()

    def resign(self, create_revision: int) -> None:
        """Delete our key if it is still the incarnation ``create_revision``, then campaign."""
        self._command(resign=create_revision)

    def _command(self, *, cancel: bool = False, resign: int | None = None) -> None:
        with self._cond:
            self._cancelled = self._cancelled or cancel
            self._want = True
            if resign is not None:
                self._resign = resign
            watch = self._watch
            self._cond.notify_all()
        if watch is not None:
            watch.cancel()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        logs.run_owned(self._owner, self._loop)

    def _loop(self) -> None:
        backoff = Backoff(self._config.backoff_max)
        last_error = ""
        while True:
            with self._cond:
                while not self._want and not self._cancelled:
                    self._cond.wait()
                if self._cancelled:
                    return
                self._want = False
                resign = self._resign
            try:
                if resign is not None:
                    # Until this delete succeeds we must not campaign: the old key would
                    # still be first and win again.
                    others = self._delete_if(resign)
                    with self._cond:
                        if self._resign == resign:
                            self._resign = None
                        if others and not self._cancelled and not self._want:
                            self._cond.wait(RESIGN_PAUSE)  # a command cuts it short
                        if self._cancelled:
                            return
                self._campaign()
                backoff.reset()
                last_error = ""
            except LeaseNotFound:
                return  # session-watch sees the loss too and starts a new session
            except _KeyGone:
                # Paced like any other failure: a key that keeps vanishing (or one squatted
                # under our name by another lease) must not spin on etcd. A command cuts the
                # pause short; the backoff resets once a campaign step completes.
                with self._cond:
                    self._want = True
                    self._cond.wait(backoff.next())
            except Exception as exc:  # EtcdError, or a bug below us: never end the thread
                if self._cancelled:
                    return
                if not isinstance(exc, EtcdError):
                    log.exception("%s: campaign step raised unexpectedly", self._config.election)
                if str(exc) != last_error:  # report each new problem once, not every retry
                    log.warning("%s: campaign step failed, retrying: %s",
                                self._config.election, exc)
                    self._emit(ErrorReported(error=exc, where="campaign"))
                    last_error = str(exc)
                with self._cond:
                    self._want = True
                    self._cond.wait(backoff.next())

    def _delete_if(self, create_revision: int) -> bool:
        """Delete our key if it is still that incarnation; True if other candidates wait."""
        resp = self._client.txn(
            [compare_create(self.key, create_revision)],
            [etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(key=self.key)),
             op_range(self._prefix, self._end, keys_only=True, limit=8)],
            what=f"resign {self.key!r}")
        if not resp.succeeded:
            return False
        left = resp.responses[1].response_range
        return bool(left.more) or any(is_candidate_key(self._prefix, bytes(kv.key))
                                      for kv in left.kvs)

    def _campaign(self) -> None:
        value = self._config.identity
        resp = self._client.txn(
            [compare_create(self.key, 0)],
            [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=self.key, value=value,
                                                              lease=self._lease))],
            [op_range(self.key)],
            what=f"campaign with {self.key!r}",
        )
        if resp.succeeded:
            revision = int(resp.header.revision)
        else:
            kvs = resp.responses[0].response_range.kvs
            if not kvs:
                raise _KeyGone()
            revision = int(kvs[0].create_revision)
            if kvs[0].value != value:  # same lease campaigning again: proclaim our identity
                self._client.txn([compare_create(self.key, revision)],
                                 [etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
                                     key=self.key, value=value, lease=self._lease))],
                                 what=f"proclaim {self.key!r}")
        log.debug("%s: candidate key %r at revision %d", self._config.election, self.key,
                  revision)
        spent: Watch | None = None  # cancelled after the next read, off the handover's path
        try:
            while not self._cancelled:
                predecessor, at = self._predecessor(revision)
                if predecessor is None:
                    self._emit(Elected(generation=self._generation, key=self.key.decode(),
                                       create_revision=revision, revision=at))
                    return
                if spent is not None:
                    spent.cancel()
                spent = self._wait_delete(predecessor, at + 1)
                with self._cond:
                    if self._want:  # a command arrived while we waited: obey it first
                        return
        finally:
            if spent is not None:
                spent.cancel()

    def _predecessor(self, revision: int) -> tuple[bytes | None, int]:
        """One read: our key must still be there with our lease (else :class:`_KeyGone`);
        returns the newest candidate older than us (None: we lead) and the read's revision.

        The same read that finds nobody older confirms leadership, so we never report it on
        a key that expired while we waited (Go's Campaign does: etcd #19597). It is a plain
        Range, not a read-only Txn: etcd <= 3.5.4 panics when a client's deadline cancels a
        read-only Txn while it runs (etcd #14110).
        """
        limit = 8  # our key and the next older one, plus room for nested elections' keys
        while True:
            resp = self._client.range(self._prefix, self._end, max_create_revision=revision,
                                      sort_target="CREATE", sort_order="DESCEND",
                                      keys_only=True, limit=limit,
                                      what=f"read who is ahead of {self.key!r}")
            candidates = [kv for kv in resp.kvs
                          if is_candidate_key(self._prefix, bytes(kv.key))]
            if len(candidates) >= 2 or not resp.more or limit == 0:
                break
            limit = 0  # nested elections filled the page: read them all once
        ours = candidates[0] if candidates else None
        if (ours is None or bytes(ours.key) != self.key or ours.create_revision != revision
                or ours.lease != self._lease):
            log.info("%s: our key %r is gone or changed while campaigning; not leader",
                     self._config.election, self.key)
            raise _KeyGone()
        older = candidates[1] if len(candidates) > 1 else None
        return (bytes(older.key) if older is not None else None), int(resp.header.revision)

    def _wait_delete(self, key: bytes, start_revision: int) -> Watch | None:
        """Wait until ``key`` is deleted. Returns that watch still open when it was: the
        caller cancels it after the read that follows (a cancel costs a round of gRPC work
        the successor should not wait for); otherwise it is cancelled here."""
        watch = self._client.watch(key, start_revision=start_revision, no_put=True)
        with self._cond:
            if self._cancelled or self._want:
                watch.cancel()
                return None
            self._watch = watch
        deleted = False
        try:
            for resp in watch:
                if any(ev.type == kv_pb2.Event.DELETE for ev in resp.events):
                    deleted = True
                    return watch
            return None
        finally:
            if not deleted:
                watch.cancel()
            with self._cond:
                self._watch = None
