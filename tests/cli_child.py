"""The command `electfsm campaign ... -- python cli_child.py LOG MODE` runs in tests/test_cli*.py.

Appends JSON lines to LOG (one ``write`` each, O_APPEND, so several children can share it):
``start`` (with the ELECTFSM_* environment), a ``beat`` every 20 ms while it runs, ``term`` when
SIGTERM arrives, and ``end`` when it exits on its own terms. Times are ``time.monotonic()``,
which on Linux is the same clock in every process. MODE:

- ``honour`` exits on SIGTERM; ``ignore`` keeps beating until SIGKILL;
- ``linger:S`` keeps beating for S seconds after SIGTERM, then exits 0;
- ``exit:N`` exits with code N after its start line;
- ``signal:N`` kills itself with signal N after its start line;
- ``...+fork`` (e.g. ``ignore+fork``): first forks a grandchild, in the same process group,
  that logs ``fork`` and then beats and answers SIGTERM as MODE says.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def main() -> None:
    path, spec = sys.argv[1], sys.argv[2]
    mode, _, extra = spec.partition("+")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    me = os.environ.get("ELECTFSM_IDENTITY", "?")
    termed: list[float] = []

    def record(event: str, **fields: Any) -> None:
        line = {"event": event, "who": me, "pid": os.getpid(), "t": time.monotonic(), **fields}
        os.write(fd, (json.dumps(line) + "\n").encode())

    def on_term(_sig: int, _frame: object) -> None:
        record("term")
        termed.append(time.monotonic())
        if mode == "honour":
            record("end")
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    record("start", env={k: v for k, v in os.environ.items() if k.startswith("ELECTFSM_")},
           pgid=os.getpgid(0))
    if extra == "fork" and os.fork() == 0:
        record("fork", parent=os.getppid(), pgid=os.getpgid(0))
    elif mode.startswith("exit:"):
        record("end")
        sys.exit(int(mode.split(":", 1)[1]))
    elif mode.startswith("signal:"):
        sig = int(mode.split(":", 1)[1])
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    linger = float(mode.split(":", 1)[1]) if mode.startswith("linger:") else None
    while True:
        record("beat")
        if linger is not None and termed and time.monotonic() >= termed[0] + linger:
            record("end")
            os._exit(0)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
