"""The elector's safety rules on a real etcd: no term starts dead, no error leaves the lease
renewed, the end of a term waits for its work, and user calls that would wait on themselves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from elector_kit import keys, own_threads, wait

from electfsm import (
    Change,
    Elector,
    ElectorThreadError,
    HookError,
    SessionLost,
    Term,
    clock,
)
from electfsm.etcd import EtcdClient
from electfsm.testing.local_etcd import LocalEtcd

MakeElector = Callable[..., Elector]












def spy_queue(e: Elector) -> list[tuple[float, Any]]:
    """Record every event the elector's threads put on its queue, with the time it was put."""
    seen: list[tuple[float, Any]] = []
    put = e._queue.put

    def recording(event: Any) -> None:
        seen.append((time.monotonic(), event))
        put(event)

    e._session.members[0].emit = recording  # the campaigns get theirs from the member
    e._observer._emit = recording  # type: ignore[attr-defined]
    return seen


# ---------------------------------------------------------------- a term never starts dead
def test_elected_that_waited_behind_a_slow_hook_past_the_deadline_never_leads(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """B is elected (the election's stream shows its key first once A resigns) and runs a
    slow on_exit_follower first; etcd is paused during that hook, so B's deadline passes
    before the machine would move. B must not lead that term: its key may be gone and
    another node may lead by then."""
    server = make_etcd()
    a = Elector(endpoints=[server.endpoint], election=election, identity="node-a", ttl=2,
                call_timeout=0.5)
    b = Elector(endpoints=[server.endpoint], election=election, identity="node-b", ttl=2,
                call_timeout=0.5)
    queued = spy_queue(b)
    elected_begun = threading.Event()
    hook_done = threading.Event()
    dead_terms: list[Term] = []
    entered: list[Term] = []
    b.on_enter_leader(entered.append)
    b.on_enter_leader(lambda term: dead_terms.append(term) if not term.valid else None)

    @b.on_exit_follower
    def slow(change: Change) -> None:
        # The predecessor resigned and B's election is being confirmed: stall it here.
        if hook_done.is_set() or change.dest != "leader":
            return
        elected_begun.set()
        generation = b._session.generation
        server.pause()
        try:
            wait(lambda: b._session.deadline(generation) < clock.now(), 10)
            wait(lambda: any(isinstance(ev, SessionLost) for _, ev in queued), 5)
        finally:
            server.resume()
            hook_done.set()

    try:
        a.start()
        assert a.wait_for("leader", timeout=5)
        b.start()
        assert b.wait_for("follower", timeout=5)
        generation = b._session.generation
        client = EtcdClient([server.endpoint], timeout=5)
        try:  # b's key waits behind a's
            assert wait(lambda: len(keys(client, election)) == 2, 10)
        finally:
            client.close()
        a.resign()
        assert wait(lambda: b.state == "disconnected" or elected_begun.is_set(), 10)
        assert elected_begun.is_set(), "precondition: B's election began during the slow hook"
        assert hook_done.wait(20)
        assert any(isinstance(ev, SessionLost) and ev.generation == generation
                   for _, ev in queued), "precondition: the session was lost during the hook"
        assert wait(lambda: b.state == "disconnected"
                    or b._dispatcher.generation != generation, 10), "B applied the Elected"
        assert [t for t in entered if t.generation == generation] == [], (
            "B entered leader with a term whose deadline had passed")
        assert dead_terms == []
    finally:
        b.stop()
        a.stop()


# ---------------------------------------------------------------- no error keeps the lease
@pytest.mark.parametrize("error", [SystemExit(2), KeyboardInterrupt()])
def test_a_hook_raising_a_base_exception_releases_the_election(
        make_elector: MakeElector, raw: EtcdClient, election: str,
        error: BaseException) -> None:
    errors: list[BaseException] = []
    a = make_elector("node-a", start=False)
    a.on_error(errors.append)

    @a.on_enter_leader
    def exits(term: Term) -> None:
        raise error

    a.start()
    assert wait(lambda: bool(errors), 10), "a led and its hook raised"
    b = make_elector("node-b")
    assert b.wait_for("leader", timeout=a.ttl * 0.5 + 5), (
        "the other candidate leads: a's lease was released, not left renewed")
    assert a.state == "disconnected"
    assert wait(lambda: not a._thread.is_alive() and not a._session._thread.is_alive())
    assert len(errors) == 1 and isinstance(errors[0], HookError) and errors[0].cause is error
    with pytest.raises(Exception, match="stopped"):
        a.start()
    a.stop()  # returns: nothing left to do
    b.stop()
    assert keys(raw, election) == []
    assert own_threads(election) == []


def test_leader_work_that_cannot_start_releases_the_election(
        make_elector: MakeElector, raw: EtcdClient, election: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    start = threading.Thread.start

    def no_thread(self: threading.Thread) -> None:
        if self.name.startswith("electfsm-work"):
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    errors: list[BaseException] = []
    a = make_elector("node-a", start=False)
    a.on_error(errors.append)
    a.run_while_leader(lambda term: None)
    a.start()
    assert wait(lambda: not a._thread.is_alive())
    lease_gone = wait(lambda: keys(raw, election) == [], 5)
    assert lease_gone, "the key went with the revoked lease"
    assert [str(e) for e in errors] == ["can't start new thread"]
    assert wait(lambda: not a._session._thread.is_alive()), "the lease is no longer renewed"


def test_a_dispatcher_failure_releases_the_election(
        make_elector: MakeElector, raw: EtcdClient, election: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours inside the dispatcher (here: announcing the leader raises) must not leave
    the lease renewed by an elector whose machine no longer runs."""
    from electfsm.dispatcher import Dispatcher

    def broken(self: Dispatcher) -> None:
        if self.state == "leader":
            raise AssertionError("a bug in the dispatcher")

    a = make_elector("node-a", start=False)
    monkeypatch.setattr(Dispatcher, "_announce_leader", broken)
    with caplog.at_level(logging.CRITICAL, logger="electfsm"):
        a.start()
        assert wait(lambda: not a._thread.is_alive())
    assert any("dispatcher failed" in r.getMessage() for r in caplog.records)
    assert wait(lambda: keys(raw, election) == [], 5)
    assert not a._session._thread.is_alive()


# ---------------------------------------------------------------- a term ends after its work
def test_resign_releases_the_key_only_after_the_terms_work_returned(
        make_elector: MakeElector) -> None:
    marks: dict[str, float] = {}

    def work(term: Term) -> None:
        term.cancelled.wait(30)
        time.sleep(0.5)  # wind down: flush, close files ...
        marks["a work ended"] = time.monotonic()

    a = make_elector("node-a", start=False)
    a.run_while_leader(work)
    a.start()
    assert a.wait_for("leader", timeout=5)
    b = make_elector("node-b", start=False)
    b.on_enter_leader(lambda term: marks.setdefault("b leads", time.monotonic()))
    b.start()
    assert b.wait_for("follower", timeout=5)
    a.resign()
    assert b.wait_for("leader", timeout=10)
    assert marks["a work ended"] < marks["b leads"], "the successor led while our work ran"


def test_resign_after_stop_returns_at_once(make_elector: MakeElector) -> None:
    a = make_elector("node-a")
    assert a.wait_for("leader", timeout=5)
    a.stop()
    t = threading.Thread(target=a.resign, kwargs={"timeout": 60}, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "resign() after stop() waited for a dispatcher that is gone"


def test_a_second_stop_keeps_the_first_ones_revoke_false(
        make_elector: MakeElector, raw: EtcdClient) -> None:
    asked = threading.Event()
    a = make_elector("node-a", start=False)

    @a.on_enter_leader
    def leave_like_a_crash(term: Term) -> None:
        a.stop(revoke=False)  # from a hook: only asks
        asked.set()
        time.sleep(0.3)  # the owner's stop() below comes in before the machine applies it

    a.start()
    assert asked.wait(5)
    lease = a._session.lease
    a.stop()  # revoke=True by default, but the first stop decided
    assert raw.time_to_live(lease).TTL > 0, "the lease was left to expire, as asked first"


def test_wait_for_from_a_hook_raises_instead_of_waiting_on_itself(
        make_elector: MakeElector) -> None:
    raised: list[BaseException] = []
    a = make_elector("node-a", start=False)

    @a.on_enter_leader
    def waits(term: Term) -> None:
        try:
            a.wait_for("follower", timeout=30)
        except ElectorThreadError as exc:
            raised.append(exc)

    a.start()
    assert a.wait_for("leader", timeout=5)
    assert wait(lambda: bool(raised), 5)
    assert "hook" in str(raised[0])


def test_stop_from_leader_work_does_not_wait_for_itself(
        make_elector: MakeElector, raw: EtcdClient, election: str,
        caplog: pytest.LogCaptureFixture) -> None:
    returned = threading.Event()
    torn_down_first: list[bool] = []
    a = make_elector("node-a", start=False)

    def work(term: Term) -> None:
        a.stop()
        # Teardown waits for this very work, so it cannot have ended yet, unless stop()
        # waited for it (and it for us, until its join timed out).
        torn_down_first.append(not a._thread.is_alive())
        returned.set()

    a.run_while_leader(work)
    with caplog.at_level(logging.WARNING, logger="electfsm"):
        a.start()
        assert returned.wait(10)
        assert wait(lambda: not a._thread.is_alive())
    assert torn_down_first == [False], "stop() from work waited for the teardown"
    assert not [r for r in caplog.records if "did not return" in r.getMessage()], (
        "teardown waited for the work that was waiting for teardown")
    assert keys(raw, election) == []


def test_stop_keeps_to_its_timeout_and_still_revokes(
        make_elector: MakeElector, raw: EtcdClient, election: str) -> None:
    """Work that ignores cancellation is given what is left of stop(timeout), not more; the
    lease is revoked all the same."""
    release = threading.Event()
    a = make_elector("node-a", start=False, work_grace=30)
    a.run_while_leader(lambda term: release.wait(60))
    a.start()
    assert a.wait_for("leader", timeout=5)
    try:
        a.stop(timeout=2.0)
        assert not a._thread.is_alive(), "stop(timeout) returned before its teardown ended"
        assert keys(raw, election) == []
    finally:
        release.set()


def test_work_of_an_ended_term_cannot_act_for_the_next_one(
        make_elector: MakeElector, raw: EtcdClient) -> None:
    """Work that outlives its term (deposed: nothing waits for it) calls resign() and
    fenced_txn() after the next term began: both act for its own, dead term."""
    outcome: dict[str, Any] = {}
    a = make_elector("node-a", start=False)

    def work(term: Term) -> None:
        if outcome:
            return
        outcome["first"] = term.token
        term.cancelled.wait(30)
        wait(lambda: a.term is not None and a.term.token != term.token, 10)
        outcome["next"] = a.term.token if a.term is not None else None
        a.resign()
        try:
            a.fenced_txn()
        except Exception as exc:
            outcome["fenced"] = type(exc).__name__
        outcome["after"] = a.term.token if a.term is not None else None

    a.run_while_leader(work)
    a.start()
    assert a.wait_for("leader", timeout=5)
    assert wait(lambda: "first" in outcome, 5)
    raw.delete(a.term.key.encode())  # type: ignore[union-attr]  # deposed by hand
    assert wait(lambda: "after" in outcome, 15)
    assert outcome["next"] is not None and outcome["next"] != outcome["first"]
    assert outcome["after"] == outcome["next"], "the old term's resign ended the new term"
    assert outcome["fenced"] == "NotLeaderError"
