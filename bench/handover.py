"""Handover and failover figures, each beside a baseline measured in the same run.

    make handover        (or: python bench/handover.py [--runs 20] [--kills 5] [--ttl 2])

- graceful handover: leader.resign() → the successor's on_enter_leader runs (in-process),
  against the floor: a raw etcd delete → the watch event arriving on the same server;
- crash failover: a candidate process is SIGKILLed → the survivor leads, against the TTL.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from electfsm import Elector
from electfsm.etcd import EtcdClient, prefix_end
from electfsm.sources.campaign import is_candidate_key
from electfsm.testing.local_etcd import LocalEtcd

ROOT = Path(__file__).resolve().parent.parent


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"median {statistics.median(values) * 1000:7.2f} ms  p95 {p95 * 1000:7.2f} ms  "
            f"max {max(values) * 1000:7.2f} ms  (n={len(values)})")


def watch_floor(endpoint: str, runs: int) -> list[float]:
    """Raw etcd: delete a key → the DELETE event reaches a watcher."""
    client = EtcdClient([endpoint], timeout=5)
    out = []
    try:
        for i in range(runs):
            key = f"bench/floor/{i}".encode()
            resp = client.put(key, b"x")
            watch = client.watch(key, start_revision=int(resp.header.revision) + 1)
            got = threading.Event()
            seen: list[float] = []

            def consume(w=watch, s=seen, g=got) -> None:  # type: ignore[no-untyped-def]
                for _ in w:
                    s.append(time.monotonic())
                    g.set()
                    return

            t = threading.Thread(target=consume)
            t.start()
            time.sleep(0.05)  # let the watch be created
            start = time.monotonic()
            client.delete(key)
            got.wait(5)
            watch.cancel()
            t.join()
            out.append(seen[0] - start)
    finally:
        client.close()
    return out


def queued(client: EtcdClient, election: str, count: int, timeout: float = 10) -> None:
    """Wait until ``count`` candidate keys are in line."""
    prefix = (election + "/").encode()
    deadline = time.monotonic() + timeout
    while sum(1 for kv in client.range(prefix, prefix_end(prefix), keys_only=True).kvs
              if is_candidate_key(prefix, bytes(kv.key))) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{election}: {count} candidates did not queue in {timeout}s")
        time.sleep(0.005)


def handovers(endpoint: str, runs: int, how: str = "resign") -> list[float]:
    """Leader steps down (``how="resign"``) or its key is deleted by hand (``"delete"``) →
    the successor's on_enter_leader runs."""
    election = f"bench/handover-{how}"
    a = Elector(endpoints=[endpoint], election=election, identity="a", ttl=5)
    b = Elector(endpoints=[endpoint], election=election, identity="b", ttl=5)
    raw = EtcdClient([endpoint], timeout=5)
    entered: dict[str, float] = {}
    ready = threading.Condition()

    def lead(name: str):  # type: ignore[no-untyped-def]
        def hook(term: object) -> None:
            with ready:
                entered[name] = time.monotonic()
                ready.notify_all()
        return hook

    a.on_enter_leader(lead("a"))
    b.on_enter_leader(lead("b"))
    out = []
    try:
        a.start()
        a.wait_for("leader", timeout=10)
        b.start()
        b.wait_for("follower", timeout=10)
        time.sleep(0.2)
        for _ in range(runs):
            leader, successor = (a, b) if a.state == "leader" else (b, a)
            entered.pop(successor.identity, None)
            key = leader.term.key.encode() if leader.term else b""
            start = time.monotonic()
            if how == "resign":
                leader.resign()
            else:
                raw.delete(key)
            with ready:
                ready.wait_for(lambda s=successor: s.identity in entered, timeout=10)
            out.append(entered[successor.identity] - start)
            leader.wait_for("follower", timeout=10)
            queued(raw, election, 2)  # the next round starts with a successor in line
            time.sleep(0.05)
    finally:
        a.stop()
        b.stop()
        raw.close()
    return out


def failovers(endpoint: str, kills: int, ttl: int) -> list[float]:
    out = []
    for i in range(kills):
        election = f"bench/failover/{ttl}-{i}"
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "candidate.py"),
                                 endpoint, election, "doomed", str(ttl)],
                                stdout=subprocess.PIPE, text=True)
        survivor = Elector(endpoints=[endpoint], election=election, identity="survivor",
                           ttl=ttl)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if json.loads(line).get("state") == "leader":
                    break
            survivor.start()
            survivor.wait_for("follower", timeout=10)
            time.sleep(0.3)
            start = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            survivor.wait_for("leader", timeout=ttl + 10)
            out.append(time.monotonic() - start)
        finally:
            proc.kill()
            proc.wait()
            survivor.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=2)
    args = parser.parse_args()
    with LocalEtcd() as etcd:
        floor = watch_floor(etcd.endpoint, args.runs)
        hand = handovers(etcd.endpoint, args.runs)
        deleted = handovers(etcd.endpoint, args.runs, how="delete")
        fail = failovers(etcd.endpoint, args.kills, args.ttl)
    print(f"etcd delete → watch event (floor):  {summary(floor)}")
    print(f"resign → successor's on_enter_leader: {summary(hand)}")
    ratio = statistics.median(hand) / statistics.median(floor)
    print(f"  ratio to the floor (medians): {ratio:.1f}x")
    print(f"leader key deleted → successor leads:  {summary(deleted)}")
    print(f"SIGKILL leader → survivor leads (ttl {args.ttl}s): {summary(fail)}")
    print(f"  ratio to the TTL (medians): {statistics.median(fail) / args.ttl:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
