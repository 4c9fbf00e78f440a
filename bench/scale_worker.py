"""One process of the scale benchmark: K electors in one election sharing one connection.

Commands on stdin: ``stats``, ``resign``, ``crash`` (the local leader stops renewing without
resigning, like a killed process), ``quit``. Prints JSON lines; ``leader`` lines carry the
monotonic time (system-wide on Linux, so the orchestrator compares across processes).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from idle import rss_kib

from electfsm import Elector
from electfsm.etcd import EtcdClient

lock = threading.Lock()


def say(**fields: object) -> None:
    with lock:
        print(json.dumps(fields), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--election", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--name", default="w")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="spread the electors' starts over this many seconds")
    a = p.parse_args()
    client = EtcdClient.connect([a.endpoint], timeout=5)
    electors = []
    lost: dict[str, int] = {}  # sessions lost per identity (entries into disconnected)
    for i in range(a.count):
        e = Elector(client=client, election=a.election, identity=f"{a.name}-{i}", ttl=a.ttl)
        e.on_enter_leader(lambda term, me=e.config.election, n=f"{a.name}-{i}":
                          say(event="leader", identity=n, t=time.monotonic()))
        e.on_enter_disconnected(lambda change, n=f"{a.name}-{i}":
                                lost.__setitem__(n, lost.get(n, 0) + 1))
        electors.append(e)
    base_threads, base_rss = threading.active_count(), rss_kib()
    for e in electors:
        e.start()
        time.sleep(a.ramp / max(1, a.count))
    say(event="started")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            states = [e.state for e in electors]
            say(event="stats", leaders=states.count("leader"),
                followers=states.count("follower"), candidates=states.count("candidate"),
                disconnected=states.count("disconnected"),
                threads=threading.active_count() - base_threads, rss_kib=rss_kib() - base_rss,
                sessions_lost=sum(lost.get(e.identity, 0) for e in electors))
        elif cmd in ("resign", "crash"):
            leaders = [e for e in electors if e.state == "leader"]
            if leaders:
                t = time.monotonic()
                if cmd == "resign":
                    leaders[0].resign(timeout=None)
                else:
                    leaders[0].stop(revoke=False)
                    electors.remove(leaders[0])
                say(event=cmd, identity=leaders[0].identity, t=t)
            else:
                say(event="no-leader-here")
        elif cmd == "quit":
            break
    for e in electors:
        e.stop()
    client.close()
    say(event="bye")


if __name__ == "__main__":
    main()
