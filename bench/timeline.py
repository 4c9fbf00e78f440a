"""Where a graceful handover's time goes: timestamps at each hop of the successor's path.

    make timeline        (or: python bench/timeline.py [--runs 100])

A diagnostic, not a figure of results.md: it wraps electfsm's internals (the etcd client's
txn, observe's handler of the election's watch events, the dispatcher's apply) to timestamp
them, which costs a little itself. For each in-process ``resign()`` round, from the resign txn
being sent: the txn answered (etcd committed the delete), the successor's observe applies the
DELETE from the election's event stream (on the connection's watch reader), the dispatcher
applies that view (which shows the successor's key first, so it elects), and the
``on_enter_leader`` hook runs. Also the cost of one quiet Range, through electfsm's client and
through a bare gRPC stub: the read a confirmation from the stream no longer pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import grpc
import handover  # type: ignore[import-not-found]  (bench/, this script's directory)
from common import pct  # type: ignore[import-not-found]
from etcd3.etcdrpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

import electfsm.dispatcher as dispatcher_mod
import electfsm.etcd as etcd_mod
import electfsm.sources.observe as observe_mod
from electfsm.events import Elected, LeaderSeen
from electfsm.testing.local_etcd import LocalEtcd

HOPS = ("resign txn answered", "observe applies the DELETE", "dispatcher applies the view")
marks: dict[str, list[float]] = defaultdict(list)


def mark(hop: str) -> None:
    marks[hop].append(time.perf_counter())


def instrument() -> None:
    """Wrap the hops' methods with timestamps (this process only)."""
    txn, on_event = etcd_mod.EtcdClient.txn, observe_mod.Observer._on_event
    apply = dispatcher_mod.Dispatcher.apply

    def timed_txn(self: Any, *a: Any, **k: Any) -> Any:
        resign = str(k.get("what", "")).startswith("resign")
        if resign:
            mark("start")
        out = txn(self, *a, **k)
        if resign:
            mark(HOPS[0])
        return out

    def timed_on_event(self: Any, view: Any, resp: Any) -> None:
        if any(ev.type == kv_pb2.Event.DELETE for ev in resp.events):
            mark(HOPS[1])
        on_event(self, view, resp)

    def timed_apply(self: Any, event: Any) -> Any:
        if isinstance(event, Elected) or (
                isinstance(event, LeaderSeen) and event.leader is not None
                and event.leader.key == self.our_key and self.state != "leader"):
            mark(HOPS[2])
        return apply(self, event)

    etcd_mod.EtcdClient.txn = timed_txn
    observe_mod.Observer._on_event = timed_on_event
    dispatcher_mod.Dispatcher.apply = timed_apply


def quiet_range(call: Callable[[], Any], runs: int = 300) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        out.append(time.perf_counter() - t)
    return out


def ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:6.2f} ms  p90 "
            f"{pct(values, 0.9) * 1000:6.2f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    with LocalEtcd() as etcd:
        client = etcd_mod.EtcdClient([etcd.endpoint], timeout=5)
        channel = grpc.insecure_channel(etcd.endpoint)
        stub = rpc_pb2_grpc.KVStub(channel)
        request = rpc_pb2.RangeRequest(key=b"timeline/quiet")
        try:
            ours = quiet_range(lambda: client.range(b"timeline/quiet"))
            bare = quiet_range(lambda: stub.Range(request, timeout=5))
        finally:
            client.close()
            channel.close()
        instrument()
        hooks = handover.handovers(etcd.endpoint, args.runs)
    # per round: the first timestamp of each hop after that round's resign txn was sent
    rows = []
    for start in marks["start"][-args.runs:]:
        row = [min((t for t in marks[hop] if t >= start), default=float("nan")) - start
               for hop in HOPS]
        rows.append(row)
    print(f"in-process resign handover, {args.runs} rounds; from the resign txn being sent:")
    for i, hop in enumerate(HOPS):
        print(f"  {hop:40s} {ms([r[i] for r in rows])}")
    print(f"  {'(hook; from resign() being called)':40s} {ms(hooks)}")
    print(f"quiet Range, electfsm's client             {ms(ours)}")
    print(f"quiet Range, bare gRPC stub                {ms(bare)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
