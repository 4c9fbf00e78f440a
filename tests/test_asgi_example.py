"""examples/asgi_scheduler.py as a real service: two uvicorn processes against one etcd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from elector_kit import wait

from electfsm.testing.etcd_binaries import free_port
from electfsm.testing.local_etcd import LocalEtcd

ROOT = Path(__file__).resolve().parent.parent




class Replica:
    def __init__(self, node: str, etcd: LocalEtcd, election: str, log: Path) -> None:
        self.node, self.log, self.port = node, log, free_port()
        env = {**os.environ, "NODE": node, "ELECTFSM_ENDPOINTS": etcd.endpoint,
               "ELECTION": election, "TTL": "2", "JOB_LOG": str(log)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(ROOT / "examples"),
             "asgi_scheduler:app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "warning"], env=env, cwd=ROOT)

    def status(self) -> dict[str, object] | None:
        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/leader", timeout=2)
        except httpx.HTTPError:
            return None
        return dict(r.json()) if r.status_code == 200 else None

    def ticks(self) -> list[tuple[int, float]]:
        if not self.log.exists():
            return []
        return [(int(tok), float(t)) for _, tok, t in
                (line.split() for line in self.log.read_text().splitlines() if line)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def replicas(etcd: LocalEtcd, election: str, tmp_path: Path) -> Iterator[list[Replica]]:
    made = [Replica(n, etcd, election, tmp_path / f"{n}.log") for n in ("node-a", "node-b")]
    yield made
    for r in made:
        r.stop()


def test_exactly_one_replica_runs_the_job_and_the_other_takes_over_when_it_is_killed(
        replicas: list[Replica]) -> None:
    a, b = replicas
    assert wait(lambda: all((s := r.status()) is not None and s["leader"] is not None
                            for r in replicas), 20), "both replicas serve /leader"
    statuses = [r.status() for r in replicas]
    leaders = [r for r, s in zip(replicas, statuses, strict=True) if s and s["is_leader"]]
    assert len(leaders) == 1, statuses
    first = leaders[0]
    other = b if first is a else a
    assert {s["leader"] for s in statuses if s} == {first.node}, "both name the same leader"
    assert wait(lambda: len(first.ticks()) >= 5)
    assert other.ticks() == [], "the follower runs no job"

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    killed_last = first.ticks()[-1]
    assert wait(lambda: (s := other.status()) is not None and bool(s["is_leader"]), 15)
    assert wait(lambda: len(other.ticks()) >= 3)
    taken = other.ticks()
    assert taken[0][0] > killed_last[0], "a new term, a larger fencing token"
    assert taken[0][1] > killed_last[1], "the jobs never overlapped"
