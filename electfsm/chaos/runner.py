"""Fault-injection kit and a Jepsen-style randomized runner.

The randomized runner::

    python -m electfsm.chaos --seed 7 --minutes 2 --candidates 5 --out chaos-out

starts a 3-member etcd cluster on loopback, ``K`` candidate processes (each behind its own
fault proxy to every member), a fenced resource and an etcd recorder; every few seconds it
injects a fault drawn from ``random.Random(seed)`` (kill, pause, stall, link faults, etcd
member kill/pause, quorum loss, compaction, resign …), heals it, and at the end checks every
property (:mod:`electfsm.chaos.checker`). It writes ``history.jsonl`` (every event, merged),
``schedule.jsonl`` (the faults drawn), ``report.md`` and ``report.json`` into ``--out`` and
exits 1 on any violation. The same seed draws the same schedule.

The kit, for scenario tests::

    with Lab(tmp_path, endpoints=[etcd.endpoint], name="s1") as lab:
        a, b = lab.spawn("a"), lab.spawn("b")
        leader = lab.wait_leader()
        with lab.fault("kill the leader"):
            leader.kill()
        report = lab.finish()
        assert report.ok, report.markdown()

:class:`Lab` gives each candidate a :class:`Link` (its fault proxies), records the etcd
history, hosts the fenced resource, logs faults with their times, and at :meth:`Lab.finish`
stops everything and runs the checker. :class:`PartitionableCluster` is a 3-member cluster
whose peer traffic goes through a proxy that can cut one member off from the others
(a minority member), which plain proxies in front of client ports cannot do.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from electfsm import clock
from electfsm.chaos import checker
from electfsm.chaos.cluster import PartitionableCluster
from electfsm.chaos.lab import Lab
from electfsm.chaos.process import CandidateProcess
from electfsm.errors import EtcdError
from electfsm.testing.local_etcd import LocalEtcd

# --------------------------------------------------------------------------- the runner

#: fault kind -> (weight, (min, max) duration in seconds; None: fixed by the kind)
KINDS: dict[str, tuple[int, tuple[float, float] | None]] = {
    "kill": (3, (1.0, 3.0)),            # SIGKILL a candidate, restart it after the duration
    "leader_kill": (3, (1.0, 3.0)),     # SIGKILL whoever leads
    "pause_short": (2, None),           # SIGSTOP 0.3 x TTL (within the margin: no churn)
    "pause_long": (3, (3.0, 5.0)),      # SIGSTOP past the TTL (S6)
    "stall": (1, None),                 # the leader's work holds the GIL 2 x TTL (S7)
    "blackhole": (3, (1.0, 4.0)),       # the candidate's links hang (S3)
    "half_open": (3, (1.0, 4.0)),       # answers lost, requests land (S10)
    "reset": (2, (0.5, 3.0)),           # RST + refuse (S4)
    "latency": (2, (2.0, 4.0)),         # 50 +- 20 ms each way (S20)
    "resign": (2, None),                # SIGUSR1 to the leader (resign + proclaim)
    "member_kill": (2, (1.0, 3.0)),     # SIGKILL an etcd member, restart it (S13)
    "raft_leader_kill": (2, (1.0, 3.0)),
    "member_pause": (2, (0.3, 2.0)),    # SIGSTOP an etcd member
    "isolate": (2, (1.0, 3.0)),         # cut a member off from its peers (S12)
    "quorum_loss": (2, (0.5, 3.5)),     # SIGSTOP two members (S15)
    "compact": (1, None),               # compact at the current revision (S23)
    "steady": (2, None),                # no fault for 7 s: checks for churn (L3)
    # --- kinds added after the first runs (CLASSIC_KINDS draws the schedules of before)
    "leader_half_open": (2, (3.0, 5.0)),  # half-open on the leader's link: it must step
                                        # down and free its lease (L4)
    # stale attempts: what P2, P3 and P8 exist for
    "pause_write": (2, None),           # the leader's GC pause after the term check, before
                                        # its fenced write (P2: the resource must refuse it)
    "pause_txn": (2, None),             # the same inside fenced_txn (P3: etcd's fence)
    "stale_control": (2, None),         # the leader paused past its lease, then its resign
                                        # and proclaim with the old term (P8)
    # clock-rate skew of the leader's elector, then its link cut (the margin's tolerance)
    "clock_slow": (1, (3.0, 4.0)),
    "clock_fast": (1, (3.0, 4.0)),
    # holes the dispatcher must not have
    "busy_follower": (1, None),         # next in line: a slow hook keeps its dispatcher busy
                                        # while it is elected and its link dies
    "hook_exit": (1, None),             # a leader hook raises SystemExit
    "compact_resign": (1, None),        # the leader, alone, resigns and wins again across
                                        # a compaction
}
#: the kinds of the first chaos runs: ``draw_schedule(..., kinds=CLASSIC_KINDS)`` draws the
#: very schedules a seed drew then (the kinds after them lengthen a schedule's faults)
CLASSIC_KINDS = tuple(list(KINDS)[:list(KINDS).index("leader_half_open")])
#: kinds that act on whoever leads when they fire
LEADER_KINDS = {"leader_kill", "leader_half_open", "resign", "stall", "pause_write",
                "pause_txn", "stale_control", "clock_slow", "clock_fast", "busy_follower",
                "hook_exit", "compact_resign"}
CLIENT_KINDS = {"kill", "pause_short", "pause_long", "blackhole", "half_open", "reset",
                "latency", *LEADER_KINDS}
#: which fault kinds give a property something to check beyond a plain run (the report
#: names them when the property went unexercised)
EXERCISED_BY = {
    "P2": ("pause_write",), "P3": ("pause_txn",), "P4": ("stall", "pause_write"),
    "P8": ("stale_control", "resign"), "L1": tuple(KINDS), "L3": ("steady",),
    "L4": ("leader_half_open",), "L5": ("kill", "leader_kill"),
}
SLACK_ENV = "ELECTFSM_TEST_SLACK"


def slack() -> float:
    """The factor (``$ELECTFSM_TEST_SLACK``, default 1, at least 1) that stretches the part
    of every timing bound paying for scheduling delay on a loaded machine; the physics (a
    TTL) is never scaled."""
    raw = os.environ.get(SLACK_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{SLACK_ENV}={raw!r}: expected a number such as 1 or 2.5") from None
    return max(1.0, value)


def draw_schedule(seed: int, seconds: float, candidates: int, *, ttl: int = 2,
                  members: int = 3, kinds: Sequence[str] | None = None
                  ) -> list[dict[str, Any]]:
    """The faults of a run, drawn from ``random.Random(seed)`` alone: the same arguments
    always give the same schedule (``at`` is seconds after the start of the run).
    ``kinds`` draws from those kinds only (default: every kind)."""
    rnd = random.Random(seed)
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    kinds = list(kinds or KINDS)
    weights = [KINDS[k][0] for k in kinds]
    out: list[dict[str, Any]] = []
    t = 3.0
    while True:
        kind = rnd.choices(kinds, weights)[0]
        span = KINDS[kind][1]
        if kind == "pause_short":
            duration = 0.3 * ttl
        elif kind == "stall":
            duration = 2.0 * ttl
        elif kind == "steady":
            duration = 7.0
        elif kind in ("pause_write", "pause_txn", "stale_control", "busy_follower",
                      "hook_exit", "compact_resign"):
            duration = 2.0 * ttl  # roughly: each waits for what it needs
        elif span is None:
            duration = 0.0
        else:
            duration = round(rnd.uniform(*span), 2)
        if t + duration > seconds - 2:
            break
        out.append({"n": len(out), "at": round(t, 2), "kind": kind,
                    "candidate": rnd.randrange(candidates), "member": rnd.randrange(members),
                    "duration": duration})
        t += duration + round(rnd.uniform(1.0, 3.0), 2)
    return out


class _Runner:
    """Executes a schedule against a lab on a partitionable cluster."""

    def __init__(self, lab: Lab, cluster: PartitionableCluster, k: int, ttl: int) -> None:
        self.lab = lab
        self.cluster = cluster
        self.ttl = ttl
        self.names = [f"c{i}" for i in range(k)]
        self.current: dict[str, CandidateProcess] = {}
        self.heals: list[tuple[float, float]] = []
        self.windows: list[tuple[float, float]] = []  # when faults were active
        self.steady: list[tuple[float, float]] = []
        self.half_open: list[tuple[str, float, float]] = []
        self.injected = 0
        self.skipped = 0
        self.by_kind: dict[str, int] = {}

    def spawn(self, name: str) -> None:
        self.current[name] = self.lab.spawn(name, work_interval=0.2)

    def leader(self) -> CandidateProcess | None:
        leaders = self.lab.leaders()
        return leaders[0] if leaders else None

    def _restart_dead(self) -> None:
        for name, c in list(self.current.items()):
            if not c.alive:
                self.spawn(name)

    def run(self, fault: dict[str, Any], started: float) -> None:
        wait = started + float(fault["at"]) - clock.now()
        if wait > 0:
            time.sleep(wait)
        kind, d = fault["kind"], float(fault["duration"])
        name = self.names[fault["candidate"] % len(self.names)]
        member = fault["member"] % len(self.cluster.members)
        print(f"[chaos] t={fault['at']:7.2f} #{fault['n']} {kind} "
              f"{name if kind in CLIENT_KINDS else member} {d:.2f}s", file=sys.stderr,
              flush=True)
        if kind in LEADER_KINDS:
            leader = self.leader()
            if leader is None:
                self.skipped += 1
                self.lab.note("fault_skipped", name=kind, why="nobody leads")
                return
            name = leader.identity
        target = self.current[name]
        with self.lab.fault(kind, n=fault["n"], candidate=name, member=member,
                            duration=d) as rec:
            self._inject(kind, d, name, target, member)
        self.injected += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        client = kind in CLIENT_KINDS
        bound = self.ttl + (0.6 if client else 2.5) * slack()
        self.heals.append((rec["end"], bound))
        self.windows.append((rec["start"], rec["end"]))
        if kind == "steady":
            self.steady.append((rec["start"], rec["end"]))
        if kind in ("half_open", "leader_half_open"):
            self.half_open.append((target.inc, rec["start"], rec["end"]))

    def _inject(self, kind: str, d: float, name: str, target: CandidateProcess,
                member: int) -> None:
        lab, cluster = self.lab, self.cluster
        link = lab.link(name)
        if kind in ("kill", "leader_kill"):
            target.kill()
            time.sleep(d)
            self.spawn(name)
        elif kind in ("pause_short", "pause_long"):
            target.pause()
            time.sleep(d)
            target.resume()
        elif kind == "stall":
            target.stall()
            time.sleep(d)
        elif kind in ("blackhole", "half_open", "leader_half_open", "latency", "reset"):
            if kind == "blackhole":
                link.blackhole()
            elif kind in ("half_open", "leader_half_open"):
                link.drop_responses()
            elif kind == "latency":
                link.latency(0.05, 0.02)
            else:
                link.refuse()
                link.reset()
            time.sleep(d)
            link.pass_through()
        elif kind == "resign":
            target.resign()
        elif kind in ("member_kill", "raft_leader_kill"):
            if kind == "raft_leader_kill":
                member = cluster.leader_index() or member
            m = cluster.members[member]
            m.kill()
            time.sleep(d)
            self._start_member(m)
        elif kind == "member_pause":
            cluster.members[member].pause()
            time.sleep(d)
            cluster.members[member].resume()
        elif kind == "isolate":
            cluster.isolate(member)
            time.sleep(d)
            cluster.heal()
        elif kind == "quorum_loss":
            lost = [m for i, m in enumerate(cluster.members) if i != member]
            for m in lost:
                m.pause()
            time.sleep(d)
            for m in lost:
                m.resume()
        elif kind == "compact":
            try:
                rev = int(lab.client.status().header.revision)
                lab.client.compact(rev)
            except EtcdError as exc:
                lab.note("fault_failed", name=kind, error=str(exc)[:200])
        elif kind == "steady":
            time.sleep(d)
        elif kind in ("pause_write", "pause_txn"):
            since = clock.now()
            if kind == "pause_write":
                target.pause_before_write()
            else:
                target.pause_in_txn()
            act = "fenced_write" if kind == "pause_write" else "guarded_append"
            if target.wait_for(lambda ev: ev["kind"] == act and bool(ev.get("stale_attempt")),
                               15 * slack(), after=since) is None:
                lab.note("fault_failed", name=kind, why="no stale attempt was made")
        elif kind == "stale_control":
            self._stale_control(target)
        elif kind in ("clock_slow", "clock_fast"):
            target.skew_clock("slow" if kind == "clock_slow" else "fast")
            link.blackhole()
            time.sleep(d)
            link.pass_through()
            target.skew_clock("true")
        elif kind == "busy_follower":
            self._busy_follower(target)
        elif kind == "hook_exit":
            target.hook_exit()
            target.resign()  # the exit_leader hook raises
            time.sleep(2.0)
            # the process is restarted whatever its elector became (stopped or running)
            target.terminate(timeout=5)
            self.spawn(name)
        elif kind == "compact_resign":
            self._compact_resign(target)
        self._restart_dead()

    def _stale_control(self, target: CandidateProcess) -> None:
        """Pause the leader past its lease; once another term leads, resume it and have it
        send its resign and proclaim with the old term."""
        target.pause()
        try:
            self.lab.wait_leader(timeout=(self.ttl + 6) * slack(), exclude=[target])
        except AssertionError:
            self.lab.note("fault_failed", name="stale_control", why="nobody took over")
            target.resume()
            return
        target.resume()
        since = clock.now()
        target.stale_control()
        target.wait_for(lambda ev: ev["kind"] == "control" and ev.get("op") == "proclaim",
                        10 * slack(), after=since - 0.05)

    def _busy_follower(self, leader: CandidateProcess) -> None:
        """The follower next in line gets a slow hook (its dispatcher sleeps ``stall``
        seconds), the leader resigns so it is elected while busy, and its link dies so its
        session is lost before the dispatcher gets to the ``elected``."""
        try:
            keys = sorted(self.lab.candidate_keys(), key=lambda kv: kv["create_revision"])
        except EtcdError:
            keys = []
        order = [kv["value"] for kv in keys]
        nxt = next((self.current[x] for x in order[1:] if x in self.current
                    and self.current[x].alive), None)
        if nxt is None or not order or order[0] != leader.identity:
            self.lab.note("fault_failed", name="busy_follower", why="no follower next in line")
            return
        link = self.lab.link(nxt.identity)
        nxt.slow_hook()
        time.sleep(0.1)
        leader.resign()
        time.sleep(0.3)  # its campaign sees the key go and confirms itself first
        link.blackhole()
        time.sleep(self.ttl + 1.5)
        link.pass_through()
        time.sleep(2.0)

    def _compact_resign(self, leader: CandidateProcess) -> None:
        """Everyone else paused until their keys are gone, so the leader is alone; it
        resigns and, while it wins again, etcd compacts its history."""
        others = [c for c in self.current.values() if c is not leader and c.alive]
        for c in others:
            c.pause()
        try:
            deadline = clock.now() + (self.ttl + 6) * slack()
            while clock.now() < deadline:
                with contextlib.suppress(EtcdError):
                    if {kv["value"] for kv in self.lab.candidate_keys()} <= {leader.identity}:
                        break
                time.sleep(0.1)
            since = clock.now()
            leader.resign()
            for _ in range(3):
                with contextlib.suppress(EtcdError):
                    self.lab.client.compact(int(self.lab.client.status().header.revision))
                time.sleep(0.1)
            leader.wait_for(lambda ev: ev["kind"] == "enter_leader", 10 * slack(),
                            after=since)
        finally:
            for c in others:
                c.resume()

    def _start_member(self, m: LocalEtcd) -> None:
        for _ in range(3):
            try:
                m.start(30)
                return
            except RuntimeError as exc:
                self.lab.note("member_restart_failed", error=str(exc)[:300])
                time.sleep(1)


def _quiet_windows(windows: Sequence[tuple[float, float]], steady: Sequence[tuple[float, float]],
                   settle: float) -> list[tuple[float, float]]:
    """Steady-state windows: a ``steady`` pseudo-fault, from ``settle`` seconds after the
    previous real fault ended."""
    out = []
    for a, b in steady:
        before = [e for s, e in windows if e <= a and (s, e) not in steady]
        start = max([a, *[e + settle for e in before]])
        if b - start >= 0.5:
            out.append((start, b))
    return out


def run_chaos(*, seed: int, seconds: float, candidates: int = 5,
              out: str | os.PathLike[str] = "chaos-out", ttl: int = 2,
              dry_run: bool = False, kinds: Sequence[str] | None = None) -> checker.Report:
    """One randomized run; writes the history, schedule and report into ``out``."""
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    schedule = draw_schedule(seed, seconds, candidates, ttl=ttl, kinds=kinds)
    with open(outdir / "schedule.jsonl", "w", encoding="utf-8") as f:
        for fault in schedule:
            f.write(json.dumps(fault) + "\n")
    if dry_run:
        return checker.Report(results=[], metrics={"seed": seed, "faults": len(schedule)})
    wall = clock.now()
    with PartitionableCluster() as cluster:
        lab = Lab(outdir / "lab", endpoints=cluster.endpoints, name=f"chaos-{seed}", ttl=ttl)
        lab.start()
        try:
            runner = _Runner(lab, cluster, candidates, ttl)
            for name in runner.names:
                runner.spawn(name)
            lab.settle(timeout=20)
            started = clock.now()
            for fault in schedule:
                runner.run(fault, started)
            lab.note("healed")
            cluster.heal()
            for link in lab.links.values():
                link.pass_through()
            for m in cluster.members:
                if m.pid is None:
                    runner._start_member(m)
            runner._restart_dead()
            end = clock.now()
            heals = [*runner.heals, (end, ttl + 2.5 * slack())]
            try:
                lab.wait_leader(timeout=ttl + 5 * slack())
            except AssertionError as exc:
                lab.note("no_final_leader", error=str(exc))
            # L2: every candidate must know who leads within this bound of the last heal;
            # stay up long enough after it for the check to have a window
            aware = ttl + 2.5 * slack()
            time.sleep(aware + 1.5)
            stepdowns = _half_open_stepdowns(lab.history(), runner.half_open, ttl)
            quiet = _quiet_windows(runner.windows, runner.steady, settle=ttl + 2.5 * slack())
            report = lab.finish(heals=heals, quiet=quiet, stepdowns=stepdowns,
                                settled=(end, aware))
        finally:
            lab.close()
    history = lab.history()
    with open(outdir / "history.jsonl", "w", encoding="utf-8") as f:
        for ev in history:
            f.write(json.dumps(ev) + "\n")
    report.metrics.update({
        "seed": seed, "seconds": seconds, "candidates": candidates, "ttl": ttl,
        "faults": runner.injected, "faults_skipped": runner.skipped,
        "faults_by_kind": dict(sorted(runner.by_kind.items())),
        "wall_seconds": round(clock.now() - wall, 1),
        "violations": len(report.violations),
        "unexercised": {name: [k for k in EXERCISED_BY.get(name, ()) if k not in runner.by_kind]
                        for name in report.unexercised},
    })
    (outdir / "report.md").write_text(
        f"# chaos run, seed {seed}\n\n{report.summary()}\n\n{report.markdown()}\n")
    (outdir / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _half_open_stepdowns(history: Sequence[dict[str, Any]],
                         half_open: Sequence[tuple[str, float, float]], ttl: int
                         ) -> list[tuple[float, float]]:
    """L4: a leader that stepped down during a half-open fault on its link must have freed
    its lease: someone leads within TTL + 0.6 s of the step-down."""
    out = []
    for inc, a, b in half_open:
        for ev in history:
            if (ev.get("inc") == inc and ev.get("kind") == "exit_leader"
                    and ev.get("ended_by") == "session_lost" and a <= checker.t_of(ev) <= b):
                out.append((checker.t_of(ev), ttl + 0.6))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m electfsm.chaos", description=__doc__.split(
        "\n\n")[0] if __doc__ else None)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--out", default=None, help="output directory (default chaos-<seed>)")
    p.add_argument("--dry-run", action="store_true", help="only draw and write the schedule")
    p.add_argument("--kinds", default=None,
                   help="draw only these fault kinds (comma-separated); default: all")
    args = p.parse_args(argv)
    out = args.out or f"chaos-{args.seed}"
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    report = run_chaos(seed=args.seed, seconds=args.minutes * 60, candidates=args.candidates,
                       out=out, ttl=args.ttl, dry_run=args.dry_run, kinds=kinds)
    m = report.metrics
    print(f"seed {m.get('seed')}: {m.get('faults')} faults, {m.get('transitions', 0)} "
          f"transitions, {m.get('terms', 0)} terms, "
          f"{len(report.violations)} violations -> {out}/report.md")
    if report.violations:
        print(report.summary())
    if report.unexercised:
        print("unexercised (n/a): " + ", ".join(
            f"{name} (fault kinds that did not run: {kinds or 'none listed'})"
            for name, kinds in report.metrics["unexercised"].items()))
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
