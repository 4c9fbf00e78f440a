"""Running the ``electfsm`` command as a real process in tests."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any ELECTFSM_/ETCDCTL_ setting of the developer's shell."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ELECTFSM_", "ETCDCTL_"))}
    return {**env, "ETCDCTL_API": "3", **extra}


class Proc:
    """A process whose stdout lines arrive on a queue and whose stderr is collected."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=clean_env() if env is None else env)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.stdout: list[str] = []
        self._err: list[str] = []
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout.append(line)
            self.lines.put((time.monotonic(), line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._err.append(raw.decode("utf-8", "replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "".join(self._err)

    def line(self, timeout: float = 10) -> tuple[float, str]:
        """The next stdout line and when it arrived; fails the test after ``timeout``."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"{self.argv[:4]}: no output line within {timeout}s; stdout so far:"
                        f" {self.stdout}; stderr:\n{self.stderr}")

    def silent_for(self, seconds: float) -> bool:
        try:
            got = self.lines.get(timeout=seconds)
        except queue.Empty:
            return True
        self.lines.put(got)
        return False

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def electfsm(*args: str) -> list[str]:
    return [sys.executable, "-m", "electfsm", *args]


def run(*args: str, timeout: float = 30,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(electfsm(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=clean_env() if env is None else env)
