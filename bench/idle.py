"""Many elections in one process (leadership per shard): N electors sharing one connection
(and with ``--session`` one lease),
after they settle: threads, resident memory and CPU over an idle window, and etcd's request
rate. Run in a fresh process per measurement; ``--electors 0`` is the baseline."""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time

from common import delta, requests

from electfsm import Elector, Session
from electfsm.etcd import EtcdClient


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--client-url", required=True)
    p.add_argument("--electors", type=int, default=100)
    p.add_argument("--ttl", type=int, default=10)
    p.add_argument("--idle", type=float, default=10.0)
    p.add_argument("--prefix", default="bench/idle")
    p.add_argument("--session", action="store_true",
                   help="all electors on one Session (one lease) instead of one lease each")
    a = p.parse_args()
    client = EtcdClient.connect([a.endpoint])
    client.status()
    session = Session(client=client, ttl=a.ttl) if a.session else None
    if session is not None:
        electors = [Elector(session=session, election=f"{a.prefix}/shard-{i}",
                            identity="node") for i in range(a.electors)]
    else:
        electors = [Elector(client=client, election=f"{a.prefix}/shard-{i}", identity="node",
                            ttl=a.ttl) for i in range(a.electors)]
    for e in electors:
        e.start()
    for e in electors:
        e.wait_for("leader", timeout=60)
    time.sleep(1.0)
    before_req, cpu0, t0 = requests(a.client_url), cpu_seconds(), time.monotonic()
    time.sleep(a.idle)
    cpu1, t1, after_req = cpu_seconds(), time.monotonic(), requests(a.client_url)
    result = {"electors": a.electors, "threads": threading.active_count(), "rss_kib": rss_kib(),
              "cpu_share": (cpu1 - cpu0) / (t1 - t0),
              "etcd_msgs_per_s": {k: v / (t1 - t0)
                                  for k, v in delta(after_req, before_req).items()}}
    if session is not None:
        session.stop()
    for e in electors:
        e.stop()
    client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
