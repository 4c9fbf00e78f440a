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

from electfsm.etcd import EtcdClient, Watch, prefix_end
from electfsm.sources.campaign import is_candidate_key
from electfsm.testing.etcd_binaries import find_etcdctl_binary
from electfsm.testing.local_etcd import LocalEtcd


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


def watch_deletes(client: EtcdClient, election: str) -> tuple[queue.Queue[float], Watch]:
    """A raw watcher on the election: the monotonic time each candidate key's DELETE arrives
    (splits a handover into the leader's part and the successor's)."""
    prefix = (election + "/").encode()
    start = int(client.range(prefix, prefix_end(prefix)).header.revision) + 1
    watch = client.watch(prefix, prefix_end(prefix), start_revision=start)
    deletes: queue.Queue[float] = queue.Queue()

    def run() -> None:
        for resp in watch:
            for ev in resp.events:
                if ev.type == ev.DELETE and is_candidate_key(prefix, bytes(ev.kv.key)):
                    deletes.put(time.monotonic())

    threading.Thread(target=run, daemon=True).start()
    return deletes, watch


def handovers(endpoint: str, election: str, runs: int,
              spawn: Callable[[str], Candidate],
              split: list[tuple[float, float]] | None = None) -> list[float]:
    """SIGINT → successor's key line, per round; ``split`` gets (SIGINT → the DELETE seen
    by a raw watcher, that DELETE → the key line) for each round."""
    client = EtcdClient([endpoint], timeout=5)
    deletes, watch = watch_deletes(client, election)
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
            deleted = deletes.get(timeout=15)
            if split is not None:
                split.append((deleted - start, elected - deleted))
            if leader.proc.wait(15) != 0:
                raise SystemExit(f"{election}: the resigned leader exited "
                                 f"{leader.proc.returncode}")
            alive.remove(leader)
            leader, follower = follower, spawn(f"n{i + 2}")
            alive.append(follower)
            wait_queued(client, election, 2)
            while not deletes.empty():  # the resigned process's own deletes, if any
                deletes.get_nowait()
    finally:
        for c in alive:
            c.stop()
        watch.cancel()
        client.close()
    return out


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"median {statistics.median(values) * 1000:7.2f} ms  p95 {p95 * 1000:7.2f} ms  "
            f"max {max(values) * 1000:7.2f} ms  (n={len(values)})")


def measure(etcd: LocalEtcd, runs: int, ttl: int = 10
            ) -> dict[str, tuple[list[float], list[tuple[float, float]]]]:
    """Both tools on one etcd, interleaved in halves so drift on the machine hits both."""
    etcdctl = find_etcdctl_binary()
    ep = etcd.endpoint

    def electfsm(name: str) -> Candidate:
        return Candidate([sys.executable, "-m", "electfsm", "campaign", "bench/cli-py", name,
                          "--ttl", str(ttl), "--endpoints", ep])

    def go(name: str) -> Candidate:
        return Candidate([etcdctl, f"--endpoints={ep}", "elect", "bench/cli-go", name])

    out: dict[str, tuple[list[float], list[tuple[float, float]]]] = {
        "electfsm": ([], []), "etcdctl": ([], [])}
    half = runs // 2
    for n in (half, runs - half):
        for name, election, spawn in (("electfsm", "bench/cli-py", electfsm),
                                      ("etcdctl", "bench/cli-go", go)):
            times, split = out[name]
            times += handovers(ep, election, n, spawn, split)
    return out


def markdown(etcd: LocalEtcd, runs: int
             ) -> tuple[list[str], dict[str, tuple[list[float], list[tuple[float, float]]]]]:
    """The CLI section of bench/results.md, and the measurements it was made from."""
    from common import fmt_ms  # bench/ is on sys.path when run.py imports this

    m = measure(etcd, runs)
    ctl = m["etcdctl"][0]
    lines = ["## 1b. Graceful handover, command to command", "",
             "SIGINT to the leading process (it resigns) → the successor prints its key line "
             "(read from its stdout pipe). Baseline: two `etcdctl elect` processes on the same "
             "etcd, interleaved with the electfsm rounds. The split uses a raw watcher that "
             "sees the leader's key deleted.", "",
             "| tool | SIGINT → printed | SIGINT → key deleted | key deleted → printed | "
             "ratio to etcdctl (median) |", "|---|---|---|---|---|"]
    for name, (times, split) in m.items():
        lines.append(f"| `{'electfsm campaign' if name == 'electfsm' else 'etcdctl elect'}` | "
                     f"{fmt_ms(times)} | {fmt_ms([a for a, _ in split])} | "
                     f"{fmt_ms([b for _, b in split])} | "
                     f"{statistics.median(times) / statistics.median(ctl):.2f}x |")
    lines.append("")
    return lines, m


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=10, help="electfsm's lease TTL")
    args = parser.parse_args()
    with LocalEtcd() as etcd:
        m = measure(etcd, args.runs, args.ttl)
    (py, py_split), (ctl, ctl_split) = m["electfsm"], m["etcdctl"]
    print("SIGINT to the leader → the successor prints its key line")
    print(f"  electfsm campaign → electfsm campaign: {summary(py)}")
    print(f"  etcdctl elect     → etcdctl elect:     {summary(ctl)}")
    print(f"  ratio electfsm / etcdctl (medians): "
          f"{statistics.median(py) / statistics.median(ctl):.2f}x")
    for name, split in (("electfsm", py_split), ("etcdctl", ctl_split)):
        print(f"  {name:8} SIGINT → key deleted: {summary([a for a, _ in split])}")
        print(f"  {name:8} key deleted → printed: {summary([b for _, b in split])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
