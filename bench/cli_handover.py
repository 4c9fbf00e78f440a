"""CLI-to-CLI handover, ``electfsm campaign`` beside ``etcdctl elect``, in one run on one etcd.

    python bench/cli_handover.py [--runs 20] [--ttl 10]

One round: two candidates of the same tool run as processes; the leader gets SIGINT (it
resigns), and the time is taken from sending the signal to the moment the successor's first
output line (its leader key) is read from its stdout pipe. The resigned process is then
replaced by a fresh one, which queues behind the new leader before the next round starts.
Both tools are measured the same way, against the same LocalEtcd.
"""

from __future__ import annotations

import argparse
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from electfsm.campaign import is_candidate_key
from electfsm.embedded import LocalEtcd, find_etcdctl_binary
from electfsm.etcd import EtcdClient, prefix_end


class Candidate:
    """A campaigning process; ``elected`` gets the monotonic time its key line was read."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.elected: queue.Queue[float] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        first = True
        for _line in self.proc.stdout:  # key line, then value line
            if first:
                self.elected.put(time.monotonic())
            first = not first

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def queued(client: EtcdClient, election: str) -> int:
    prefix = (election + "/").encode()
    kvs = client.range(prefix, prefix_end(prefix)).kvs
    return sum(1 for kv in kvs if is_candidate_key(prefix, bytes(kv.key)))


def wait_queued(client: EtcdClient, election: str, count: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while queued(client, election) != count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{election}: {count} candidates did not queue in {timeout}s")
        time.sleep(0.01)


def handovers(endpoint: str, election: str, runs: int,
              spawn: Callable[[str], Candidate]) -> list[float]:
    client = EtcdClient([endpoint], timeout=5)
    alive: list[Candidate] = []
    out: list[float] = []
    try:
        leader = spawn("n0")
        alive.append(leader)
        leader.elected.get(timeout=15)
        follower = spawn("n1")
        alive.append(follower)
        wait_queued(client, election, 2)
        for i in range(runs):
            time.sleep(0.1)  # let the follower's watch settle
            start = time.monotonic()
            leader.proc.send_signal(signal.SIGINT)
            elected = follower.elected.get(timeout=15)
            out.append(elected - start)
            if leader.proc.wait(15) != 0:
                raise SystemExit(f"{election}: the resigned leader exited "
                                 f"{leader.proc.returncode}")
            alive.remove(leader)
            leader, follower = follower, spawn(f"n{i + 2}")
            alive.append(follower)
            wait_queued(client, election, 2)
    finally:
        for c in alive:
            c.stop()
        client.close()
    return out


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"median {statistics.median(values) * 1000:7.2f} ms  p95 {p95 * 1000:7.2f} ms  "
            f"max {max(values) * 1000:7.2f} ms  (n={len(values)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=10, help="electfsm's lease TTL")
    args = parser.parse_args()
    etcdctl = find_etcdctl_binary()
    with LocalEtcd() as etcd:
        ep = etcd.endpoint

        def electfsm(name: str) -> Candidate:
            return Candidate([sys.executable, "-m", "electfsm", "campaign", "bench/cli-py", name,
                              "--ttl", str(args.ttl), "--endpoints", ep])

        def go(name: str) -> Candidate:
            return Candidate([etcdctl, f"--endpoints={ep}", "elect", "bench/cli-go", name])

        # Interleave the two tools in halves so drift on the machine hits both alike.
        half = args.runs // 2
        py = handovers(ep, "bench/cli-py", half, electfsm)
        ctl = handovers(ep, "bench/cli-go", half, go)
        py += handovers(ep, "bench/cli-py", args.runs - half, electfsm)
        ctl += handovers(ep, "bench/cli-go", args.runs - half, go)
    print("SIGINT to the leader → the successor prints its key line")
    print(f"  electfsm campaign → electfsm campaign: {summary(py)}")
    print(f"  etcdctl elect     → etcdctl elect:     {summary(ctl)}")
    print(f"  ratio electfsm / etcdctl (medians): "
          f"{statistics.median(py) / statistics.median(ctl):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
