"""The liveness properties L1-L5 (and H, the recorder caught up): what must happen once
faults heal."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from electfsm.chaos.recorder import EtcdHistory
from electfsm.chaos.records import INF, TermSpan, t_of
from electfsm.chaos.report import Result


def l1_progress(spans: Sequence[TermSpan], heals: Sequence[tuple[float, float]],
                end: float) -> Result:
    """After each heal at ``t`` some term is acting within ``bound`` (``(t, bound)`` pairs)."""
    r = Result("L1", "a leader soon after faults heal")
    delays: list[float] = []
    for t, bound in heals:
        active = [s for s in spans if s.start <= t < s.end]
        later = [s.start for s in spans if s.start >= t]
        first = t if active else min(later, default=INF)
        if first - t > bound and t + bound > end:
            continue  # the history ends before the bound: nothing to say
        r.checked += 1
        delays.append(first - t)
        if first - t > bound:
            r.fail(f"no leader within {bound:.2f}s of the heal at {t:.3f} "
                   f"(first after {first - t:.2f}s)")
    r.metrics = {"max_delay": round(max(delays, default=0.0), 3)}
    return r.finish()


def l2_knows_the_leader(history: Sequence[dict[str, Any]], etcd: EtcdHistory | None,
                        settled: tuple[float, float] | None, until: float) -> Result:
    """After the last fault healed at ``t`` (``settled = (t, bound)``), every live
    candidate's view of the leader (``view`` events: what ``Elector.leader`` said) equals
    etcd's first key within ``bound`` of each change of etcd's leader (or of ``t``), as long
    as that leader lasts longer than ``bound`` and before ``until`` (when the run began to
    stop its candidates). One item per candidate and leader."""
    r = Result("L2", "every live candidate knows who leads")
    if etcd is None or settled is None:
        return r.finish()
    heal, bound = settled
    born: dict[str, float] = {}
    gone: dict[str, float] = {}
    views: dict[str, list[tuple[float, int | None]]] = defaultdict(list)
    for ev in history:
        inc, kind = ev.get("inc"), ev.get("kind")
        if inc is None:
            continue
        t = t_of(ev)
        if kind == "start":
            born.setdefault(inc, t)
        elif kind in ("killed", "stopped", "orphaned"):
            gone[inc] = min(gone.get(inc, INF), t)
        elif kind == "view":
            tok = ev.get("leader_token")
            views[inc].append((t, int(tok) if tok is not None else None))
    timeline = etcd.leader_timeline()
    lags: list[float] = []
    for i, (a, lead) in enumerate(timeline):
        b = timeline[i + 1][0] if i + 1 < len(timeline) else INF
        start, stop = max(a, heal), min(b, until)
        if stop - start <= bound:
            continue
        at = start + bound
        want = int(lead["create_revision"]) if lead is not None else None
        for inc, t0 in born.items():
            if t0 > start or gone.get(inc, INF) <= at:
                continue
            r.checked += 1
            seen = [(t, tok) for t, tok in views[inc] if t <= at]
            have = seen[-1][1] if seen else None
            if have != want:
                who = f"{lead['key']}@{want}" if lead else "nobody"
                r.fail(f"{inc} still saw token {have} {bound:.2f}s after etcd's leader "
                       f"became {who} (at {start:.3f})")
                continue
            first = next((t for t, tok in reversed(seen) if tok != want), None)
            caught = next((t for t, tok in seen if tok == want and (first is None
                                                                    or t > first)), at)
            lags.append(max(0.0, caught - start))
    r.metrics = {"max_lag": round(max(lags, default=0.0), 3)}
    return r.finish()


def history_complete(caught_up: bool | None) -> Result:
    """The etcd recorder caught up with etcd before the checks ran (``None``: not asked)."""
    r = Result("H", "etcd history recorded to the end")
    if caught_up is None:
        return r.finish()
    r.checked = 1
    if not caught_up:
        r.fail("the etcd recorder had not caught up with etcd's revision when the run "
               "ended: the properties over etcd's history would check a prefix of it")
    return r.finish()


def l3_no_churn(history: Sequence[dict[str, Any]], quiet: Sequence[tuple[float, float]]
                ) -> Result:
    """No transition at all during windows without faults (steady state)."""
    r = Result("L3", "no churn in steady state")
    moves = [ev for ev in history if ev.get("kind") == "transition"]
    for a, b in quiet:
        r.checked += 1
        inside = [ev for ev in moves if a <= t_of(ev) <= b]
        if inside:
            ev = inside[0]
            r.fail(f"{len(inside)} transition(s) in the quiet window {a:.2f}-{b:.2f}, e.g. "
                   f"{ev['inc']} {ev['source']} --{ev['trigger']}--> {ev['dest']} "
                   f"({ev.get('reason', '')})")
    r.metrics = {"quiet_seconds": round(sum(b - a for a, b in quiet), 2)}
    return r.finish()


def l4_no_stuck_lease(spans: Sequence[TermSpan], stepdowns: Sequence[tuple[float, float]],
                      end: float) -> Result:
    """After a leader steps down at ``t`` (cannot confirm), another term starts within
    ``bound`` (``(t, bound)`` pairs): its lease was not left alive server-side."""
    r = Result("L4", "no stuck lease after a half-open step-down")
    for t, bound in stepdowns:
        nxt = [s.start for s in spans if s.start >= t - 1e-6]
        first = min(nxt, default=INF)
        if first - t > bound and t + bound > end:
            continue
        r.checked += 1
        if first - t > bound:
            r.fail(f"after the step-down at {t:.3f} no new leader within {bound:.2f}s")
    return r.finish()


def l5_no_leaks(history: Sequence[dict[str, Any]], *, keys: Sequence[str] | None = None,
                leases: Sequence[int] | None = None, max_threads: int = 8) -> Result:
    """After every candidate stopped: no electfsm thread left, no candidate key and no
    lease left in etcd; while running, the elector's thread count stays bounded."""
    r = Result("L5", "no leaked leases, keys or threads")
    for ev in history:
        if ev.get("kind") == "stopped":
            r.checked += 1
            if ev.get("leftover"):
                r.fail(f"{ev['inc']} left threads running after stop(): {ev['leftover']}")
        elif ev.get("kind") == "stats":
            names = list(ev.get("electfsm_threads", []))
            if (any(x.startswith("electfsm-session[") for x in names)
                    and not any(x.startswith("electfsm-dispatch[") for x in names)):
                r.checked += 1
                r.fail(f"{ev['inc']}'s dispatcher is gone while its session still renews the "
                       f"lease: {names}")
            n = len(names)
            if n > max_threads:
                r.checked += 1
                r.fail(f"{ev['inc']} ran {n} electfsm threads: {ev['electfsm_threads']}")
    if keys is not None:
        r.checked += 1
        if keys:
            r.fail(f"candidate keys left in etcd: {list(keys)[:5]}")
    if leases is not None:
        r.checked += 1
        if leases:
            r.fail(f"leases left in etcd: {[f'{x:x}' for x in list(leases)[:5]]}")
    return r.finish()
