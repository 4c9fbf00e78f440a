"""A candidate in its own process, for tests that SIGKILL or SIGSTOP one node.

Usage: python candidate.py ENDPOINT ELECTION IDENTITY TTL
Prints one JSON line per transition and leader change (with monotonic time) and runs until
SIGTERM/SIGINT, when it stops cleanly.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from typing import Any

from electfsm import Elector


def main() -> None:
    endpoint, election, identity, ttl = sys.argv[1:5]
    elector = Elector(endpoints=[endpoint], election=election, identity=identity, ttl=int(ttl))
    lock = threading.Lock()

    def emit(**fields: Any) -> None:
        with lock:
            print(json.dumps({"t": time.monotonic(), "identity": identity, **fields}), flush=True)

    for state in ("disconnected", "candidate", "follower", "leader"):
        getattr(elector, f"on_enter_{state}")(lambda _arg, s=state: emit(state=s))
    elector.on_leader_change(lambda old, new: emit(leader=new and new.identity))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    elector.start()
    done.wait()
    elector.stop()
    emit(stopped=True)


if __name__ == "__main__":
    main()
