"""The safety checker: properties P1-P8 and liveness L1-L5 over recorded histories.

Inputs are plain JSON records, so tests can feed synthetic histories:

- candidate events (see ``electfsm.chaos.candidate``), merged from every candidate's log, and
  harness events (``killed``, ``fault`` …) in the same list;
- the fenced resource's writes (``resource_write`` records, :mod:`electfsm.chaos.fenced`);
- the etcd history of the election and guarded-set prefixes, recorded by
  :class:`EtcdRecorder` (``etcd_snapshot`` and ``etcd_event`` records), as an
  :class:`EtcdHistory`.

::

    from electfsm.chaos import checker

    history = checker.load_history(["a.jsonl", "b.jsonl", "harness.jsonl"])
    report = checker.check(history, resource=writes, etcd=checker.EtcdHistory(records,
                           election="e"), guarded_set="e-set", ttl=2, bounded=True)
    assert report.ok, report.markdown()

Every property is a pure function (``p1_token_monotonicity(...)`` …) that returns a
:class:`Result`; ``check`` runs them all. A property with nothing to check says ``n/a``,
which :attr:`Report.ok` lets pass; a run names the properties it means to exercise with
:meth:`Report.require`, and those fail when they are ``n/a``::

    report.require("P2", "P3", "P8")   # a run that checked no stale attempt fails

Times are the harness's monotonic clock:
``recv_mono`` when a reader stamped the line (``faketime`` candidates), else ``mono``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from electfsm.chaos.liveness import (
    history_complete,
    l1_progress,
    l2_knows_the_leader,
    l3_no_churn,
    l4_no_stuck_lease,
    l5_no_leaks,
)
from electfsm.chaos.recorder import EtcdHistory, EtcdRecorder
from electfsm.chaos.records import TermSpan, load_history, real_time, t_of, terms_of
from electfsm.chaos.report import Report, Result
from electfsm.chaos.safety import (
    p1_token_monotonicity,
    p2_no_stale_fenced_write,
    p3_no_lost_guarded_updates,
    p4_no_work_after_deadline,
    p5_no_overlap,
    p6_no_phantom_leadership,
    p7_legal_transitions,
    p8_stale_control_rejected,
)

__all__ = [
    "EtcdHistory",
    "EtcdRecorder",
    "Report",
    "Result",
    "TermSpan",
    "check",
    "load_history",
    "p2_no_stale_fenced_write",
    "real_time",
    "t_of",
    "terms_of",
]


# --------------------------------------------------------------------------- all together


def check(history: Sequence[dict[str, Any]], *, resource: Sequence[dict[str, Any]] = (),
          etcd: EtcdHistory | None = None, guarded_set: str | None = None,
          final_set: dict[str, dict[str, Any]] | None = None, bounded: bool = True,
          heals: Sequence[tuple[float, float]] = (), quiet: Sequence[tuple[float, float]] = (),
          stepdowns: Sequence[tuple[float, float]] = (),
          leftover_keys: Sequence[str] | None = None,
          leftover_leases: Sequence[int] | None = None,
          settled: tuple[float, float] | None = None,
          etcd_caught_up: bool | None = None) -> Report:
    """Run every property over one run's records.

    ``settled = (t, bound)``: the last fault healed at ``t``; from then on every live
    candidate must know etcd's leader within ``bound`` (L2), until the harness's
    ``finishing`` note (or the end of the history)."""
    history = sorted(history, key=t_of)
    spans = terms_of(history)
    end = max((t_of(ev) for ev in history), default=0.0)
    until = min((t_of(ev) for ev in history if ev.get("kind") == "finishing"), default=end)
    results = [
        p1_token_monotonicity(spans),
        p2_no_stale_fenced_write(resource, history, spans),
        p3_no_lost_guarded_updates(history, etcd, guarded_set, final_set),
        p4_no_work_after_deadline(spans),
        p5_no_overlap(spans, etcd, bounded=bounded),
        p6_no_phantom_leadership(spans, etcd),
        p7_legal_transitions(history),
        p8_stale_control_rejected(history, spans, etcd),
        l1_progress(spans, heals, end),
        l2_knows_the_leader(history, etcd, settled, until),
        l3_no_churn(history, quiet),
        l4_no_stuck_lease(spans, stepdowns, end),
        l5_no_leaks(history, keys=leftover_keys, leases=leftover_leases),
        history_complete(etcd_caught_up),
    ]
    transitions = sum(1 for ev in history if ev.get("kind") == "transition")
    metrics: dict[str, Any] = {
        "terms": len(spans),
        "transitions": transitions,
        "incarnations": len({ev["inc"] for ev in history if "inc" in ev}),
        "dual_leader_window": results[4].metrics.get("dual_leader_window", 0.0),
        "leaderless_time": round(leaderless(spans, history), 3),
        "fenced_accepted": results[1].metrics.get("accepted", 0),
        "stale_fenced_rejected": results[1].metrics.get("stale_rejected", 0),
        "guarded_acknowledged": results[2].metrics.get("acknowledged", 0),
        "guarded_refused": results[2].metrics.get("refused", 0),
        "stale_controls": results[7].metrics.get("stale", 0),
    }
    return Report(results=results, metrics=metrics)


def leaderless(spans: Sequence[TermSpan], history: Sequence[dict[str, Any]]) -> float:
    """Time between the first term's start and the history's end with no acting term."""
    if not spans:
        return 0.0
    begin = spans[0].start
    end = max(t_of(ev) for ev in history)
    covered, cur_a, cur_b = 0.0, None, None
    for s in sorted(spans, key=lambda s: s.start):
        a, b = s.start, min(s.end, end)
        if b <= a:
            continue
        if cur_b is None or a > cur_b:
            if cur_a is not None and cur_b is not None:
                covered += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_a is not None and cur_b is not None:
        covered += cur_b - cur_a
    return max(0.0, (end - begin) - covered)
