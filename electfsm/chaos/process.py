"""The lab's side of a candidate: starting, signalling, freezing and reading one
(:class:`CandidateProcess`), and what libfaketime can do here."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from electfsm import clock
from electfsm.chaos.protocol import (
    PASSWORD_ENV,
    SIG_CLOCK_FAST,
    SIG_CLOCK_SLOW,
    SIG_CLOCK_TRUE,
    SIG_HOOK_EXIT,
    SIG_PAUSE_BEFORE_WRITE,
    SIG_PAUSE_IN_TXN,
    SIG_SLOW_HOOK,
    SIG_STALE_CONTROL,
    EventLog,
    event_time,
)

# --------------------------------------------------------------------------- harness side


class CandidateProcess:
    """Starts ``python -m electfsm.chaos.candidate`` and injects process faults into it.

    ``log_path`` receives the candidate's events. With ``faketime`` (a ``faketime -f`` spec
    such as ``"+5m"`` or ``"+0 x0.8"``, needs Debian's ``faketime``) the candidate logs to
    stdout and a reader thread here adds ``recv_mono`` (and ``clock_rate``) to each line,
    because a faked process's monotonic clock is not comparable with the others'. Only the
    wall clock is faked unless ``fake_monotonic`` (see :func:`faketime_problem`: Python's
    timed waits may not work then).
    ``harness_log`` (an :class:`~electfsm.chaos.protocol.EventLog`) records kills, pauses and
    resumes with the time they were done.
    """

    def __init__(self, *, identity: str, endpoints: Sequence[str], election: str,
                 log_path: str | os.PathLike[str], ttl: int = 2, margin: float | None = None,
                 call_timeout: float = 0.5, backoff_max: float = 0.5,
                 fenced: str | None = None, guarded_set: str | None = None,
                 work_interval: float = 0.1, monitor_interval: float = 0.02,
                 stall: float | None = None, stall_mode: str = "gil",
                 stall_on_enter: float = 0.0, clock_rate: float = 1.0,
                 mutation: str | None = None, faketime: str | None = None,
                 fake_monotonic: bool = False,
                 user: str | None = None, password: str | None = None,
                 harness_log: EventLog | None = None,
                 stderr_path: str | os.PathLike[str] | None = None) -> None:
        self.identity = identity
        self.endpoints = list(endpoints)
        self.election = election
        self.log_path = str(log_path)
        self.faketime = faketime
        self.harness_log = harness_log
        self.stderr_path = str(stderr_path) if stderr_path else self.log_path + ".stderr"
        self.ttl = ttl
        args = ["--endpoints", ",".join(self.endpoints), "--election", election,
                "--identity", identity, "--ttl", str(ttl), "--call-timeout", str(call_timeout),
                "--backoff-max", str(backoff_max), "--work-interval", str(work_interval),
                "--monitor-interval", str(monitor_interval), "--stall-mode", stall_mode,
                "--stall-on-enter", str(stall_on_enter),
                "--log", "-" if faketime else self.log_path,
                "--harness-pid", str(os.getpid())]
        if margin is not None:
            args += ["--margin", str(margin)]
        if fenced:
            args += ["--fenced", fenced]
        if guarded_set:
            args += ["--guarded-set", guarded_set]
        if stall is not None:
            args += ["--stall", str(stall)]
        if user:
            args += ["--user", user]
        if clock_rate != 1.0:
            args += ["--clock-rate", str(clock_rate)]
        if mutation is not None:
            args += ["--break", mutation]
        self.mutation = mutation
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if faketime and not fake_monotonic:
            self._env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        if password is not None:
            self._env[PASSWORD_ENV] = password
        cmd = [sys.executable, "-m", "electfsm.chaos.candidate", *args]
        if faketime:
            tool = shutil.which("faketime")
            if tool is None:
                raise RuntimeError("faketime is not installed (Debian: apt-get install faketime)")
            cmd = [tool, "-m", "-f", faketime, *cmd]
        self.cmd = cmd
        self.clock_rate = _clock_rate(faketime)
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.killed_at: float | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._cache: list[dict[str, Any]] = []
        self._offset = 0
        self._cache_lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> CandidateProcess:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.faketime else subprocess.DEVNULL,
                stderr=err, env=self._env, start_new_session=True, close_fds=True)
        self._finalizer = weakref.finalize(self, _reap, self.proc)
        if self.faketime:
            self._reader = threading.Thread(target=self._stamp, daemon=True,
                                            name=f"candidate-reader-{self.identity}")
            self._reader.start()
        return self

    def _stamp(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", buffering=1, encoding="utf-8") as out:
            for raw in self.proc.stdout:
                now = clock.now()
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                record["recv_mono"] = now
                record["clock_rate"] = self.clock_rate
                out.write(json.dumps(record) + "\n")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def inc(self) -> str:
        return f"{self.identity}#{self.pid}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _note(self, kind: str, **fields: Any) -> None:
        if self.harness_log is not None:
            self.harness_log.write(kind, inc=self.inc, identity=self.identity, **fields)

    def send(self, sig: int) -> None:
        """Signal the candidate's process group (``faketime`` runs it as a child)."""
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL; the candidate's lease is left to expire on the server."""
        if not self.alive:
            return
        assert self.proc is not None
        self.killed_at = clock.now()
        self._note("killed")
        self.send(signal.SIGKILL)
        self.proc.wait()
        self._join_reader()

    def pause(self) -> None:
        self._note("paused")
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)
        self._note("resumed")

    def resign(self) -> None:
        """SIGUSR1: resign, then a guarded proclaim with the latest term (see ``control``)."""
        self.send(signal.SIGUSR1)

    def stall(self) -> None:
        """SIGUSR2: the next work iteration of the current term stalls (ignored, and logged
        as ``stall_ignored``, when the candidate does not lead)."""
        self.send(signal.SIGUSR2)

    def pause_before_write(self) -> None:
        """The leader's next fenced write stalls ``stall`` seconds after its validity check,
        before it is sent (a stop-the-world GC pause after the lease check)."""
        self.send(SIG_PAUSE_BEFORE_WRITE)

    def pause_in_txn(self) -> None:
        """The leader's next guarded append stalls inside ``fenced_txn``, after its validity
        check, before the transaction is sent: only etcd's fence can refuse it then."""
        self.send(SIG_PAUSE_IN_TXN)

    def stale_control(self) -> None:
        """A guarded resign and proclaim with the candidate's last term, sent now (ignored,
        and logged, while that term still leads)."""
        self.send(SIG_STALE_CONTROL)

    def skew_clock(self, how: str) -> None:
        """The elector's clock runs ``slow`` (SLOW_RATE), ``fast`` (FAST_RATE) or ``true``
        from now on."""
        self.send({"slow": SIG_CLOCK_SLOW, "fast": SIG_CLOCK_FAST,
                   "true": SIG_CLOCK_TRUE}[how])

    def slow_hook(self) -> None:
        """The next hook sleeps ``stall`` seconds: the dispatcher is busy, the others run."""
        self.send(SIG_SLOW_HOOK)

    def hook_exit(self) -> None:
        """The next hook raises SystemExit."""
        self.send(SIG_HOOK_EXIT)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGCONT + SIGTERM, wait for a clean stop (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return None
        if self.alive:
            self.send(signal.SIGCONT)
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._note("killed", why="did not stop after SIGTERM")
                self.send(signal.SIGKILL)
                self.proc.wait()
        self._join_reader()
        return self.proc.returncode

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(2.0)

    # ------------------------------------------------------------------ the log
    def events(self) -> list[dict[str, Any]]:
        """Every complete event logged so far (read incrementally)."""
        with self._cache_lock:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return list(self._cache)
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                with contextlib.suppress(ValueError):
                    self._cache.append(json.loads(line))
            self._offset += end
            return list(self._cache)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                 *, after: float | None = None) -> dict[str, Any] | None:
        """The first logged event (at ``mono`` >= ``after``) for which ``predicate`` holds,
        polling the log until ``timeout``; None if none came."""
        deadline = clock.now() + timeout
        while True:
            for ev in self.events():
                if (after is None or event_time(ev) >= after) and predicate(ev):
                    return ev
            if clock.now() >= deadline:
                return None
            time.sleep(0.02)

    def wait_state(self, *states: str, timeout: float, after: float | None = None
                   ) -> dict[str, Any] | None:
        """Wait until the candidate logs a transition into one of ``states``."""
        return self.wait_for(lambda ev: ev["kind"] == "transition" and ev["dest"] in states,
                             timeout, after=after)

    @property
    def state(self) -> str:
        """The destination of the last logged transition (``disconnected`` before any)."""
        state = "disconnected"
        for ev in self.events():
            if ev["kind"] == "transition":
                state = ev["dest"]
        return state

    def current_term(self) -> dict[str, Any] | None:
        """The last ``enter_leader`` event if the candidate leads now (by its log)."""
        term: dict[str, Any] | None = None
        for ev in self.events():
            if ev["kind"] == "enter_leader":
                term = ev
            elif ev["kind"] == "exit_leader":
                term = None
        return term

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc is not None else None
        return f"<CandidateProcess {self.identity} pid={pid} alive={self.alive}>"


