"""Where a graceful handover's time goes: timestamps at each hop of the successor's path.

    make timeline        (or: python bench/timeline.py [--runs 100])

A diagnostic, not a figure of results.md: it wraps electfsm's internals (the etcd client's
txn and range, the watch iterator, the dispatcher's apply) to timestamp them, which costs a
little itself. For each in-process ``resign()`` round, from the resign txn being sent:
the txn answered (etcd committed the delete), the successor's predecessor watch yields the
DELETE, its confirm Range is sent and answered, the dispatcher applies Elected, and the
``on_enter_leader`` hook runs. Also the cost of one quiet Range, through electfsm's client and
through a bare gRPC stub, for comparison with the confirm Range during a handover.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import handover  # type: ignore[import-not-found]  (bench/, this script's directory)
from common import pct  # type: ignore[import-not-found]
from etcd3.etcdrpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

import electfsm.dispatcher as dispatcher_mod
import electfsm.etcd as etcd_mod
from electfsm.events import Elected
from electfsm.testing.local_etcd import LocalEtcd

HOPS = ("resign txn answered", "successor's watch yields the DELETE", "confirm Range sent",
        "confirm Range answered", "dispatcher applies Elected")
marks: dict[str, list[float]] = defaultdict(list)


def mark(hop: str) -> None:
    marks[hop].append(time.perf_counter())


def instrument() -> None:
    """Wrap the hops' methods with timestamps (this process only)."""
    txn, rng = etcd_mod.EtcdClient.txn, etcd_mod.EtcdClient.range
    it, apply = etcd_mod.Watch.__iter__, dispatcher_mod.Dispatcher.apply

    def timed_txn(self: Any, *a: Any, **k: Any) -> Any:
        resign = str(k.get("what", "")).startswith("resign")
        if resign:
            mark("start")
        out = txn(self, *a, **k)
        if resign:
            mark(HOPS[0])
        return out

    def timed_range(self: Any, *a: Any, **k: Any) -> Any:
        confirm = "who is ahead" in str(k.get("what", ""))
        if confirm:
            mark(HOPS[2])
        out = rng(self, *a, **k)
        if confirm:
            mark(HOPS[3])
        return out

    def timed_iter(self: Any) -> Iterator[Any]:
        for resp in it(self):
            predecessor = not self._key.endswith(b"/")  # observe watches the prefix
            if predecessor and any(ev.type == kv_pb2.Event.DELETE for ev in resp.events):
                mark(HOPS[1])
            yield resp

    def timed_apply(self: Any, event: Any) -> Any:
        if isinstance(event, Elected):
            mark(HOPS[4])
        return apply(self, event)

    etcd_mod.EtcdClient.txn = timed_txn
    etcd_mod.EtcdClient.range = timed_range
    etcd_mod.Watch.__iter__ = timed_iter
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
    confirm = [r[3] - r[2] for r in rows]
    print(f"confirm Range during the handover          {ms(confirm)}")
    print(f"quiet Range, electfsm's client             {ms(ours)}")
    print(f"quiet Range, bare gRPC stub                {ms(bare)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
