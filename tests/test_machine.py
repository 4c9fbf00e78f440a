"""The machine alone, driven by injected events through electfsm.testing.harness (no etcd)."""

from __future__ import annotations

import attrs
import pytest

from electfsm import (
    Elected,
    HookError,
    LeaderInfo,
    LeaderSeen,
    Resign,
    SessionLost,
    SessionUp,
    Stop,
)
from electfsm.machine import STATES, TABLE, TRIGGERS, legal, transition_configs
from electfsm.testing import Harness


@pytest.fixture
def h() -> Harness:
    return Harness(identity="node-a", ttl=5)


def record(h: Harness) -> list[str]:
    calls: list[str] = []
    for state in STATES:
        getattr(h, f"on_enter_{state}")(lambda _arg, s=state: calls.append(f"enter_{s}"))
        getattr(h, f"on_exit_{state}")(lambda _arg, s=state: calls.append(f"exit_{s}"))
    return calls


def test_table_covers_every_state_and_each_trigger_has_one_destination_per_source() -> None:
    seen = {(row.trigger, s) for row in TABLE for s in row.sources}
    assert len(seen) == sum(len(row.sources) for row in TABLE)
    assert {s for row in TABLE for s in (*row.sources, row.dest)} == set(STATES)
    assert len(transition_configs()) == len(seen)
    assert set(TRIGGERS) == {row.trigger for row in TABLE}


def test_only_table_transitions_are_legal() -> None:
    assert legal("disconnected", "elected") is None
    assert legal("candidate", "elected") == "leader"
    assert legal("leader", "resign") == "candidate"
    assert legal("follower", "resign") is None


def test_session_up_makes_a_candidate_and_elected_makes_a_leader(h: Harness) -> None:
    assert h.state == "disconnected"
    h.connect()
    assert h.state == "candidate"
    ev = h.elect()
    assert h.state == "leader"
    assert h.term is not None and h.term.token == ev.create_revision
    assert h.leader is not None and h.leader.identity == "node-a"


def test_elected_after_session_lost_never_makes_a_leader(h: Harness) -> None:
    up = h.connect()
    h.inject(SessionLost(generation=up.generation, reason="expired"))
    h.inject(Elected(generation=up.generation, key=f"test/election/{up.lease:x}",
                     create_revision=5, revision=6))
    assert h.state == "disconnected"
    h.connect()
    h.inject(Elected(generation=up.generation, key="k", create_revision=5, revision=6))
    assert h.state == "candidate", "an elected of the old session must be dropped"


def test_elected_is_ignored_when_observe_already_saw_someone_else_lead_later(h: Harness) -> None:
    h.connect()
    seen = h.see_leader("node-b")
    h.inject(Elected(generation=None, key=h.dispatcher.our_key or "", create_revision=1,
                     revision=seen.revision - 1))
    assert h.state == "follower"
    assert h.recampaigns == [h.dispatcher.generation]


def test_follower_tracks_leader_changes_and_falls_back_to_candidate(h: Harness) -> None:
    changes: list[tuple[str | None, str | None]] = []
    h.on_leader_change(lambda old, new: changes.append(
        (old and old.identity, new and new.identity)))
    h.connect()
    h.see_leader("node-b")
    assert h.state == "follower"
    h.see_leader("node-c")
    assert h.state == "follower" and h.leader is not None and h.leader.identity == "node-c"
    h.see_leader(None)
    assert h.state == "candidate" and h.leader is None
    assert changes == [(None, "node-b"), ("node-b", "node-c"), ("node-c", None)]


def test_a_view_showing_our_key_first_elects_us_without_waiting_for_the_read(
        h: Harness) -> None:
    up = h.connect()
    h.see_leader("node-b")
    ours = LeaderInfo(identity="node-a", key=h.dispatcher.our_key or "", create_revision=150,
                      lease=up.lease, value=b"node-a")
    h.inject(LeaderSeen(leader=ours, revision=160))
    assert h.state == "leader"
    assert h.term is not None and h.term.token == 150 and h.leader == ours