@functools.cache
def faketime_problem(spec: str, *, fake_monotonic: bool) -> str | None:
    """Why a Python candidate cannot run under ``faketime -f spec`` here, or None if it can.

    Probed for real: a child Python under faketime must finish a 0.2 s
    ``threading.Event().wait`` (what every electfsm thread uses) within 3 s. libfaketime
    0.9.10 fakes ``CLOCK_MONOTONIC`` but does not intercept ``sem_clockwait``, which
    CPython 3.11 uses for timed waits, so with a faked monotonic clock those waits never
    return.
    """
    tool = shutil.which("faketime")
    if tool is None:
        return "Debian's faketime is not installed (apt-get install faketime)"
    env = {**os.environ}
    if not fake_monotonic:
        env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    code = "import threading; threading.Event().wait(0.2); print('ok')"
    # its own process group: faketime runs Python as a child, and a hung child must die too
    proc = subprocess.Popen([tool, "-m", "-f", spec, sys.executable, "-c", code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1.5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return (f"under faketime -f {spec!r} with a faked monotonic clock, a Python "
                "threading.Event().wait(0.2) never returns (libfaketime does not intercept "
                "sem_clockwait, which CPython uses for timed waits), so no electfsm thread "
                "could run")
    if stdout.strip() != "ok":
        return f"a Python under faketime -f {spec!r} failed: {stderr.strip()[-300:]}"
    return None


def _clock_rate(spec: str | None) -> float:
    if not spec:
        return 1.0
    m = re.search(r"x\s*([0-9.]+)", spec)
    return float(m.group(1)) if m else 1.0


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(5)
