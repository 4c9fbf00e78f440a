"""The command of one term of ``electfsm campaign ... -- COMMAND``, and how it is stopped.

::

    child = Child(["./worker", "--queue", "q1"], env, grace=0.5)   # runs in its own group
    ...                                    # child.exited is set when it exits on its own
    child.stop(grace=0.5)                  # SIGTERM the group, SIGKILL after grace
    child.close()                          # the guard goes; nothing of the term is left

COMMAND runs in its own session and process group, started by a small guard process
(``electfsm.cli._guard``) that stays between electfsm and COMMAND for the whole term. electfsm
signals COMMAND's group itself; the guard only acts when electfsm dies without stopping
COMMAND (SIGKILL, the OOM killer, a crash): the guard notices at once, because the kernel closes
electfsm's end of their socket, and sends the group SIGTERM, then SIGKILL after ``grace``
seconds. So a command, its children and their children never outlive electfsm by more than
``grace``, and never overlap the next leader's command: our lease, and so our key, outlives
our local step-down deadline by at least the margin, and ``grace`` defaults to half of it.

This works on any POSIX system (the guard needs only the socket). On Linux the guard also asks
for ``PR_SET_PDEATHSIG`` as a second trigger (it then checks ``getppid()``, so the end of the
thread that started it is not taken for electfsm's death). Where there is no /proc (macOS, the
BSDs) a group whose processes have all exited cannot be told from a running one, so a stop
may wait the whole ``grace`` before its SIGKILL. Windows is not supported (no process groups).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from electfsm import logs
from electfsm.cli._guard import running_in_group

log = logs.logger("electfsm.cli")

#: The guard program that sits between electfsm and the command of a term.
GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_guard.py")
#: How long the guard may take to start COMMAND (an interpreter start, on a loaded machine).
START_TIMEOUT = 30.0


class Child:
    """The command of one term: started by a guard in its own process group, stopped as a group.

    Raises :class:`OSError` when the command cannot be started (its errno and message).
    """

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], grace: float) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.guard = subprocess.Popen(
                [sys.executable, "-I", "-S", GUARD, str(theirs.fileno()), str(os.getpid()),
                 repr(float(grace))],
                env=dict(env), pass_fds=[theirs.fileno()], start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._buffer = b""
        self._closing = False
        self.returncode: int | None = None  # once exited: as Popen has it (-S: signal S)
        self.guard_lost = False             # once exited: the guard died, we killed the group
        self.exited = threading.Event()
        try:
            ours.settimeout(START_TIMEOUT)
            ours.sendall(json.dumps(list(argv)).encode() + b"\n")
            first = self._readline().split(" ", 2)
            ours.settimeout(None)
        except OSError as exc:
            self.close()
            raise OSError(exc.errno, f"the guard process did not start it: {exc}") from None
        if first[0] == "error" and len(first) == 3:
            self.close()
            raise OSError(int(first[1]) or None, first[2].strip())
        if first[0] != "started" or len(first) != 2:
            self.close()
            raise OSError(None, f"the guard process ended without starting it (exit code "
                                f"{self.guard.returncode})")
        self.pid = int(first[1])
        threading.Thread(target=self._watch, daemon=True, name=f"electfsm-child[{self.pid}]"
                         ).start()

    def _readline(self) -> str:
        """The guard's next line; "" once it has closed its end."""
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(4096)
            if not chunk:
                return ""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def _watch(self) -> None:
        """Wait for the guard's ``exited`` line (or for the guard to vanish)."""
        try:
            line = self._readline().split()
        except OSError:
            line = []
        if len(line) == 2 and line[0] == "exited":
            self.returncode = int(line[1])
        elif self._closing:  # closed before the command exited: the guard ends the group
            self.returncode = -signal.SIGKILL
        else:  # only when the guard was killed: the command is unguarded, end it now
            log.error("the guard process %d of the command is gone; killing the command's "
                      "process group %d", self.guard.pid, self.pid)
            self.signal_group(signal.SIGKILL)
            self.guard_lost = True
        self.exited.set()

    def signal_group(self, sig: int) -> bool:
        """Signal every process of the group; False when none is left."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed its uid; the rest got it
            return True
        return True

    def group_alive(self) -> bool:
        """Is any process of the group still running (zombies do not count)?"""
        return self.signal_group(0) and running_in_group(self.pid)

    def stop(self, grace: float) -> None:
        """SIGTERM the group; SIGKILL it after ``grace`` seconds unless everyone is gone."""
        deadline = time.monotonic() + grace
        log.info("sending SIGTERM to the command (process group %d)", self.pid)
        self.signal_group(signal.SIGTERM)
        self.exited.wait(grace)
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # what is left of the group: children of the command
        if not self.exited.is_set() or self.group_alive():
            log.warning("the command (process group %d) did not exit within %gs of SIGTERM; "
                        "sending SIGKILL", self.pid, grace)
            self.signal_group(signal.SIGKILL)
        self.exited.wait()

    def stragglers(self, grace: float) -> None:
        """After the command exited on its own: end what it left behind in its group."""
        if self.group_alive():
            log.info("the command exited; stopping what it left in process group %d", self.pid)
            self.stop(grace)

    def close(self, timeout: float = 10.0) -> None:
        """Let the guard go (it ends whatever is left of the group) and reap it."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the guard sees EOF; our reader wakes
        self._sock.close()
        try:
            self.guard.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the guard process %d did not exit; killing it", self.guard.pid)
            self.guard.kill()
            self.guard.wait()


__all__ = ["GUARD", "Child"]
