"""campaign: the Go-compatible election recipe for one session (lease).

1. ``If(create_revision(key) == 0) Then Put(key, identity, lease) Else Get(key)`` with
   ``key = <election>/<lease hex>`` — the same key Go's ``concurrency.Election`` uses.
2. Read the newest candidate older than us. The read also checks that our key exists and
   carries our lease; when it finds nobody older it confirms leadership and emits
   ``Elected`` (Go skips the check: phantoms).
3. Somebody older: the campaign is done. Go watches that one key for its delete and reads
   again; here the election's ordered event stream (``sources/observe.py``, one watch of the
   prefix per election and connection, which every elector already holds to know who leads)
   shows the moment our key is first, and the dispatcher elects on it (see its
   ``_leader_seen``). A second watch per follower would only repeat that stream.

A campaign has a thread only while it works (the transaction, the read, a resign's delete,
a backoff after a failure): a follower or a leader of 1,000 elections holds none.

Only keys ``<election>/<lower-case hex>`` count as candidates, so a nested election
``<election>/x`` never blocks this one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from etcd3 import etcdrpc

from electfsm import clock, logs
from electfsm.backoff import Backoff
from electfsm.config import ElectorConfig
from electfsm.errors import EtcdError, LeaseNotFound
from electfsm.etcd import EtcdClient, prefix_end
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
    """Runs the recipe for one lease; commands come from the dispatcher. A thread runs the
    steps a command asks for and ends when none is left."""

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
        self._want = False
        self._resign: int | None = None
        self._cancelled = False
        self._thread: threading.Thread | None = None  # the one running the steps, if any

    # ------------------------------------------------------------------ commands
    def start(self) -> None:
        self._command()

    def join(self, timeout: float) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

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
            self._cond.notify_all()  # cuts a pause short
            if self._cancelled or self._thread is not None:
                return  # the running thread sees the command before it ends
            thread = self._thread = threading.Thread(
                target=self._run, daemon=True,
                name=f"electfsm-campaign[{self._config.election}:{self._lease:x}]")
        try:
            thread.start()
        except BaseException:
            with self._cond:
                self._thread = None
            raise

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            logs.run_owned(self._owner, self._loop)
        finally:
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None

    def _loop(self) -> None:
        backoff = Backoff(self._config.backoff_max)
        last_error = ""
        while True:
            with self._cond:
                if self._cancelled or not self._want:
                    # Decided under the lock that commands take: a command from now on
                    # starts a new thread.
                    self._thread = None
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
                        # The whole pause, whatever else is asked meanwhile (the stream
                        # reports our own delete, and a recampaign follows it); only a
                        # cancel cuts it short.
                        end = clock.now() + (RESIGN_PAUSE if others else 0.0)
                        while not self._cancelled and (left := end - clock.now()) > 0:
                            self._cond.wait(left)
                        if self._cancelled:
                            return
                self._campaign()
                backoff.reset()
                last_error = ""
            except LeaseNotFound:
                with self._cond:  # session-watch sees the loss too and starts a new session
                    self._cancelled = True
                return
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
        if self._cancelled:
            return
        predecessor, at = self._predecessor(revision)
        if predecessor is None:
            self._emit(Elected(generation=self._generation, key=self.key.decode(),
                               create_revision=revision, revision=at))
        # else: somebody older leads or waits; the election's event stream shows when we
        # are first (module docstring, step 3)

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