def test_our_key_name_with_another_lease_is_not_us(h: Harness) -> None:
    up = h.connect()
    stale = LeaderInfo(identity="node-a", key=h.dispatcher.our_key or "", create_revision=9,
                       lease=up.lease + 1, value=b"node-a")
    h.inject(LeaderSeen(leader=stale, revision=10))
    assert h.state != "leader" and h.term is None


def test_a_view_of_our_key_after_the_deadline_does_not_elect(h: Harness) -> None:
    up = h.connect()
    ours = LeaderInfo(identity="node-a", key=h.dispatcher.our_key or "", create_revision=9,
                      lease=up.lease, value=b"node-a")
    h.clock.advance(h.ttl)  # the deadline passed; the session's loss is queued behind
    h.inject(LeaderSeen(leader=ours, revision=10))
    assert h.state != "leader"


def test_newer_view_without_our_key_deposes_the_leader(h: Harness) -> None:
    h.connect()
    h.elect()
    generation = h.dispatcher.generation
    h.see_leader("node-b")
    assert h.state == "follower"
    assert h.recampaigns == [generation]


def test_older_view_does_not_depose_a_fresh_leader(h: Harness) -> None:
    h.connect()
    stale = LeaderInfo(identity="node-b", key="test/election/b", create_revision=1)
    elected = h.elect()
    h.inject(LeaderSeen(leader=stale, revision=elected.revision - 1))
    assert h.state == "leader"


def test_exit_leader_runs_once_after_each_enter_and_term_is_cancelled_first(
        h: Harness) -> None:
    calls = record(h)
    cancelled_at_exit: list[bool] = []
    h.on_exit_leader(lambda term: cancelled_at_exit.append(term.cancelled.is_set()))
    h.connect()
    h.elect()
    h.inject(Resign())
    h.elect()
    h.see_leader(None)  # a newer view without our key: deposed
    h.elect()
    h.inject(SessionLost())
    assert calls.count("enter_leader") == calls.count("exit_leader") == 3
    pairs = [c for c in calls if c.endswith("_leader")]
    assert pairs == ["enter_leader", "exit_leader"] * 3
    assert cancelled_at_exit == [True, True, True]


def test_hook_order_on_election(h: Harness) -> None:
    calls = record(h)
    h.connect()
    h.see_leader("node-b")
    h.see_leader(None)
    h.elect()
    assert calls == ["exit_disconnected", "enter_candidate", "exit_candidate", "enter_follower",
                     "exit_follower", "enter_candidate", "exit_candidate", "enter_leader"]


def test_a_raising_hook_is_reported_and_the_machine_goes_on(h: Harness) -> None:
    errors: list[BaseException] = []
    later: list[int] = []
    h.on_error(errors.append)

    @h.on_enter_leader
    def boom(term: object) -> None:
        raise RuntimeError("hook bug")

    h.on_enter_leader(lambda term: later.append(1))
    h.connect()
    h.elect()
    assert h.state == "leader"
    assert later == [1], "hooks after the raising one still run"
    assert len(errors) == 1 and isinstance(errors[0], HookError)
    assert "on_enter_leader" in str(errors[0]) and "hook bug" in str(errors[0])
    h.inject(Resign())
    assert h.state == "candidate"


def test_deadline_passes_without_renewal_and_steps_down(h: Harness) -> None:
    h.connect()
    h.elect()
    term = h.term
    assert term is not None
    h.advance(2.0)
    h.renew()
    h.advance(4.0)
    assert h.state == "leader", "renewed 4 s ago with ttl 5: still inside the deadline"
    assert term.remaining() == pytest.approx(5 - h.margin - 4.0)
    h.advance(1.0)
    assert h.state == "disconnected"
    assert term.cancelled.is_set() and not term.valid and term.ended_by == "session_lost"


def test_resign_asks_for_a_guarded_delete_of_our_incarnation(h: Harness) -> None:
    h.connect()
    ev = h.elect()
    h.inject(Resign())
    assert h.state == "candidate"
    assert h.resigns == [(h.dispatcher.generation, ev.key, ev.create_revision)]


