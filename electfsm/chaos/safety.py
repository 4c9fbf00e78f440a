"""The safety properties P1-P8: what no fault may ever make electfsm do."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from electfsm.chaos.recorder import EtcdHistory
from electfsm.chaos.records import TermSpan, overlap, real_time, t_of
from electfsm.chaos.report import Result
from electfsm.machine import legal

# --------------------------------------------------------------------------- properties


def p1_token_monotonicity(spans: Sequence[TermSpan]) -> Result:
    """Tokens of successive terms (ordered by start) strictly increase."""
    r = Result("P1", "token monotonicity")
    last: TermSpan | None = None
    for s in spans:
        r.checked += 1
        if last is not None and s.token <= last.token:
            r.fail(f"term {s.inc}@{s.token} began at {s.start:.3f} after "
                   f"{last.inc}@{last.token} (began {last.start:.3f}): token not increasing")
        last = s
    tokens = [s.token for s in spans]
    dupes = {t for t in tokens if tokens.count(t) > 1}
    for t in sorted(dupes):
        r.fail(f"token {t} was used by more than one term")
    return r.finish()


def p2_no_stale_fenced_write(writes: Sequence[dict[str, Any]],
                             history: Sequence[dict[str, Any]] = (),
                             spans: Sequence[TermSpan] | None = None) -> Result:
    """The resource never accepted a token below the highest it had accepted; every write a
    candidate saw accepted is in the resource's log as accepted (an empty log with accepted
    writes fails); with ``spans``, every accepted write came from a candidate that held
    that token. ``checked`` counts the resource's writes; the metrics say how many stale
    attempts (writes sent after a pause that followed the term check) there were and how
    many writes the resource rejected as stale."""
    r = Result("P2", "no stale fenced write accepted")
    highest = 0
    stale_rejected = 0
    accepted_keys: set[tuple[int, str, int]] = set()
    for w in sorted(writes, key=lambda w: float(w["mono"])):
        r.checked += 1
        token = int(w["token"])
        if w.get("accepted"):
            if token < highest:
                r.fail(f"resource accepted token {token} from {w.get('identity')} at "
                       f"{float(w['mono']):.3f} after accepting {highest}")
            highest = max(highest, token)
            payload = w.get("payload") or {}
            if isinstance(payload, dict):
                accepted_keys.add((token, str(payload.get("inc")), int(payload.get("n", -1))))
        elif token < highest:
            stale_rejected += 1
    seen_accepted = [ev for ev in history
                     if ev.get("kind") == "fenced_write" and ev.get("result") == "accepted"]
    if seen_accepted and not writes:
        r.fail(f"candidates saw {len(seen_accepted)} fenced writes accepted, but the "
               "resource's log is empty: nothing to cross-check them against")
    elif writes:
        for ev in seen_accepted:
            key = (int(ev["token"]), str(ev.get("inc")), int(ev.get("n", -1)))
            if key not in accepted_keys:
                r.fail(f"{ev.get('inc')} saw write {key} accepted; the resource has no "
                       "such accepted write")
    if spans is not None:
        held = {(s.inc, s.token) for s in spans}
        for token, inc, n in sorted(accepted_keys):
            if (inc, token) not in held:
                r.fail(f"the resource accepted write {n} of {inc} with token {token}, a "
                       "token that candidate never held")
    attempts = [ev for ev in history
                if ev.get("kind") == "fenced_write" and ev.get("stale_attempt")]
    r.metrics = {"accepted": sum(1 for w in writes if w.get("accepted")),
                 "stale_attempts": len(attempts),
                 "stale_attempts_rejected": sum(1 for ev in attempts
                                                if ev.get("result") == "rejected"),
                 "stale_rejected": stale_rejected}
    return r.finish()


def p3_no_lost_guarded_updates(history: Sequence[dict[str, Any]], etcd: EtcdHistory | None,
                               guarded_set: str | None,
                               final: dict[str, dict[str, Any]] | None = None) -> Result:
    """Every acknowledged guarded append is in the final state; every committed append was
    written while its token's key led the election; appends refused as "not leader" left
    nothing behind."""
    r = Result("P3", "no lost guarded updates")
    if guarded_set is None or (etcd is None and final is None):
        return r.finish()
    prefix = guarded_set + "/"
    state = final if final is not None else etcd.final(prefix) if etcd is not None else {}
    acks = unknown = refused = stale_attempts = stale_refused = 0
    for ev in history:
        if ev.get("kind") != "guarded_append":
            continue
        key, result = str(ev["key"]), ev.get("result")
        r.checked += 1
        if ev.get("stale_attempt"):
            stale_attempts += 1
            stale_refused += result == "not_leader"
        if result == "ack":
            acks += 1
            kv = state.get(key)
            if kv is None:
                r.fail(f"acknowledged append {key} (token {ev['token']}) is lost")
            elif json.loads(kv["value"]).get("token") != ev["token"]:
                r.fail(f"acknowledged append {key} holds another token: {kv['value']}")
        elif result == "not_leader":
            refused += 1
            if key in state:
                r.fail(f"append {key} was refused as not leader, yet it is in etcd")
        else:
            unknown += 1
    if etcd is not None:
        for key, kv in state.items():
            r.checked += 1
            rev = int(kv["create_revision"])
            try:
                token = int(json.loads(kv["value"])["token"])
            except (ValueError, KeyError, TypeError):
                r.fail(f"{key} holds an unreadable value {kv['value']!r}")
                continue
            if not etcd.covers(rev):
                continue
            lead = etcd.leader_at(rev)
            if lead is None or int(lead["create_revision"]) != token:
                who = f"{lead['key']}@{lead['create_revision']}" if lead else "nobody"
                r.fail(f"{key} (token {token}) committed at revision {rev} while {who} led")
    r.metrics = {"acknowledged": acks, "ambiguous": unknown, "refused": refused,
                 "stale_attempts": stale_attempts, "stale_refused_by_etcd": stale_refused,
                 "final_entries": len(state)}
    return r.finish()


def p4_no_work_after_deadline(spans: Sequence[TermSpan]) -> Result:
    """No leader hook and no leader action began after its term's deadline, exit hook, or
    loss of validity."""
    r = Result("P4", "no leader work after the local deadline")
    for s in spans:
        r.checked += 1
        if s.enter_deadline is not None and s.start > s.enter_deadline:
            r.fail(f"{s.inc}@{s.token}: on_enter_leader ran at {s.start:.3f}, "
                   f"{s.start - s.enter_deadline:.3f}s after the term's deadline")
        for act in s.acts:
            r.checked += 1
            began = real_time(act, float(act["start"])) if "start" in act else t_of(act)
            limit = s.known_end
            if "deadline" in act:
                limit = min(limit, real_time(act, float(act["deadline"])))
            if began > limit:
                r.fail(f"{s.inc}@{s.token}: {act['kind']} began at {began:.3f}, "
                       f"{began - limit:.3f}s after the term ended (deadline/exit)")
    return r.finish()


def p5_no_overlap(spans: Sequence[TermSpan], etcd: EtcdHistory | None = None,
                  *, bounded: bool = True, watch_slack: float = 0.5) -> Result:
    """No two terms acted at once, and no term outlived its key in etcd (under bounded
    faults; otherwise the window is reported, not failed).

    A term's end is capped by its deadline, so a key that expired on time never trips the
    second check; a key deleted before the deadline (revoked, deleted by hand, etcd's
    mass revocation) reaches the leader only through its watch, which gets
    ``watch_slack`` seconds to notice.
    """
    r = Result("P5", "no dual-leader window" + ("" if bounded else " (reported only)"))
    total, pairs = overlap(spans)
    r.checked = len(spans)
    outlived: list[str] = []
    if etcd is not None:
        for s in spans:
            gone = etcd.deleted_at(s.key, s.token)
            if gone is None:
                continue
            if s.end > gone + watch_slack:
                outlived.append(f"{s.inc}@{s.token} acted until {s.end:.3f}, "
                                f"{s.end - gone:.3f}s after etcd deleted its key")
    r.metrics = {"dual_leader_window": round(total, 4),
                 "max_overlap": round(max((p[2] for p in pairs), default=0.0), 4),
                 "terms_outliving_key": len(outlived)}
    notes = [f"{a} and {b} overlapped {d:.3f}s" for a, b, d in pairs] + outlived
    if bounded:
        for n in notes:
            r.fail(n)
    else:
        r.details.extend(notes[:20])
    return r.finish()


def p6_no_phantom_leadership(spans: Sequence[TermSpan], etcd: EtcdHistory | None) -> Result:
    """At the revision that confirmed it, each leader's key existed with its lease and had
    the lowest create revision of the election. A term that logged no confirming revision,
    or whose revision the recorded history does not cover, fails: it cannot be verified."""
    r = Result("P6", "no phantom leadership")
    if etcd is None:
        return r.finish()
    unverifiable = 0
    for s in spans:
        rev = s.elected_revision
        r.checked += 1
        if rev is None:
            unverifiable += 1
            r.fail(f"{s.inc}@{s.token} logged no revision confirming its election")
            continue
        if not etcd.covers(rev):
            unverifiable += 1
            r.fail(f"{s.inc}@{s.token} was confirmed at revision {rev}, which the recorded "
                   "etcd history does not cover")
            continue
        kv = etcd.kv_at(s.key, rev)
        if kv is None:
            r.fail(f"{s.inc} became leader with {s.key} confirmed at revision {rev}, "
                   "but the key did not exist then")
            continue
        if int(kv["create_revision"]) != s.token or int(kv.get("lease", 0)) != s.lease:
            r.fail(f"{s.inc}: at revision {rev} {s.key} was created at "
                   f"{kv['create_revision']} with lease {kv.get('lease')}, not token "
                   f"{s.token} lease {s.lease}")
        lead = etcd.leader_at(rev)
        if lead is None or lead["key"] != s.key:
            r.fail(f"{s.inc}: at revision {rev} the leader was "
                   f"{lead['key'] if lead else 'nobody'}, not {s.key}")
    r.metrics = {"unverifiable": unverifiable}
    return r.finish()


def p7_legal_transitions(history: Sequence[dict[str, Any]]) -> Result:
    """Each incarnation's transitions chain from ``disconnected`` along the table; the
    leader hooks pair with the transitions into and out of leader; hooks never overlap and
    all run on one thread."""
    r = Result("P7", "only legal transitions")
    per_inc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in history:
        if "inc" in ev and ev.get("kind") in ("transition", "enter_leader", "exit_leader",
                                               "leader_change", "error"):
            per_inc[ev["inc"]].append(ev)
    for inc, evs in per_inc.items():
        state = "disconnected"
        threads = {ev["thread"] for ev in evs if "thread" in ev}
        if len(threads) > 1:
            r.fail(f"{inc}: hooks ran on several threads: {sorted(threads)}")
        expect: str | None = None  # "enter_leader" right after a transition into leader
        entering_from: str | None = None  # the source of that transition into leader
        for ev in evs:
            kind = ev["kind"]
            if ev.get("depth", 1) != 1:
                r.fail(f"{inc}: hook {ev.get('hook')} ran while another hook was running")
            if (expect == "enter_leader" and kind == "transition"
                    and ev.get("hook") == "enter_disconnected"
                    and ev.get("trigger") == "session_lost"
                    and entering_from is not None and ev.get("source") == entering_from):
                # The term died while the old state's exit hooks ran: the machine never
                # entered leader and took session_lost from where it was (the dispatcher's
                # rule), so the exit hook's "elected" was an intent, not a transition.
                expect, state = None, entering_from
            if expect is not None and kind != expect:
                r.fail(f"{inc}: expected {expect} next, got {kind} {ev.get('hook', '')}")
            expect = None
            if kind == "transition":
                r.checked += 1
                src, dst, trig = ev["source"], ev["dest"], ev["trigger"]
                if state == "leader-exiting":
                    if src != "leader":
                        r.fail(f"{inc}: exit_leader was followed by {src} --{trig}--> {dst}")
                    state = "leader"
                elif src == "leader" and state == "leader":
                    r.fail(f"{inc}: left leader without an exit_leader hook")
                if src != state:
                    r.fail(f"{inc}: transition {src} --{trig}--> {dst} but the machine was "
                           f"in {state}")
                if legal(src, trig) != dst:
                    r.fail(f"{inc}: {src} --{trig}--> {dst} is not in the transition table")
                if dst == "leader":
                    expect, entering_from = "enter_leader", src
                state = dst
            elif kind == "enter_leader":
                if state != "leader":
                    r.fail(f"{inc}: enter_leader while {state}")
            elif kind == "exit_leader":
                if state != "leader":
                    r.fail(f"{inc}: exit_leader while {state}")
                state = "leader-exiting"  # the transition out of leader is logged next
    return r.finish()


def p8_stale_control_rejected(history: Sequence[dict[str, Any]], spans: Sequence[TermSpan],
                              etcd: EtcdHistory | None, *, window: float = 3.0) -> Result:
    """A resign/proclaim issued with a stale token (a newer term had begun when it was sent)
    never succeeds and never touches the key of a newer term while that term lasts, from
    the moment the request left (``start``). ``checked`` counts stale requests only."""
    r = Result("P8", "stale resign/proclaim rejected")
    controls = 0
    for ev in history:
        if ev.get("kind") != "control" or ev.get("token") is None:
            continue
        controls += 1
        token = int(ev["token"])
        began = real_time(ev, float(ev["start"])) if "start" in ev else t_of(ev)
        t = began
        newer = [s for s in spans if s.token > token and s.start <= began]
        if not newer:
            continue  # not stale
        r.checked += 1
        if ev.get("op") == "proclaim" and ev.get("result") == "applied":
            r.fail(f"{ev['inc']}: stale proclaim with token {token} was applied after "
                   f"token {max(s.token for s in newer)} led")
        if etcd is None:
            continue
        for s in newer:
            for touch in etcd.touches(s.key, s.token):
                tt = t_of(touch)
                if t <= tt < min(s.known_end, t + window) and touch["type"] == "DELETE":
                    r.fail(f"{s.inc}'s key {s.key} was deleted at {tt:.3f} while it led, "
                           f"{tt - t:.3f}s after a stale {ev.get('op')} by {ev['inc']}")
                if (t <= tt < s.known_end and touch["type"] == "PUT"
                        and int(touch.get("create_revision", 0)) == s.token
                        and int(touch["rev"]) != s.token):
                    r.fail(f"{s.inc}'s key {s.key} was overwritten at revision "
                           f"{touch['rev']} after a stale {ev.get('op')} by {ev['inc']}")
    r.metrics = {"controls": controls, "stale": r.checked}
    return r.finish()
