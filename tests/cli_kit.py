"""Running the ``electfsm`` command as a real process in tests."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from electfsm.etcd import EtcdClient, prefix_end
from electfsm.sources.campaign import is_candidate_key


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


def candidates(endpoint: str, election: str) -> list[Any]:
    """The candidate keys of ``election`` in queue order, read directly from etcd."""
    client = EtcdClient([endpoint], timeout=5)
    try:
        prefix = (election + "/").encode()
        kvs = client.range(prefix, prefix_end(prefix)).kvs
    finally:
        client.close()
    return sorted((kv for kv in kvs if is_candidate_key(prefix, bytes(kv.key))),
                  key=lambda kv: kv.create_revision)


def wait_candidates(endpoint: str, election: str, count: int, timeout: float = 10) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        kvs = candidates(endpoint, election)
        if len(kvs) == count:
            return kvs
        if time.monotonic() > deadline:
            pytest.fail(f"expected {count} candidates in {election}, found {len(kvs)}")
        time.sleep(0.05)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_log(path: Path, pred: Callable[[dict[str, Any]], bool],
             timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for entry in read_log(path):
            if pred(entry):
                return entry
        if time.monotonic() > deadline:
            pytest.fail(f"no matching line in {path} within {timeout}s: {read_log(path)[-5:]}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Running, and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def running_with(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(name))
    return found