def test_resign_when_not_leader_does_nothing(h: Harness) -> None:
    h.connect()
    h.see_leader("node-b")
    h.inject(Resign())
    assert h.state == "follower" and h.resigns == []


def test_stop_is_terminal(h: Harness) -> None:
    calls = record(h)
    h.connect()
    h.elect()
    h.inject(Stop())
    assert h.state == "disconnected" and h.shut_down
    assert calls[-2:] == ["exit_leader", "enter_disconnected"]
    h.inject(SessionUp(generation=99, lease=1, ttl=5))
    assert h.state == "disconnected"


def test_run_while_leader_work_gets_each_term(h: Harness) -> None:
    h.run_while_leader(lambda term: None)
    h.connect()
    h.elect()
    h.inject(Resign())
    h.elect()
    tokens = [term.token for _work, term in h.work]
    assert len(tokens) == 2 and tokens[0] < tokens[1]
    assert h.work[0][1].cancelled.is_set() and not h.work[1][1].cancelled.is_set()


# ---------------------------------------------------------------- a term never starts dead
def _other_leads_then_elected_waits(h: Harness) -> Elected:
    """Connected, another node leads, and our Elected is built but not yet applied."""
    h.connect()
    seen = h.see_leader("node-b")
    return Elected(generation=h.dispatcher.generation, key=h.dispatcher.our_key or "",
                   create_revision=h.next_revision(), revision=seen.revision + 1)


def test_elected_applied_after_the_sessions_deadline_never_enters_leader(h: Harness) -> None:
    entered: list[object] = []
    named_us: list[object] = []
    h.on_enter_leader(entered.append)
    h.on_leader_change(lambda old, new: named_us.append(new) if new is not None
                       and new.identity == "node-a" else None)
    elected = _other_leads_then_elected_waits(h)
    # The Elected waited in the queue (behind a slow hook) while the deadline passed; the
    # session's SessionLost is behind it in the queue, not applied yet.
    h.clock.advance(h.ttl)
    h.inject(elected)
    assert h.state != "leader"
    assert entered == [] and named_us == [] and h.work == []
    assert h.leader is None or h.leader.identity == "node-b"


def test_elected_inside_the_deadline_still_leads(h: Harness) -> None:
    elected = _other_leads_then_elected_waits(h)
    h.clock.advance(h.ttl - h.margin - 0.01)
    h.inject(elected)
    assert h.state == "leader"


def test_leader_hooks_and_work_stop_starting_once_a_slow_hook_outlasts_the_deadline(
        h: Harness) -> None:
    ran: list[str] = []
    named_us: list[object] = []
    h.on_enter_leader(lambda term: (ran.append("slow"), h.clock.advance(h.ttl)))
    h.on_enter_leader(lambda term: ran.append("second"))
    h.on_exit_leader(lambda term: ran.append("exit"))
    h.on_leader_change(lambda old, new: named_us.append(new) if new is not None else None)
    h.run_while_leader(lambda term: None)
    h.connect()
    h.elect()
    assert ran == ["slow"], "no leader hook starts with a term past its deadline"
    assert h.work == []
    assert named_us == [] and h.leader is None, "a dead term is never announced as leading"
    h.advance(0)  # the session's SessionLost, queued at the deadline, is applied now
    assert h.state == "disconnected" and ran == ["slow", "exit"]


def test_a_slow_exit_follower_hook_outlasting_the_deadline_never_enters_leader(
        h: Harness) -> None:
    calls = record(h)
    named_us: list[object] = []
    h.on_leader_change(lambda old, new: named_us.append(new) if new is not None
                       and new.identity == "node-a" else None)
    elected = _other_leads_then_elected_waits(h)
    h.on_exit_follower(lambda change: h.clock.advance(h.ttl))  # etcd paused meanwhile
    h.inject(elected)
    assert h.state == "disconnected", "the session ended: it is not led"
    assert "enter_leader" not in calls and "exit_leader" not in calls
    assert calls[-2:] == ["exit_follower", "enter_disconnected"]
    assert named_us == [] and h.work == []
    h.advance(0)  # the session's own SessionLost, queued behind, changes nothing
    assert h.state == "disconnected" and calls.count("enter_disconnected") == 1


