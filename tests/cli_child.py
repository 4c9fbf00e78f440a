"""The command `electfsm campaign ... -- python cli_child.py LOG MODE` runs in tests/test_cli.py.

Appends JSON lines to LOG (one ``write`` each, O_APPEND, so several children can share it):
``start`` (with the ELECTFSM_* environment), a ``beat`` every 20 ms while it runs, ``term`` when
SIGTERM arrives, and ``end`` when it exits on its own terms. Times are ``time.monotonic()``,
which on Linux is the same clock in every process. MODE ``honour`` exits on SIGTERM; ``ignore``
keeps beating until SIGKILL; ``exit:N`` exits with code N after its start line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    me = os.environ.get("ELECTFSM_IDENTITY", "?")

    def record(event: str, **fields: Any) -> None:
        line = {"event": event, "who": me, "pid": os.getpid(), "t": time.monotonic(), **fields}
        os.write(fd, (json.dumps(line) + "\n").encode())

    def on_term(_sig: int, _frame: object) -> None:
        record("term")
        if mode == "honour":
            record("end")
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    record("start", env={k: v for k, v in os.environ.items() if k.startswith("ELECTFSM_")})
    if mode.startswith("exit:"):
        record("end")
        sys.exit(int(mode.split(":", 1)[1]))
    while True:
        record("beat")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
