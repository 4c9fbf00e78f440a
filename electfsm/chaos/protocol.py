"""What the lab and a candidate process agree on: the signals that inject faults, the
hidden behaviour breaks of the mutation check, and the JSON-lines event log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from electfsm import clock

PASSWORD_ENV = "ELECTFSM_CANDIDATE_PASSWORD"

#: Signals a harness sends to ask for one fault (SIGUSR1: control, SIGUSR2: stall in work).
SIG_PAUSE_BEFORE_WRITE = signal.SIGRTMIN + 1  # a GC pause between the check and the write
SIG_PAUSE_IN_TXN = signal.SIGRTMIN + 2  # a GC pause inside fenced_txn, after its check
SIG_STALE_CONTROL = signal.SIGRTMIN + 3  # guarded resign + proclaim with the latest term
SIG_CLOCK_SLOW = signal.SIGRTMIN + 4  # the elector's clock runs at SLOW_RATE from now on
SIG_CLOCK_FAST = signal.SIGRTMIN + 5  # ... at FAST_RATE
SIG_CLOCK_TRUE = signal.SIGRTMIN + 6  # ... at the real rate again
SIG_SLOW_HOOK = signal.SIGRTMIN + 7  # the next hook sleeps --stall seconds (GIL released)
SIG_HOOK_EXIT = signal.SIGRTMIN + 8  # the next hook raises SystemExit
#: Clock-rate skews a harness can ask for: 8 % slow is inside what the default margin of
#: a 2 s TTL absorbs (1 - 0.25/2 = 0.875); fast only steps down earlier.
SLOW_RATE, FAST_RATE = 0.92, 1.25

#: Deliberately broken behaviours, one per property, for the lab's mutation check (see
#: ``MUTATIONS``). Only ``--break`` (a hidden option of this test process) turns one on; the
#: public API has no way to reach them.
MUTATIONS = {
    "P1": "the fencing token is cached from the first term of the process",
    "P2": "a write after a GC pause borrows the newest leader's token",
    "P3": "fenced_txn sends its transaction without the fence",
    "P4": "the work loop skips its term.valid checks",
    "P5": "the elector's clocks run at half speed (beyond the margin's tolerance)",
    "P6": "elected is reported at a revision read before our key was created",
    "P7": "leader-change hooks run on a thread of their own",
    "P8": "a stale proclaim is sent without its guard",
    "L1": "stop() leaves the lease to expire instead of revoking it",
    "L2": "the elector drops every leader report after the first",
    "L3": "the leader resigns every 1.5 s",
    "L4": "a lost lease is kept alive by a second keepalive for 3 x TTL",
    "L5": "stop() leaves a thread running",
}


class EventLog:
    """JSON lines to a file (or a stream), one ``write`` per event, flushed at once."""

    def __init__(self, target: str | IO[str], **fixed: Any) -> None:
        if isinstance(target, str):
            if target == "-":
                self._out: IO[str] = sys.stdout
                self._owned = False
            else:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                self._out = open(target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
                self._owned = True
        else:
            self._out, self._owned = target, False
        self._fixed = fixed
        self._lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"mono": clock.now(), "wall": time.time(), **self._fixed, "kind": kind,
                  **fields}
        line = json.dumps(record, default=str)
        with self._lock:
            if not self._out.closed:
                self._out.write(line + "\n")
                self._out.flush()
        return record

    def close(self) -> None:
        with self._lock:
            if self._owned:
                self._out.close()


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete JSON lines of a log (a line cut short by SIGKILL is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def event_time(ev: dict[str, Any]) -> float:
    """When an event happened on the harness's monotonic clock."""
    return float(ev.get("recv_mono", ev["mono"]))
