"""Step-down margin: blackhole the leader's link to etcd and measure how long before etcd
expires its lease (the key's DELETE, seen by a direct watcher) the leader stepped down
(``on_exit_leader``). Must be > 0 in every run; the baseline is the configured margin."""

from __future__ import annotations

import sys
import threading
import time

from electfsm import Elector
from electfsm.etcd import EtcdClient
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd


def one(etcd: LocalEtcd, ttl: int, run: int) -> tuple[float, float]:
    """(seconds the step-down came before the server-side expiry, the elector's margin)."""
    election = f"bench/stepdown/{ttl}-{run}"
    with FaultProxy(etcd.endpoint) as proxy:
        leader = Elector(endpoints=[proxy.endpoint], election=election, identity="leader",
                         ttl=ttl, call_timeout=0.5)
        stepped: list[float] = []
        leader.on_exit_leader(lambda term: stepped.append(time.monotonic()))
        raw = EtcdClient([etcd.endpoint], timeout=5)
        try:
            leader.start()
            leader.wait_for("leader", timeout=10)
            assert leader.term is not None
            key = leader.term.key.encode()
            rev = int(raw.range(key).header.revision)
            watch = raw.watch(key, start_revision=rev + 1)
            expired: list[float] = []

            def wait_delete() -> None:
                for _ in watch:
                    expired.append(time.monotonic())
                    return

            t = threading.Thread(target=wait_delete)
            t.start()
            time.sleep(0.5)
            proxy.blackhole()
            t.join(ttl + 5)
            watch.cancel()
            margin = leader.config.margin_for(leader.ttl)
            return expired[0] - stepped[0], margin
        finally:
            proxy.pass_through()
            leader.stop(timeout=5)
            raw.close()


def run(etcd: LocalEtcd, ttl: int = 2, runs: int = 5) -> list[tuple[float, float]]:
    return [one(etcd, ttl, i) for i in range(runs)]


if __name__ == "__main__":
    with LocalEtcd() as etcd:
        for lead, margin in run(etcd, int(sys.argv[1]) if len(sys.argv) > 1 else 2):
            print(f"stepped down {lead:.3f} s before etcd expired the lease (margin {margin} s)")
