"""The lab's records: candidates' event logs merged into one history, and the terms of
leadership read from it (:class:`TermSpan`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs

INF = float("inf")
#: kinds of candidate events that are leader actions (they carry ``start`` or are one)
ACTS = ("work", "fenced_write", "guarded_append")


# --------------------------------------------------------------------------- records


def t_of(ev: dict[str, Any]) -> float:
    """The harness time of an event."""
    return float(ev.get("recv_mono", ev["mono"]))


def real_time(ev: dict[str, Any], value: float) -> float:
    """A monotonic instant ``value`` of the event's own clock, on the harness clock."""
    if "recv_mono" not in ev:
        return value
    rate = float(ev.get("clock_rate", 1.0)) or 1.0
    return float(ev["recv_mono"]) + (value - float(ev["mono"])) / rate


def load_history(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every complete JSON line of ``paths``, sorted by harness time (stable per file)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if not line.endswith("\n"):
                        break
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and "mono" in rec:
                        out.append(rec)
        except FileNotFoundError:
            continue
    out.sort(key=t_of)
    return out


# --------------------------------------------------------------------------- terms


@attrs.define
class TermSpan:
    """One term of one candidate incarnation, on the harness clock.

    ``end`` is when the candidate could last have acted as leader: the earliest of its
    ``exit_leader``, the monitor seeing ``is_leader`` turn false, its death, and the latest
    deadline it logged for the term.
    """

    inc: str
    identity: str
    token: int
    key: str
    lease: int
    start: float
    deadline: float = -INF
    exit_at: float = INF
    invalid_at: float = INF
    death_at: float = INF
    ended_by: str | None = None
    elected_revision: int | None = None
    #: the deadline the term had when on_enter_leader began
    enter_deadline: float | None = None
    acts: list[dict[str, Any]] = attrs.field(factory=list)

    @property
    def end(self) -> float:
        return min(self.exit_at, self.invalid_at, self.death_at, max(self.deadline, self.start))

    @property
    def known_end(self) -> float:
        """When the process itself knew the term was over (exit hook or monitor)."""
        return min(self.exit_at, self.invalid_at)


def terms_of(history: Sequence[dict[str, Any]]) -> list[TermSpan]:
    """Every term in ``history`` (candidate events + ``killed`` harness events)."""
    open_terms: dict[str, TermSpan] = {}
    spans: list[TermSpan] = []
    elected_rev: dict[str, int] = {}
    deaths: dict[str, float] = {}
    for ev in history:
        if ev.get("kind") == "killed" and "inc" in ev:
            deaths.setdefault(ev["inc"], t_of(ev))
    for ev in history:
        inc, kind = ev.get("inc"), ev.get("kind")
        if inc is None or kind is None:
            continue
        t = t_of(ev)
        span = open_terms.get(inc)
        if kind == "transition" and ev.get("trigger") == "elected":
            if "revision" in ev:
                elected_rev[inc] = int(ev["revision"])
        elif kind == "enter_leader":
            span = TermSpan(inc=inc, identity=str(ev.get("identity", inc)),
                            token=int(ev["token"]), key=str(ev["key"]),
                            lease=int(ev.get("lease", 0)), start=t,
                            deadline=real_time(ev, float(ev.get("deadline", -INF))),
                            death_at=deaths.get(inc, INF),
                            elected_revision=elected_rev.pop(inc, None))
            span.enter_deadline = span.deadline if "deadline" in ev else None
            open_terms[inc] = span
            spans.append(span)
        elif span is not None and ev.get("token") == span.token:
            if kind in ("renew", "work") and "deadline" in ev:
                span.deadline = max(span.deadline, real_time(ev, float(ev["deadline"])))
            if kind in ACTS:
                span.acts.append(ev)
                if "deadline" in ev:
                    span.deadline = max(span.deadline, real_time(ev, float(ev["deadline"])))
            elif kind == "invalid":
                span.invalid_at = min(span.invalid_at, t)
            elif kind == "exit_leader":
                span.exit_at = t
                span.ended_by = ev.get("ended_by")
                del open_terms[inc]
        elif kind in ACTS and ev.get("token") is not None:
            # an act of a term that is already closed: keep it for P4
            for old in reversed(spans):
                if old.inc == inc and old.token == ev.get("token"):
                    old.acts.append(ev)
                    break
    spans.sort(key=lambda s: s.start)
    return spans


def overlap(spans: Sequence[TermSpan]) -> tuple[float, list[tuple[str, str, float]]]:
    """Total time at least two different terms were acting, and the overlapping pairs."""
    points: list[tuple[float, int, int]] = []
    for i, s in enumerate(spans):
        if s.end > s.start:
            points += [(s.start, 1, i), (s.end, -1, i)]
    points.sort(key=lambda p: (p[0], p[1]))
    active: set[int] = set()
    total, last = 0.0, None
    for t, step, i in points:
        if last is not None and len(active) >= 2:
            total += t - last
        if step == 1:
            active.add(i)
        else:
            active.discard(i)
        last = t
    pairs: list[tuple[str, str, float]] = []
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if b.start >= a.end:
                continue
            both = min(a.end, b.end) - max(a.start, b.start)
            if both > 0 and (a.inc, a.token) != (b.inc, b.token):
                pairs.append((f"{a.inc}@{a.token}", f"{b.inc}@{b.token}", both))
    return total, pairs
