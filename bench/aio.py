"""``make bench-aio``: what electfsm.aio costs an event loop, and its handover, each against a
baseline measured in the same run; writes bench/results-aio.md.

1. Event-loop lag: a 10 ms ticker's lateness (max and p99) with 100 AsyncElectors started on
   the loop (one election each, all leading, hooks on the loop), against the same ticker on
   the same loop with no elector.
2. Handover: ``await a.resign()`` -> the successor's ``leadership()`` body starts, against the
   threaded ``resign()`` -> successor's ``on_enter_leader`` in the same run, interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import anyio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import fmt_ms, stats  # noqa: E402

from electfsm import Elector, clock  # noqa: E402
from electfsm.aio import AsyncElector  # noqa: E402
from electfsm.etcd import EtcdClient  # noqa: E402
from electfsm.testing.local_etcd import LocalEtcd  # noqa: E402

TICK = 0.010


async def ticker(seconds: float) -> list[float]:
    """How late each 10 ms sleep woke up, for ``seconds``."""
    lags: list[float] = []
    end = clock.now() + seconds
    while clock.now() < end:
        before = clock.now()
        await anyio.sleep(TICK)
        lags.append(max(0.0, clock.now() - before - TICK))
    return lags


async def lag_with_electors(endpoint: str, electors: int, seconds: float) -> list[float]:
    client = EtcdClient([endpoint], timeout=2)
    run = uuid.uuid4().hex[:6]
    try:
        async with anyio.create_task_group() as tg:
            els = [AsyncElector(client=client, election=f"bench/aio-{run}/{i}",
                                identity=f"n{i}", ttl=5) for i in range(electors)]
            for el in els:
                el.on_enter_leader(lambda term: None)
                el.on_leader_change(lambda old, new: None)
            lags_box: list[list[float]] = []

            async def measure() -> None:
                lags_box.append(await ticker(seconds))

            tg.start_soon(measure)
            async with contextlib.AsyncExitStack() as stack:
                for el in els:  # started while the ticker runs: start-up is part of the load
                    await stack.enter_async_context(el)
                await anyio.sleep(seconds)
        return lags_box[0]
    finally:
        client.close()


async def async_handovers(endpoint: str, runs: int) -> list[float]:
    election = f"bench/aio-handover-{uuid.uuid4().hex[:6]}"
    out: list[float] = []
    async with AsyncElector(endpoints=[endpoint], election=election, identity="a",
                            ttl=5) as a, AsyncElector(endpoints=[endpoint], election=election,
                                                      identity="b", ttl=5) as b:
        els = {"a": a, "b": b}
        started: dict[str, float] = {}

        async def body(name: str) -> None:
            el = els[name]
            while True:
                async with el.leadership():
                    started[name] = clock.now()
                    await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(body, "a")
            tg.start_soon(body, "b")
            for _ in range(runs):
                with anyio.fail_after(10):
                    while not (a.is_leader or b.is_leader) or len(started) == 0:
                        await anyio.sleep(0.01)
                    leader, follower = ("a", "b") if a.is_leader else ("b", "a")
                    while els[follower].state != "follower":
                        await anyio.sleep(0.01)
                    started.pop(follower, None)
                    t0 = clock.now()
                    await els[leader].resign()
                    while follower not in started:
                        await anyio.sleep(0.0005)
                out.append(started[follower] - t0)
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    return out


def threaded_handovers(endpoint: str, runs: int) -> list[float]:
    election = f"bench/thr-handover-{uuid.uuid4().hex[:6]}"
    entered: dict[str, float] = {}
    ev = threading.Event()
    els = {n: Elector(endpoints=[endpoint], election=election, identity=n, ttl=5)
           for n in ("a", "b")}
    for name, el in els.items():
        el.on_enter_leader(lambda term, name=name: (entered.__setitem__(name, clock.now()),
                                                   ev.set()))
    out: list[float] = []
    try:
        for el in els.values():
            el.start()
        for _ in range(runs):
            deadline = time.monotonic() + 10
            while not any(e.state == "leader" for e in els.values()):
                assert time.monotonic() < deadline, "no leader"
                time.sleep(0.01)
            leader = next(n for n, e in els.items() if e.state == "leader")
            follower = "b" if leader == "a" else "a"
            while els[follower].state != "follower":
                assert time.monotonic() < deadline, "no follower"
                time.sleep(0.01)
            entered.pop(follower, None)
            ev.clear()
            t0 = clock.now()
            els[leader].resign()
            while follower not in entered:
                ev.wait(0.01)
            out.append(entered[follower] - t0)
            time.sleep(0.05)
    finally:
        for el in els.values():
            el.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--electors", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--out", default=str(HERE / "results-aio.md"))
    args = parser.parse_args()
    lines = [
        "# electfsm.aio benchmarks",
        "",
        f"Made by `make bench-aio` (`python bench/aio.py`) on {time.strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, anyio "
        f"{_version('anyio')}, asyncio, etcd 3.5.1, one local member. Ratios are against "
        "baselines measured in the same run.",
        "",
    ]
    with LocalEtcd() as etcd:
        print("event-loop lag…", flush=True)
        base = anyio.run(ticker, args.seconds)
        loaded = anyio.run(lag_with_electors, etcd.endpoint, args.electors, args.seconds)
        b, w = stats(base), stats(loaded)
        lines += [
            f"## 1. Event-loop lag: {args.electors} AsyncElectors on one loop",
            "",
            f"A {TICK * 1000:.0f} ms ticker for {args.seconds:.0f} s while the electors start, "
            "campaign and lead (one election each, hooks on the loop), against the same "
            "ticker with no elector.",
            "",
            "| | p99 lag | max lag | median lag |",
            "|---|---|---|---|",
            f"| no elector | {b['p99'] * 1000:.2f} ms | {b['max'] * 1000:.2f} ms | "
            f"{b['median'] * 1000:.2f} ms |",
            f"| {args.electors} AsyncElectors | {w['p99'] * 1000:.2f} ms | "
            f"{w['max'] * 1000:.2f} ms | {w['median'] * 1000:.2f} ms |",
            f"| ratio | {w['p99'] / max(b['p99'], 1e-6):.1f}x | "
            f"{w['max'] / max(b['max'], 1e-6):.1f}x | |",
            "",
        ]
        print("handover…", flush=True)
        facade: list[float] = []
        threaded: list[float] = []
        blocks = 5
        for _ in range(blocks):  # interleaved: both see the same machine load
            threaded += threaded_handovers(etcd.endpoint, args.runs // blocks)
            facade += anyio.run(async_handovers, etcd.endpoint, args.runs // blocks)
        ratio = statistics.median(facade) / statistics.median(threaded)
        lines += [
            "## 2. Handover through the facade",
            "",
            "`await a.resign()` → the successor's `leadership()` body starts, against the "
            "threaded `resign()` → the successor's `on_enter_leader`, interleaved in "
            f"{blocks} blocks.",
            "",
            f"- facade: {fmt_ms(facade)}",
            f"- threaded: {fmt_ms(threaded)}",
            f"- median ratio: {ratio:.2f}x",
            "",
        ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
