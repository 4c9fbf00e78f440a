"""electfsm.chaos.checker on synthetic histories: every property passes a clean run and flags a
crafted violation (so no property is one that cannot fail)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from electfsm.chaos import checker
from electfsm.chaos.checker import EtcdHistory, Report, check, terms_of

E = "e"  # the election
SET = "s"  # the guarded set


def ev(inc: str, kind: str, t: float, **fields: Any) -> dict[str, Any]:
    return {"mono": t, "wall": 1e9 + t, "inc": inc, "identity": inc.split("#")[0],
            "pid": 1, "kind": kind, **fields}


def hook(inc: str, kind: str, t: float, **fields: Any) -> dict[str, Any]:
    return ev(inc, kind, t, hook=kind, thread=f"electfsm-dispatch[{inc}]", depth=1, **fields)


def tr(inc: str, t: float, src: str, dst: str, trig: str, **fields: Any) -> dict[str, Any]:
    return hook(inc, "transition", t, source=src, dest=dst, trigger=trig, reason="", **fields)


def put(rev: int, key: str, t: float, *, create: int | None = None, lease: int = 0,
        value: str = "") -> dict[str, Any]:
    return {"kind": "etcd_event", "type": "PUT", "rev": rev, "key": key,
            "create_revision": create or rev, "mod_revision": rev, "lease": lease,
            "value": value, "mono": t}


def delete(rev: int, key: str, t: float) -> dict[str, Any]:
    return {"kind": "etcd_event", "type": "DELETE", "rev": rev, "key": key,
            "create_revision": 0, "mod_revision": rev, "lease": 0, "value": "", "mono": t}


A, B = "a#1", "b#2"
KA, KB = f"{E}/a", f"{E}/b"


def entry(token: int, inc: str, n: int) -> str:
    return json.dumps({"token": token, "inc": inc, "n": n})


def clean() -> dict[str, Any]:
    """a leads (token 10) from t=1, its link dies, it steps down at its deadline (4.0);
    its lease expires on the server at 4.3; b (token 12) leads from 4.35 and stops at 8."""
    history = [
        ev(A, "start", 0.0), ev(B, "start", 0.1),
        tr(A, 0.5, "disconnected", "candidate", "session_up"),
        tr(B, 0.6, "disconnected", "candidate", "session_up"),
        ev(A, "view", 1.0, leader="a", leader_token=10),
        ev(B, "view", 1.1, leader="a", leader_token=10),
        tr(A, 1.0, "candidate", "leader", "elected", revision=12),
        hook(A, "enter_leader", 1.0, token=10, key=KA, lease=0xA, generation=1, deadline=2.75),
        tr(B, 1.1, "candidate", "follower", "leader_seen"),
        ev(A, "renew", 1.7, token=10, deadline=3.4),
        ev(A, "work", 2.0, token=10, n=1, deadline=3.4),
        ev(A, "fenced_write", 2.01, token=10, n=1, start=2.005, deadline=3.4,
           result="accepted"),
        ev(A, "guarded_append", 2.02, token=10, n=1, key=f"{SET}/{A}-1", start=2.01,
           deadline=3.4, result="ack", revision=13),
        ev(A, "renew", 2.25, token=10, deadline=4.0),
        hook(A, "exit_leader", 4.0, token=10, key=KA, lease=0xA, ended_by="session_lost"),
        tr(A, 4.0, "leader", "disconnected", "session_lost"),
        ev(A, "invalid", 4.01, token=10, state="disconnected"),
        ev(A, "view", 4.0, leader=None, leader_token=None),
        ev(B, "view", 4.3, leader=None, leader_token=None),
        tr(B, 4.34, "follower", "candidate", "leader_gone"),
        ev(B, "view", 4.35, leader="b", leader_token=12),
        ev(A, "view", 4.6, leader="b", leader_token=12),
        tr(B, 4.35, "candidate", "leader", "elected", revision=15),
        hook(B, "enter_leader", 4.35, token=12, key=KB, lease=0xB, generation=1,
             deadline=6.0),
        ev(B, "work", 4.5, token=12, n=1, deadline=6.0),
        ev(B, "fenced_write", 4.51, token=12, n=1, start=4.505, deadline=6.0,
           result="accepted"),
        ev(B, "guarded_append", 4.52, token=12, n=1, key=f"{SET}/{B}-1", start=4.51,
           deadline=6.0, result="ack", revision=16),
        ev(B, "renew", 5.0, token=12, deadline=7.5),
        ev(B, "control", 5.5, op="proclaim", token=12, start=5.45, result="applied"),
        # a's paused term, back: its guarded resign and proclaim are refused
        ev(A, "control", 5.62, op="resign", token=10, start=5.6, result="rejected"),
        ev(A, "control", 5.65, op="proclaim", token=10, start=5.63, result="rejected"),
        hook(B, "exit_leader", 8.0, token=12, key=KB, lease=0xB, ended_by="stop"),
        tr(B, 8.0, "leader", "disconnected", "stop"),
        ev(B, "stopped", 8.1, leftover=[]),
        ev(A, "stopped", 8.2, leftover=[]),
    ]
    etcd = [
        {"kind": "etcd_snapshot", "rev": 9, "kvs": [], "mono": 0.0},
        put(10, KA, 0.55, lease=0xA, value="a"),
        put(12, KB, 0.65, lease=0xB, value="b"),
        put(13, f"{SET}/{A}-1", 2.02, value=entry(10, A, 1)),
        delete(14, KA, 4.3),
        put(16, f"{SET}/{B}-1", 4.52, value=entry(12, B, 1)),
        delete(17, KB, 8.0),
    ]
    resource = [
        {"kind": "resource_write", "mono": 2.006, "wall": 0, "token": 10, "identity": "a",
         "payload": {"inc": A, "n": 1}, "accepted": True, "highest_before": 0},
        {"kind": "resource_write", "mono": 4.506, "wall": 0, "token": 12, "identity": "b",
         "payload": {"inc": B, "n": 1}, "accepted": True, "highest_before": 10},
    ]
    return {"history": history, "etcd": etcd, "resource": resource}


def run(world: dict[str, Any], **kwargs: Any) -> Report:
    etcd = EtcdHistory(world["etcd"], election=E)
    return check(world["history"], resource=world["resource"], etcd=etcd, guarded_set=SET,
                 **kwargs)


def test_the_clean_history_passes_every_property() -> None:
    report = run(clean(), heals=[(3.0, 2.6)], quiet=[(5.0, 7.9)], stepdowns=[(4.0, 2.6)],
                 leftover_keys=[], leftover_leases=[], settled=(4.5, 0.5),
                 etcd_caught_up=True)
    assert report.ok, report.markdown()
    assert all(r.status == "pass" for r in report.results), report.markdown()
    assert report.metrics["dual_leader_window"] == 0
    assert report.metrics["terms"] == 2


def mutate(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    world = copy.deepcopy(clean())
    fn(world)
    world["history"].sort(key=checker.t_of)
    return world


def find(world: dict[str, Any], inc: str, kind: str) -> dict[str, Any]:
    return next(e for e in world["history"] if e.get("inc") == inc and e["kind"] == kind)


def fails(report: Report, name: str) -> str:
    result = report[name]
    assert result.status == "fail", report.markdown()
    others = [r.name for r in report.violations if r.name != name]
    return f"{result.details} (others failing: {others})"


def test_p1_flags_a_later_term_with_a_smaller_token() -> None:
    def f(w: dict[str, Any]) -> None:
        find(w, B, "enter_leader")["token"] = 9
    assert "not increasing" in fails(run(mutate(f)), "P1")


def test_p2_flags_a_stale_write_the_resource_accepted() -> None:
    def f(w: dict[str, Any]) -> None:
        w["resource"].append({"kind": "resource_write", "mono": 4.6, "wall": 0, "token": 10,
                              "identity": "a", "payload": {"inc": A, "n": 2},
                              "accepted": True, "highest_before": 12})
    assert "accepted token 10" in fails(run(mutate(f)), "P2")


def test_p2_flags_a_candidate_that_saw_a_write_accepted_that_the_resource_did_not() -> None:
    def f(w: dict[str, Any]) -> None:
        w["resource"][0]["accepted"] = False
    assert "no such accepted write" in fails(run(mutate(f)), "P2")


def test_p3_flags_a_lost_acknowledged_append() -> None:
    def f(w: dict[str, Any]) -> None:
        w["etcd"] = [e for e in w["etcd"] if e.get("key") != f"{SET}/{A}-1"]
    assert "is lost" in fails(run(mutate(f)), "P3")


def test_p3_flags_an_append_committed_while_another_term_led() -> None:
    def f(w: dict[str, Any]) -> None:  # a's write lands after b took over
        w["etcd"].append(put(18, f"{SET}/{A}-9", 5.0, value=entry(10, A, 9)))
    assert "while" in fails(run(mutate(f)), "P3")


def test_p3_flags_an_append_refused_as_not_leader_that_was_written_anyway() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].append(ev(A, "guarded_append", 3.0, token=10, n=7,
                               key=f"{SET}/{A}-7", start=2.9, deadline=4.0,
                               result="not_leader"))
        w["etcd"].append(put(13, f"{SET}/{A}-7", 3.0, value=entry(10, A, 7)))
    assert "refused as not leader" in fails(run(mutate(f)), "P3")


def test_p4_flags_work_begun_after_the_term_ended() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].append(ev(A, "fenced_write", 4.2, token=10, n=5, start=4.1,
                               deadline=4.0, result="accepted"))
    assert "after the term ended" in fails(run(mutate(f)), "P4")


def test_p5_flags_two_terms_at_once() -> None:
    def f(w: dict[str, Any]) -> None:
        find(w, A, "exit_leader")["mono"] = 5.0
        find(w, A, "invalid")["mono"] = 5.01
        w["history"].append(ev(A, "renew", 3.5, token=10, deadline=5.5))
    report = run(mutate(f))
    assert "overlapped" in fails(report, "P5")
    assert report.metrics["dual_leader_window"] == pytest.approx(0.65)


def test_p5_flags_a_term_that_outlived_its_key() -> None:
    def f(w: dict[str, Any]) -> None:  # deleted 1 s before a stepped down: a missed it
        for e in w["etcd"]:
            if e.get("type") == "DELETE" and e["key"] == KA:
                e["mono"] = 3.0
    assert "after etcd deleted its key" in fails(run(mutate(f)), "P5")

    def g(w: dict[str, Any]) -> None:  # deleted just before: the watch needs a moment
        for e in w["etcd"]:
            if e.get("type") == "DELETE" and e["key"] == KA:
                e["mono"] = 3.9
    assert run(mutate(g))["P5"].status == "pass"



def test_p5_only_reports_overlap_when_faults_were_unbounded() -> None:
    def f(w: dict[str, Any]) -> None:
        find(w, A, "exit_leader")["mono"] = 5.0
        find(w, A, "invalid")["mono"] = 5.01
        w["history"].append(ev(A, "renew", 3.5, token=10, deadline=5.5))
    report = run(mutate(f), bounded=False)
    assert report["P5"].status == "pass" and report["P5"].details
    assert report.metrics["dual_leader_window"] > 0


def test_p6_flags_a_leader_whose_key_was_gone_at_the_confirming_revision() -> None:
    def f(w: dict[str, Any]) -> None:
        for e in w["history"]:
            if e.get("inc") == B and e.get("trigger") == "elected":
                e["revision"] = 11  # before b's key was created
    assert "did not exist" in fails(run(mutate(f)), "P6")


def test_p6_flags_a_leader_that_was_not_first() -> None:
    def f(w: dict[str, Any]) -> None:
        for e in w["history"]:
            if e.get("inc") == B and e.get("trigger") == "elected":
                e["revision"] = 13  # a's older key still existed
    assert "the leader was" in fails(run(mutate(f)), "P6")


def test_p7_flags_a_transition_missing_from_the_table() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].append(tr(A, 4.1, "disconnected", "leader", "elected"))
    assert "not in the transition table" in fails(run(mutate(f)), "P7")


def test_p7_flags_a_broken_chain_and_concurrent_hooks() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].remove(next(e for e in w["history"] if e.get("inc") == B
                                 and e.get("trigger") == "leader_seen"))
        find(w, A, "enter_leader")["depth"] = 2
    details = fails(run(mutate(f)), "P7")
    assert "but the machine was in" in details and "while another hook" in details


def test_p7_flags_hooks_on_two_threads() -> None:
    def f(w: dict[str, Any]) -> None:
        find(w, A, "exit_leader")["thread"] = "some-other-thread"
    assert "several threads" in fails(run(mutate(f)), "P7")


def test_p8_flags_a_stale_proclaim_that_was_applied() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].append(ev(A, "control", 5.0, op="proclaim", token=10, start=4.9,
                               result="applied"))
    assert "stale proclaim" in fails(run(mutate(f)), "P8")


def test_p8_flags_a_stale_resign_that_deleted_the_new_leaders_key() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].append(ev(A, "control", 5.0, op="resign", token=10, start=4.9))
        w["etcd"].append(delete(18, KB, 5.05))
        w["etcd"].append(put(19, KB, 5.06, lease=0xB, value="b"))
    assert "deleted" in fails(run(mutate(f)), "P8")


def test_l1_flags_no_leader_long_after_a_heal() -> None:
    report = run(clean(), heals=[(1.5, 0.5)])  # a led then: passes
    assert report["L1"].status == "pass"
    report = run(clean(), heals=[(4.05, 0.2)])  # b only at 4.35
    assert "no leader within" in fails(report, "L1")


def test_l3_flags_a_transition_in_a_quiet_window() -> None:
    assert "transition(s) in the quiet window" in fails(run(clean(), quiet=[(3.5, 4.5)]),
                                                        "L3")


def test_l4_flags_a_lease_stuck_after_a_step_down() -> None:
    assert "no new leader" in fails(run(clean(), stepdowns=[(4.0, 0.2)]), "L4")


def test_l5_flags_leftover_keys_leases_and_threads() -> None:
    def f(w: dict[str, Any]) -> None:
        find(w, B, "stopped")["leftover"] = ["electfsm-session[e]"]
    details = fails(run(mutate(f), leftover_keys=[KB], leftover_leases=[0xB]), "L5")
    assert "left threads" in details and "keys left" in details and "leases left" in details


def test_terms_end_at_the_deadline_or_death_whichever_is_first() -> None:
    w = mutate(lambda w: w["history"].append({"mono": 1.5, "kind": "killed", "inc": A}))
    span = next(s for s in terms_of(w["history"]) if s.inc == A)
    assert span.end == 1.5
    span = next(s for s in terms_of(clean()["history"]) if s.inc == A)
    assert span.end == 4.0 and span.deadline == 4.0


def test_faked_clocks_are_mapped_onto_the_harness_clock() -> None:
    rec = {"mono": 1000.0, "recv_mono": 5.0, "clock_rate": 0.5, "deadline": 1001.0}
    assert checker.t_of(rec) == 5.0
    assert checker.real_time(rec, 1001.0) == pytest.approx(7.0)  # 1 fake s = 2 real s


def test_etcd_history_knows_the_leader_and_state_at_each_revision() -> None:
    h = EtcdHistory(clean()["etcd"], election=E)
    assert h.leader_at(9) is None
    assert h.leader_at(12)["key"] == KA  # type: ignore[index]
    assert h.leader_at(14)["key"] == KB  # type: ignore[index]
    assert h.leader_at(17) is None
    assert h.kv_at(KA, 13)["lease"] == 0xA  # type: ignore[index]
    assert h.kv_at(KA, 14) is None
    assert h.deleted_at(KA, 10) == 4.3
    assert set(h.final(SET + "/")) == {f"{SET}/{A}-1", f"{SET}/{B}-1"}
    assert not h.covers(8) and h.covers(12)
    nested = EtcdHistory([*clean()["etcd"], put(20, f"{E}/x/deeper", 9.0)], election=E)
    assert nested.leader_at(20) is None, "keys of nested elections are not candidates"


def test_report_renders_markdown_and_json() -> None:
    report = run(clean())
    md = report.markdown()
    assert "| P1 token monotonicity | pass |" in md and "dual_leader_window" in md
    assert json.loads(json.dumps(report.to_json()))["ok"] is True


def test_the_fenced_resource_rejects_tokens_below_the_highest_it_accepted(tmp_path: Any
                                                                         ) -> None:
    from electfsm.chaos.fenced import FencedClient, FencedResource

    log = tmp_path / "resource.jsonl"
    with FencedResource(log_path=str(log)) as resource:
        a, b = FencedClient(resource.endpoint), FencedClient(resource.endpoint)
        assert a.write(token=5, identity="a", payload=1)
        assert a.write(token=5, identity="a", payload=2)  # same term again: fine
        assert b.write(token=9, identity="b", payload=3)
        assert not a.write(token=5, identity="a", payload=4)  # stale now
        a.close()
        b.close()
        assert resource.highest == 9
        assert [w.payload for w in resource.accepted] == [1, 2, 3]
        assert [w.payload for w in resource.rejected] == [4]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert checker.p2_no_stale_fenced_write(records).status == "pass"
    records[-1]["accepted"] = True  # as if it had taken the stale write
    assert checker.p2_no_stale_fenced_write(records).status == "fail"


def test_require_fails_a_property_a_run_meant_to_exercise_but_did_not() -> None:
    report = run(clean())  # no heals given: L1 checks nothing
    assert report["L1"].status == "n/a" and report.ok
    assert "L1" in report.unexercised
    report.require("P2", "L1")
    assert report["P2"].status == "pass"
    assert "expected to be exercised" in fails(report, "L1")
    assert not report.ok
    with pytest.raises(KeyError):
        report.require("P9")


def test_p2_fails_accepted_writes_when_the_resource_log_is_empty() -> None:
    def f(w: dict[str, Any]) -> None:
        w["resource"] = []
    assert "resource's log is empty" in fails(run(mutate(f)), "P2")


def test_p2_flags_a_write_accepted_with_a_token_its_writer_never_held() -> None:
    def f(w: dict[str, Any]) -> None:  # a writes with b's token after b took over
        w["resource"].append({"kind": "resource_write", "mono": 4.6, "wall": 0, "token": 12,
                              "identity": "a", "payload": {"inc": A, "n": 3},
                              "accepted": True, "highest_before": 12})
    assert "never held" in fails(run(mutate(f)), "P2")


def test_p2_and_p3_count_the_stale_attempts_and_their_refusals() -> None:
    def f(w: dict[str, Any]) -> None:  # a's write after a pause past its term
        w["history"].append(ev(A, "fenced_write", 4.6, token=10, n=4, start=3.0, sent=4.59,
                               deadline=3.4, stale_attempt=True, result="rejected"))
        w["resource"].append({"kind": "resource_write", "mono": 4.595, "wall": 0,
                              "token": 10, "identity": "a", "payload": {"inc": A, "n": 4},
                              "accepted": False, "highest_before": 12})
        w["history"].append(ev(A, "guarded_append", 4.7, token=10, n=5, key=f"{SET}/{A}-5",
                               start=3.1, deadline=3.4, stale_attempt=True,
                               result="not_leader"))
    report = run(mutate(f))
    assert report.ok, report.markdown()
    assert report["P2"].metrics["stale_attempts"] == 1
    assert report["P2"].metrics["stale_attempts_rejected"] == 1
    assert report["P2"].metrics["stale_rejected"] == 1
    assert report["P3"].metrics["stale_refused_by_etcd"] == 1


def test_p6_fails_a_term_whose_confirming_revision_is_unknown() -> None:
    def f(w: dict[str, Any]) -> None:
        for e in w["history"]:
            if e.get("inc") == B and e.get("trigger") == "elected":
                del e["revision"]
    assert "logged no revision" in fails(run(mutate(f)), "P6")

    def g(w: dict[str, Any]) -> None:
        w["etcd"].append({"kind": "etcd_gap", "from": 14, "to": 16, "mono": 4.4})
    assert "does not cover" in fails(run(mutate(g)), "P6")


def test_p8_counts_only_stale_requests() -> None:
    report = run(clean())
    assert report["P8"].checked == 2  # a's two, not b's own proclaim
    assert report["P8"].metrics == {"controls": 3, "stale": 2}


def test_p8_window_starts_when_the_request_left_not_when_it_was_logged() -> None:
    def f(w: dict[str, Any]) -> None:  # the delete lands between the send and the log line
        w["etcd"].append(delete(18, KB, 5.61))
        w["etcd"].append(put(19, KB, 5.7, lease=0xB, value="b"))
    assert "deleted at 5.610" in fails(run(mutate(f)), "P8")


def test_l2_flags_a_candidate_whose_view_lags_etcds_leader() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].remove(next(e for e in w["history"] if e.get("inc") == A
                                 and e["kind"] == "view" and e.get("leader") == "b"))
    assert "still saw token None" in fails(run(mutate(f), settled=(4.5, 0.5)), "L2")
    assert run(clean(), settled=(4.5, 0.5))["L2"].checked == 2


def test_an_etcd_history_that_did_not_catch_up_fails_the_run() -> None:
    assert "had not caught up" in fails(run(clean(), etcd_caught_up=False), "H")
    assert run(clean(), etcd_caught_up=True)["H"].status == "pass"


def test_p4_flags_a_leader_hook_begun_after_the_terms_deadline() -> None:
    def f(w: dict[str, Any]) -> None:  # an elected applied late, behind a slow hook
        find(w, B, "enter_leader")["deadline"] = 4.2
    assert "on_enter_leader ran at 4.350" in fails(run(mutate(f)), "P4")


def test_l5_flags_a_dispatcher_gone_while_the_session_renews() -> None:
    def f(w: dict[str, Any]) -> None:
        w["history"].append(ev(A, "stats", 3.0, threads=5, state="leader",
                               electfsm_threads=["electfsm-session[e]"]))
    assert "dispatcher is gone" in fails(run(mutate(f)), "L5")
    assert run(mutate(lambda w: w["history"].append(
        ev(A, "stats", 3.0, threads=5, state="leader",
           electfsm_threads=["electfsm-dispatch[e]", "electfsm-session[e]"]))))["L5"].ok


def _entering_then(last: dict[str, Any]) -> list[dict[str, Any]]:
    """An incarnation that follows, starts into leader (its exit_follower hook is told
    "elected"), and then ``last``."""
    i = "x#1"
    return [_tr(i, 1.0, "disconnected", "candidate", "session_up", "enter_candidate"),
            _tr(i, 1.1, "candidate", "follower", "leader_seen", "enter_follower"),
            _tr(i, 1.2, "follower", "leader", "elected", "exit_follower"),
            last]


def _tr(inc: str, t: float, src: str, dst: str, trig: str, name: str) -> dict[str, Any]:
    return {**tr(inc, t, src, dst, trig), "hook": name}


def test_p7_accepts_a_term_that_died_while_the_exit_hooks_ran() -> None:
    """The dispatcher's rule: a term that dies while the old state's exit hooks run is never
    entered; the machine goes to disconnected from where it was."""
    diverted = _tr("x#1", 1.3, "follower", "disconnected", "session_lost",
                   "enter_disconnected")
    from electfsm.chaos.safety import p7_legal_transitions
    assert p7_legal_transitions(_entering_then(diverted)).status == "pass"


@pytest.mark.parametrize("src, trig", [("candidate", "session_lost"), ("follower", "stop")])
def test_p7_still_flags_a_leader_entry_that_went_elsewhere(src: str, trig: str) -> None:
    wrong = _tr("x#1", 1.3, src, "disconnected", trig, "enter_disconnected")
    from electfsm.chaos.safety import p7_legal_transitions
    assert p7_legal_transitions(_entering_then(wrong)).status == "fail"
