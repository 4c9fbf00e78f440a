"""The guard between ``electfsm campaign`` and its command: the command never outlives electfsm.

``electfsm campaign ... -- COMMAND`` does not start COMMAND itself. It starts this small program
(``python -I -S _guard.py FD PARENT GRACE``, standard library only, so it starts in tens of
milliseconds) with one end of a socket pair as FD, and sends it COMMAND's argv as one JSON line.
The guard starts COMMAND in a new session (its own process group), answers ``started PID`` (or
``error ERRNO MESSAGE`` when COMMAND cannot be started) and ``exited RETURNCODE`` once COMMAND
exits (a negative code: killed by that signal, as :class:`subprocess.Popen` reports it).

electfsm signals the group itself (SIGTERM, then SIGKILL after ``--grace``) whenever a term ends
on its watch. The guard is there for the case where electfsm cannot: when electfsm dies by any
means (SIGKILL, the OOM killer, a crash), the kernel closes electfsm's end of the socket, and
the guard at once sends COMMAND's whole process group SIGTERM, then SIGKILL after GRACE
seconds, reaps COMMAND and exits. On Linux it also asks for ``PR_SET_PDEATHSIG`` (SIGUSR1 when
its parent goes), as a second trigger, and checks that its parent is still PARENT after asking
(else the parent died before it could ask). Until electfsm closes its end, the guard keeps
COMMAND unreaped once it has exited (``waitid(WNOWAIT)``): the group's id cannot be reused by an
unrelated process while electfsm may still signal it.

The guard ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C or a shutdown reaches electfsm, which
stops COMMAND in order and then lets the guard go); COMMAND gets the default handlers back.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

PARENT_GONE = signal.SIGUSR1
PR_SET_PDEATHSIG = 1


def running_in_group(pgid: int) -> bool:
    """False when every process of group ``pgid`` is a zombie (orphans of the command wait
    for init to reap them, and still count for ``killpg``). True where /proc cannot tell."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _ask_for_parent_death_signal() -> None:
    """Linux only: the kernel sends us PARENT_GONE when the thread that started us exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(PARENT_GONE), 0, 0, 0)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _end_group(pgid: int, grace: float) -> None:
    """SIGTERM the group; SIGKILL it after ``grace`` seconds unless everyone is gone."""
    if not running_in_group(pgid):
        return
    _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while running_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if running_in_group(pgid):
        _killpg(pgid, signal.SIGKILL)


def _send(sock: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(line.encode() + b"\n")


def _read_command(sock: socket.socket) -> list[str] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    argv = json.loads(data)
    return [str(arg) for arg in argv]


def _returncode(pid: int) -> int | None:
    """The command's exit as Popen reports it, without reaping it; None while it runs."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if info is None or info.si_pid == 0:
        return None
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)


def main(argv: list[str]) -> int:
    fd, parent, grace = int(argv[1]), int(argv[2]), float(argv[3])
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, PARENT_GONE):
        # Python handlers, not SIG_IGN: the command gets the default handlers back on exec.
        signal.signal(sig, lambda _sig, _frame: None)
    _ask_for_parent_death_signal()
    if os.getppid() != parent:
        return 0  # electfsm died before we could ask; nothing was started
    command = _read_command(sock)
    if command is None:
        return 0  # electfsm closed its end (or died) before sending the command
    try:
        child = subprocess.Popen(command, start_new_session=True)
    except OSError as exc:
        _send(sock, f"error {exc.errno or 0} {exc.strerror or exc}")
        return 0
    pid = child.pid
    _send(sock, f"started {pid}")
    reported = False
    while True:
        if not reported:
            code = _returncode(pid)
            if code is not None:
                _send(sock, f"exited {code}")
                reported = True
        if os.getppid() != parent:
            break
        readable, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 512)
        if sock.fileno() in readable:
            try:
                if not sock.recv(512):
                    break  # electfsm closed its end: it is done with the term, or dead
            except OSError:
                break
    _end_group(pid, grace)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
