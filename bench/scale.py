"""Scale: N candidates in one election (processes of shared-connection electors).

For each N: time to settle, graceful handover (resign → next leader), crash failover
(leader stops renewing → next leader; and from its lease's expiry, seen by a raw watcher,
to the next leader: the part that depends on N), etcd messages per handover and per
failover, steady-state etcd messages/s against the keepalive-only expectation (3 per TTL
per candidate), threads and memory per elector, and how many sessions the surviving
electors lost over the run (a renewal missed under load: each is a step-down).
"""

from __future__ import annotations

import contextlib
import json
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import delta, requests

HERE = Path(__file__).resolve().parent


class Worker:
    def __init__(self, endpoint: str, election: str, count: int, ttl: int, name: str,
                 ramp: float = 0.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "scale_worker.py"), "--endpoint", endpoint,
             "--election", election, "--count", str(count), "--ttl", str(ttl), "--name", name,
             "--ramp", str(ramp)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if msg.get("event") == event:
                return msg
            if msg.get("event") == "leader":
                LEADERS.put(msg)


LEADERS: queue.Queue[dict[str, Any]] = queue.Queue()


def drain_leaders(workers: list[Worker]) -> None:
    for w in workers:
        while True:
            try:
                msg = w.lines.get_nowait()
            except queue.Empty:
                break
            if msg.get("event") == "leader":
                LEADERS.put(msg)


def stats(workers: list[Worker]) -> list[dict[str, Any]]:
    for w in workers:
        w.send("stats")
    return [w.expect("stats") for w in workers]


def settled(workers: list[Worker], n: int, timeout: float) -> list[dict[str, Any]]:
    """Wait until one of the ``n`` leads and all others follow; the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        s = stats(workers)
        if sum(x["leaders"] for x in s) == 1 and sum(x["followers"] for x in s) == n - 1:
            return s
        if time.monotonic() > deadline:
            counts = [(x["leaders"], x["followers"], x["candidates"], x["disconnected"])
                      for x in s]
            raise TimeoutError(f"{n} candidates did not settle in {timeout:.0f}s "
                               f"(leaders, followers, candidates, disconnected): {counts}")
        time.sleep(0.2)


def next_leader(workers: list[Worker], after: float, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        drain_leaders(workers)
        try:
            msg = LEADERS.get(timeout=0.005)
        except queue.Empty:
            continue
        if msg["t"] >= after:
            return msg
    raise TimeoutError("no new leader")


def watch_deletes(endpoint: str, election: str) -> tuple[queue.Queue[float], Any, Any]:
    """A raw watcher that timestamps each candidate key's DELETE (a lease expiry, in a crash
    round): the failover after it is the part that depends on N."""
    from electfsm.etcd import EtcdClient, prefix_end
    from electfsm.sources.campaign import is_candidate_key

    client = EtcdClient([endpoint], timeout=5)
    prefix = (election + "/").encode()
    watch = client.watch(prefix, prefix_end(prefix),
                         start_revision=int(client.status().header.revision) + 1)
    deletes: queue.Queue[float] = queue.Queue()

    def read() -> None:
        with contextlib.suppress(Exception):
            for resp in watch:
                for ev in resp.events:
                    if ev.type == ev.DELETE and is_candidate_key(prefix, bytes(ev.kv.key)):
                        deletes.put(time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    return deletes, watch, client


def run(endpoint: str, client_url: str, n: int, ttl: int = 5, rounds: int = 5,
        per_process: int = 100) -> dict[str, Any]:
    election = f"bench/scale-{n}-{time.monotonic_ns()}"
    deletes, watch, raw = watch_deletes(endpoint, election)
    counts = [per_process] * (n // per_process) + ([n % per_process] if n % per_process else [])
    # Candidates join at most ~200/s (a fleet does not start in one millisecond); settle is
    # counted from the last start.
    ramp = n / 200 if n > 100 else 0.0
    workers = [Worker(endpoint, election, c, ttl, f"p{i}", ramp) for i, c in enumerate(counts)]
    try:
        for w in workers:
            w.expect("started")
        started = time.monotonic()
        settled(workers, n, timeout=120)
        settle = time.monotonic() - started
        drain_leaders(workers)
        while not LEADERS.empty():
            LEADERS.get()
        time.sleep(1.0)
        req0, t0 = requests(client_url), time.monotonic()
        time.sleep(3 * ttl)
        idle = delta(requests(client_url), req0)
        idle_rate = sum(idle.values()) / (time.monotonic() - t0)
        handovers: list[float] = []
        crashes: list[float] = []
        after_expiry: list[float] = []
        msgs: dict[str, list[int]] = {"resign": [], "crash": []}
        for kind, out in (("resign", handovers), ("crash", crashes)):
            for _ in range(rounds if kind == "resign" else min(rounds, n - 2)):
                s = settled(workers, n - len(crashes), timeout=60)
                holder = next(w for w, x in zip(workers, s, strict=False) if x["leaders"] == 1)
                while not deletes.empty():
                    deletes.get_nowait()
                before = requests(client_url)
                t = time.monotonic()
                holder.send(kind)
                msg = next_leader(workers, t, timeout=ttl + 30)
                out.append(msg["t"] - t)
                if kind == "crash":
                    after_expiry.append(msg["t"] - deletes.get(timeout=5))
                time.sleep(0.3)
                msgs[kind].append(sum(v for k, v in delta(requests(client_url), before).items()
                                      if k != "LeaseKeepAlive"))
                time.sleep(0.3)
        s = stats(workers)
        sessions_lost = sum(x["sessions_lost"] for x in s)
        threads = sum(x["threads"] for x in s) / n
        rss = sum(x["rss_kib"] for x in s) / n
    finally:
        watch.cancel()
        raw.close()
        for w in workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                w.send("quit")
        for w in workers:
            try:
                w.proc.wait(60)
            except subprocess.TimeoutExpired:
                w.proc.kill()
    return {"n": n, "settle_s": settle, "handover": handovers, "crash": crashes,
            "crash_after_expiry": after_expiry,
            "msgs_per_handover_besides_keepalives": statistics.median(msgs["resign"]),
            "msgs_per_crash_besides_keepalives": (statistics.median(msgs["crash"])
                                                  if msgs["crash"] else float("nan")),
            "idle_msgs_per_s": idle_rate,
            "keepalive_expectation": n * 3 / ttl, "idle_breakdown": idle,
            "threads_per_elector": threads, "rss_kib_per_elector": rss,
            "sessions_lost": sessions_lost}


if __name__ == "__main__":
    from electfsm.testing.local_etcd import LocalEtcd

    with LocalEtcd() as etcd:
        for n in [int(x) for x in (sys.argv[1:] or ["3", "100"])]:
            r = run(etcd.endpoint, etcd.client_url, n)
            print(json.dumps(r, default=str))