# ---------------------------------------------------------------- non-Exception hook errors
@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt()])
def test_a_hook_raising_a_base_exception_stops_the_machine_and_releases(
        h: Harness, error: BaseException) -> None:
    calls = record(h)
    errors: list[BaseException] = []
    h.on_error(errors.append)

    def boom(term: object) -> None:
        raise error

    h.on_enter_leader(boom)
    h.connect()
    h.elect()
    assert h.state == "disconnected" and h.dispatcher.stopped
    assert h.shut_down, "the session is ended (lease revoked, threads stopped)"
    assert calls.count("enter_leader") == calls.count("exit_leader") == 1
    assert len(errors) == 1 and isinstance(errors[0], HookError)
    assert errors[0].cause is error


def test_an_on_error_hook_raising_system_exit_stops_the_machine(h: Harness) -> None:
    def boom(_exc: BaseException) -> None:
        raise SystemExit(1)

    h.on_error(boom)
    h.on_enter_candidate(lambda change: 1 / 0)
    h.connect()
    assert h.dispatcher.stopped and h.shut_down and h.state == "disconnected"


def test_work_that_cannot_start_stops_the_machine_instead_of_leading_idle() -> None:
    class NoThreads(Harness):
        def start_work(self, work: object, term: object) -> None:
            raise RuntimeError("can't start new thread")

    h = NoThreads()
    errors: list[BaseException] = []
    h.on_error(errors.append)
    h.run_while_leader(lambda term: None)
    h.connect()
    h.elect()
    assert h.state == "disconnected" and h.shut_down
    assert [str(e) for e in errors] == ["can't start new thread"]


# ---------------------------------------------------------------- resign bound to its term
def test_a_resign_meant_for_an_earlier_term_does_not_end_a_later_one(h: Harness) -> None:
    h.connect()
    h.elect()
    assert h.term is not None
    old = h.term.token
    h.inject(Resign(token=old))
    h.elect()
    assert h.state == "leader" and h.term is not None and h.term.token != old
    h.inject(Resign(token=old))  # queued in the old term, applied in the new one
    assert h.state == "leader"
    assert len(h.resigns) == 1


# ---------------------------------------------------------------- pairing and naming, at the edges
def test_a_later_on_leader_change_hook_does_not_name_us_once_the_term_is_dead(
        h: Harness) -> None:
    named: list[tuple[str, bool]] = []

    def slow(old: object, new: LeaderInfo | None) -> None:
        if new is not None and new.identity == "node-a":
            h.clock.advance(10.0)  # outlasts the deadline

    def second(old: object, new: LeaderInfo | None) -> None:
        if new is not None and new.identity == "node-a":
            named.append(("second", h.term is not None and h.term.valid))

    h.on_leader_change(slow)
    h.on_leader_change(second)
    h.connect()
    h.elect()
    assert named == []


def test_a_term_that_dies_as_it_is_entered_runs_neither_enter_nor_exit_hooks(
        h: Harness) -> None:
    h.connect()

    class Ticking(type(h.clock)):  # type: ignore[misc]
        def __call__(self) -> float:  # each read moves on, as a real clock does
            self.now += 1e-3
            return float(self.now)

    deadline = h.deadline(h.dispatcher.generation or 0)
    for offset in range(1, 8):  # land the deadline between any two reads of the clock
        h2 = Harness(identity="node-a", ttl=5)
        got: list[str] = []
        h2.on_enter_leader(lambda t, got=got: got.append("enter"))
        h2.on_exit_leader(lambda t, got=got: got.append("exit"))
        h2.connect()
        h2.clock.now = deadline - offset * 1e-3 - 1e-4
        h2.clock.__class__ = Ticking
        h2.elect()
        h2.advance(1)
        assert got in ([], ["enter", "exit"]), (offset, got)


