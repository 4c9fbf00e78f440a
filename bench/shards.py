"""``make bench-shards``: 1,000 elections in one process on one Session (one lease), against
the same process with no elector and against one lease per election, in the same run; and a
SIGKILL of the process leading all 1,000. Writes bench/results-shards.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from electfsm.testing.local_etcd import LocalEtcd  # noqa: E402


def idle(endpoint: str, client_url: str, electors: int, *, session: bool, ttl: int,
         prefix: str) -> dict[str, object]:
    argv = [sys.executable, str(HERE / "idle.py"), "--endpoint", endpoint, "--client-url",
            client_url, "--electors", str(electors), "--idle", "10", "--ttl", str(ttl),
            "--prefix", prefix]
    out = subprocess.run(argv + (["--session"] if session else []), capture_output=True,
                         text=True, timeout=600, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


HOLDER = textwrap.dedent("""
    import sys, time
    from electfsm import Elector, Session
    endpoint, prefix, n, ttl, name = sys.argv[1:6]
    session = Session(endpoints=[endpoint], ttl=int(ttl)).start()
    electors = [Elector(session=session, election=f"{prefix}/shard-{i}", identity=name)
                for i in range(int(n))]
    led = {}
    for e in electors:
        e.on_enter_leader(lambda term, e=e: led.setdefault(e.config.election, time.monotonic()))
        e.start()
    print("started", flush=True)
    for line in sys.stdin:
        if line.strip() == "report":
            states = [e.state for e in electors]
            print(json.dumps({"leaders": states.count("leader"),
                              "followers": states.count("follower"),
                              "led": sorted(led.values())}), flush=True)
""").replace("import sys, time", "import json, sys, time")


def failover(endpoint: str, n: int, ttl: int, prefix: str) -> dict[str, float]:
    """Process A leads all n shards on one session; B follows on its own; SIGKILL A and time
    until B leads every shard (monotonic time is system-wide on Linux)."""
    def start(name: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, endpoint, prefix, str(n),
                              str(ttl), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "started"
        return p

    def report(p: subprocess.Popen[str]) -> dict[str, object]:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("report\n")
        p.stdin.flush()
        result: dict[str, object] = json.loads(p.stdout.readline())
        return result

    a = start("a")
    deadline = time.monotonic() + 120
    while report(a)["leaders"] != n:
        assert time.monotonic() < deadline, "a never led every shard"
        time.sleep(0.2)
    b = start("b")
    while report(b)["followers"] != n:
        assert time.monotonic() < deadline, "b never followed every shard"
        time.sleep(0.2)
    killed = time.monotonic()
    a.kill()
    a.wait()
    while True:
        r = report(b)
        if r["leaders"] == n:
            break
        assert time.monotonic() < killed + 60, f"b leads only {r['leaders']} of {n}"
        time.sleep(0.05)
    led = [float(t) for t in r["led"]]  # type: ignore[union-attr]
    b.kill()
    b.wait()
    return {"first": min(led) - killed, "last": max(led) - killed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--electors", type=int, default=1000)
    p.add_argument("--separate", type=int, default=100,
                   help="electors with one lease each, for comparison")
    p.add_argument("--ttl", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results-shards.md"))
    a = p.parse_args()
    with LocalEtcd() as etcd:
        ep, url = etcd.endpoint, etcd.client_url
        print("idle…", flush=True)
        base = idle(ep, url, 0, session=True, ttl=a.ttl, prefix="bench/s0")
        shared = idle(ep, url, a.electors, session=True, ttl=a.ttl, prefix="bench/s1")
        separate = idle(ep, url, a.separate, session=False, ttl=a.ttl, prefix="bench/s2")
        print("failover…", flush=True)
        fo = failover(ep, a.electors, a.ttl, "bench/s3")

    def per(r: dict[str, object], key: str, n: int) -> float:
        return (float(r[key]) - float(base[key])) / n  # type: ignore[arg-type]

    def msgs(r: dict[str, object]) -> float:
        return sum(r["etcd_msgs_per_s"].values())  # type: ignore[union-attr]

    n, m = a.electors, a.separate
    lines = [
        "# Many elections on one session",
        "",
        f"Made by `make bench-shards` (`python bench/shards.py`) on "
        f"{time.strftime('%Y-%m-%d')}: {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, etcd 3.5.1 (one local member), TTL {a.ttl} s. Idle "
        "figures over 10 s once every elector leads; each in a fresh process; the baseline "
        "is the same process with the connection and no elector.",
        "",
        "| figure | no elector | "
        f"{n} elections, one Session | {m} elections, one lease each |",
        "|---|---|---|---|",
        f"| etcd messages/s | {msgs(base):.1f} | {msgs(shared):.1f} | {msgs(separate):.1f} |",
        f"| CPU (share of one core) | {float(base['cpu_share']):.2%} | "  # type: ignore[arg-type]
        f"{float(shared['cpu_share']):.2%} | {float(separate['cpu_share']):.2%} |",  # type: ignore[arg-type]
        f"| threads | {base['threads']} | {shared['threads']} | {separate['threads']} |",
        f"| threads per election | | {per(shared, 'threads', n):.2f} | "
        f"{per(separate, 'threads', m):.2f} |",
        f"| resident memory per election | | {per(shared, 'rss_kib', n):.1f} KiB | "
        f"{per(separate, 'rss_kib', m):.1f} KiB |",
        "",
        f"SIGKILL of the process leading all {n} elections (one session, TTL {a.ttl} s): a "
        f"survivor process led the first after {fo['first']:.3f} s and all {n} after "
        f"{fo['last']:.3f} s (TTL + {fo['last'] - a.ttl:.3f} s).",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
