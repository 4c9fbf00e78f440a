"""electfsm.aio on a real etcd, on asyncio and on trio (anyio's pytest plugin runs each test
on both backends)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from elector_kit import keys, own_threads

from electfsm import Elector, LeaderInfo, Term, clock
from electfsm.aio import AsyncElector
from electfsm.etcd import EtcdClient
from electfsm.testing.local_etcd import LocalEtcd

# A hung trio run would not be interrupted by a signal: the thread method ends the run.
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90, method="thread")]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)








async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.01)


def threaded(endpoint: str, election: str, identity: str, **kw: Any) -> Elector:
    kw.setdefault("ttl", 2)
    return Elector(endpoints=[endpoint], election=election, identity=identity, **kw)


async def test_one_leads_the_other_follows_and_both_know_who(etcd: LocalEtcd,
                                                             election: str) -> None:
    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        assert await a.wait_for("leader", timeout=10)
        async with AsyncElector(endpoints=[etcd.endpoint], election=election,
                                identity="node-b", ttl=2) as b:
            assert await b.wait_for("follower", timeout=10)
            seen: list[LeaderInfo | None] = []
            async for leader in b.leaders():
                seen.append(leader)
                if leader is not None:
                    break
            assert seen[-1] is not None and seen[-1].identity == "node-a"
            assert a.is_leader and not b.is_leader
            assert a.term is not None and a.leader == a.term.info


async def test_the_body_is_cancelled_at_once_when_our_key_is_deleted(
        etcd: LocalEtcd, election: str, raw: EtcdClient) -> None:
    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        async with a.leadership() as term:
            raw.delete(term.key.encode())  # by hand: deposed
            await anyio.sleep(30)
            pytest.fail("the body was not cancelled")
        await until(lambda: term.ended_by is not None)
        assert term.ended_by == "deposed" and not term.valid


async def test_resign_releases_the_key_only_after_the_bodys_cleanup(
        etcd: LocalEtcd, election: str) -> None:
    marks: dict[str, float] = {}
    successor = threaded(etcd.endpoint, election, "node-b")
    successor.on_enter_leader(lambda term: marks.setdefault("b leads", time.monotonic()))
    try:
        async with AsyncElector(endpoints=[etcd.endpoint], election=election,
                                identity="node-a", ttl=2) as a:
            async with anyio.create_task_group() as tg, a.leadership() as term:
                successor.start()
                assert await anyio.to_thread.run_sync(successor.wait_for, "follower", 10)
                tg.start_soon(a.resign)
                try:
                    await anyio.sleep(30)
                    pytest.fail("the body was not cancelled")
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(0.3)  # cleanup that takes a while
                    marks["a cleaned up"] = time.monotonic()
            await until(lambda: term.ended_by is not None)
            assert term.ended_by == "resign"
            await until(lambda: "b leads" in marks)
    finally:
        successor.stop()
    assert marks["a cleaned up"] < marks["b leads"]


async def test_the_body_is_cancelled_at_the_deadline_while_etcd_is_paused(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    server = make_etcd()
    marks: dict[str, float] = {}
    async with AsyncElector(endpoints=[server.endpoint], election=election, identity="node-a",
                            ttl=2, call_timeout=0.5) as a:
        async with a.leadership() as term:
            deadline = term.deadline
            server.pause()
            try:
                await anyio.sleep(30)
            finally:
                marks["cancelled"] = clock.now()
                server.resume()
        await until(lambda: term.ended_by is not None)  # the machine catches up
        assert term.ended_by == "session_lost"
    # the body ended at the local deadline (before etcd could expire the lease), not later
    assert marks["cancelled"] < deadline + a.elector.config.margin_for(2)


async def test_an_error_in_the_body_propagates_and_resigns(etcd: LocalEtcd,
                                                           election: str) -> None:
    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        assert await a.wait_for("leader", timeout=10)  # a leads before b runs
        async with AsyncElector(endpoints=[etcd.endpoint], election=election,
                                identity="node-b", ttl=2) as b:
            with pytest.raises(ValueError, match="boom"):
                async with a.leadership():
                    await until(lambda: b.state == "follower")
                    raise ValueError("boom")
            await until(lambda: b.state == "leader")
            assert a.state in ("candidate", "follower")


async def test_run_while_leader_reports_a_failing_work_and_campaigns_again(
        etcd: LocalEtcd, election: str) -> None:
    errors: list[BaseException] = []
    tokens: list[int] = []

    async def work(term: Term) -> None:
        tokens.append(term.token)
        if len(tokens) == 1:
            raise RuntimeError("first term fails")
        await anyio.sleep(30)

    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        a.on_error(errors.append)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.run_while_leader, work)
            await until(lambda: len(tokens) == 2)
            tg.cancel_scope.cancel()
    assert tokens[0] < tokens[1]
    assert [str(e) for e in errors] == ["first term fails"]


async def test_a_waiting_leadership_can_be_cancelled_by_its_caller(
        etcd: LocalEtcd, election: str) -> None:
    holder = threaded(etcd.endpoint, election, "node-b").start()
    try:
        assert await anyio.to_thread.run_sync(holder.wait_for, "leader", 10)
        async with AsyncElector(endpoints=[etcd.endpoint], election=election,
                                identity="node-a", ttl=2) as a:
            with anyio.move_on_after(0.5) as waited:
                async with a.leadership():
                    pytest.fail("led while another held the election")
            assert waited.cancelled_caught and a.state == "follower"
            await anyio.to_thread.run_sync(holder.resign)
            async with a.leadership() as term:  # the cancelled wait left nothing behind
                assert term.valid and a.is_leader
    finally:
        holder.stop()


async def test_async_hooks_run_on_the_loop_in_order_and_pair(etcd: LocalEtcd,
                                                             election: str) -> None:
    calls: list[str] = []
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        @a.on_enter_leader
        async def entered(term: Term) -> None:
            threads.add(threading.get_ident())
            await anyio.sleep(0.01)
            calls.append("enter_leader")

        @a.on_exit_leader
        def exited(term: Term) -> None:
            threads.add(threading.get_ident())
            calls.append("exit_leader")

        async for term in a.terms():
            assert term.valid
            await a.resign()
            break
        await until(lambda: calls.count("enter_leader") >= 2)
    assert threads == {loop_thread}
    pairs = [c for c in calls if c.endswith("leader")]
    assert pairs[:4] == ["enter_leader", "exit_leader"] * 2
    assert pairs.count("enter_leader") == pairs.count("exit_leader")


async def test_leaving_the_context_leaves_no_thread_key_or_lease(
        etcd: LocalEtcd, election: str, raw: EtcdClient) -> None:
    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        assert await a.wait_for("leader", timeout=10)
        lease = a.term.lease  # type: ignore[union-attr]
    assert a.state == "disconnected"
    assert keys(raw, election) == []
    assert raw.time_to_live(lease).TTL == -1
    await until(lambda: own_threads(election) == [], 5)


async def test_the_loop_is_never_blocked_by_the_elector(etcd: LocalEtcd,
                                                        election: str) -> None:
    """The dispatcher posts to the loop and goes on: with the loop busy (blocked in
    time.sleep), the threaded side still moves through its states."""
    async with AsyncElector(endpoints=[etcd.endpoint], election=election, identity="node-a",
                            ttl=2) as a:
        a.on_enter_leader(lambda term: None)
        time.sleep(1.0)  # the loop is blocked; the core campaigns and leads meanwhile
        assert a.elector.state == "leader"


async def test_a_blackholed_leaders_body_is_cancelled_before_another_candidate_leads(
        etcd: LocalEtcd, election: str) -> None:
    from electfsm.testing.faultproxy import FaultProxy

    marks: dict[str, float] = {}
    proxy = FaultProxy(etcd.endpoint).start()
    successor = threaded(etcd.endpoint, election, "node-b")
    successor.on_enter_leader(lambda term: marks.setdefault("b leads", clock.now()))
    try:
        async with AsyncElector(endpoints=[proxy.endpoint], election=election,
                                identity="node-a", ttl=2, call_timeout=0.5) as a:
            async with a.leadership() as term:
                successor.start()
                assert await anyio.to_thread.run_sync(successor.wait_for, "follower", 10)
                proxy.blackhole()
                try:
                    await anyio.sleep(30)
                finally:
                    marks["a cancelled"] = clock.now()
            await until(lambda: term.ended_by is not None)
            assert term.ended_by == "session_lost"
            await until(lambda: "b leads" in marks, 15)
    finally:
        successor.stop()
        proxy.stop()
    assert marks["a cancelled"] < marks["b leads"]


async def test_on_leader_change_naming_us_is_not_run_once_the_term_ended_on_a_blocked_loop(
        make_etcd: Callable[..., LocalEtcd], election: str) -> None:
    """The core names us in on_leader_change while the term lives and posts it to the loop.
    If the loop is blocked until that term is over, the async hook must not run for it: it
    would say we lead after we stopped."""
    server = make_etcd()
    a = AsyncElector(endpoints=[server.endpoint], election=election, identity="node-a", ttl=2,
                     call_timeout=0.5)
    named_us: list[int] = []

    @a.on_leader_change
    async def changed(old: LeaderInfo | None, new: LeaderInfo | None) -> None:
        if new is not None and new.identity == "node-a":
            named_us.append(new.create_revision)

    dead: list[Term] = []

    def kill_the_term() -> None:  # off the loop: wait for the term, then let it die
        deadline = time.monotonic() + 10
        while a.elector.term is None and time.monotonic() < deadline:
            time.sleep(0.005)
        term = a.elector.term
        if term is None:
            return
        dead.append(term)
        server.pause()
        term.cancelled.wait(10)

    async with a:
        killer = threading.Thread(target=kill_the_term)
        killer.start()
        try:
            killer.join(15)  # blocks the loop: the leader_change post waits behind this
            assert dead and not dead[0].valid, (
                "precondition: the term ended while the loop waited")
            await a._flush()  # etcd still paused: no later view of our old key yet
            assert dead[0].token not in named_us, "on_leader_change named us for a dead term"
        finally:
            server.resume()
        # After the pause a new term begins, and its change runs. (Meanwhile the dead
        # term's key may still lead on its old lease: a view of node-a's key, not of a term
        # of ours, is news like any other.)
        await until(lambda: a.is_leader, 15)
        term = a.elector.term
        assert term is not None
        await until(lambda: term.token in named_us, 5)