def test_exit_hooks_of_an_earlier_term_do_not_run_for_a_term_that_never_began() -> None:
    class Flaky(Harness):
        fail = False

        def bind_term(self, term: object) -> None:
            if self.fail:
                raise MemoryError("an internal failure while entering")
            super().bind_term(term)  # type: ignore[arg-type]

    h = Flaky()
    calls: list[tuple[str, int]] = []
    h.on_enter_leader(lambda t: calls.append(("enter", t.token)))
    h.on_exit_leader(lambda t: calls.append(("exit", t.token)))
    h.connect()
    h.elect()
    h.inject(Resign())
    h.fail = True
    with pytest.raises(MemoryError):
        h.elect()
    h.dispatcher.abort(MemoryError("as the elector's dispatcher thread does"))
    assert [c[0] for c in calls] == ["enter", "exit"]


def test_a_new_lease_on_the_leaders_key_is_a_leader_change(h: Harness) -> None:
    changes: list[tuple[int, int]] = []
    h.on_leader_change(lambda old, new: changes.append((old.lease if old else 0,
                                                        new.lease if new else 0)))
    h.connect()
    seen = h.see_leader("node-b", lease=0xB)
    assert seen.leader is not None
    moved = attrs.evolve(seen.leader, lease=0xC)  # same key and create revision, new lease
    h.inject(LeaderSeen(leader=moved, revision=h.next_revision()))
    assert changes == [(0, 0xB), (0xB, 0xC)]
    assert h.leader is not None and h.leader.lease == 0xC


def test_the_key_of_a_resigned_term_never_leads_again(h: Harness) -> None:
    """After resign our old key is still first until the campaign deletes it: a view of it
    (the stream) or a late read must not start a second term on the same token."""
    entered: list[int] = []
    h.on_enter_leader(lambda term: entered.append(term.token))
    up = h.connect()
    first = h.elect()
    h.inject(Resign())
    old = LeaderInfo(identity="node-a", key=first.key, create_revision=first.create_revision,
                     lease=up.lease, value=b"node-a")
    h.inject(LeaderSeen(leader=old, revision=h.next_revision()))
    h.inject(Elected(generation=up.generation, key=first.key,
                     create_revision=first.create_revision, revision=h.next_revision()))
    assert h.state != "leader" and entered == [first.create_revision]
    h.elect()  # a new incarnation leads
    assert h.state == "leader" and len(entered) == 2 and entered[1] > entered[0]


@pytest.mark.parametrize("state", ["candidate", "follower"])
def test_a_waiting_candidate_whose_key_is_deleted_campaigns_again(h: Harness,
                                                                  state: str) -> None:
    """No campaign watches the line: the stream's report that our key was deleted (by hand,
    say) is what puts it back, else we would wait forever with no key in etcd."""
    h.connect()
    if state == "follower":
        h.see_leader("node-b")
    assert h.state == state
    our_key = h.dispatcher.our_key or ""
    h.inject(LeaderSeen(leader=h.leader, revision=h.next_revision(), deleted=("x/1",)))
    assert h.recampaigns == [], "another candidate's key going is not news for us"
    h.inject(LeaderSeen(leader=h.leader, revision=h.next_revision(), deleted=(our_key,)))
    assert h.recampaigns == [h.dispatcher.generation]
    h.inject(LeaderSeen(leader=h.leader, revision=h.next_revision(),
                        present=frozenset({our_key, "x/2"})))
    assert h.recampaigns == [h.dispatcher.generation], "a read that finds our key: no news"
    h.inject(LeaderSeen(leader=h.leader, revision=h.next_revision(), present=frozenset({"x/2"})))
    assert h.recampaigns == [h.dispatcher.generation] * 2, (
        "a read (after a gap, say) that does not find our key: campaign again")


def test_a_leader_is_deposed_not_recampaigned_by_the_delete_report(h: Harness) -> None:
    h.connect()
    h.elect()
    assert h.state == "leader"
    our_key = h.dispatcher.our_key or ""
    h.inject(LeaderSeen(leader=None, revision=h.next_revision(), deleted=(our_key,)))
    assert h.state == "candidate"
    assert h.recampaigns == [h.dispatcher.generation], "one campaign, from the deposal"
