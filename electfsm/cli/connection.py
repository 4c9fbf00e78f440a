"""Reaching etcd from the command line (endpoints, TLS, users), logging, signals and output."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import attrs

from electfsm.cli.parser import (
    DEFAULT_ENDPOINT,
    ENDPOINT_ENV,
    EXIT_USAGE,
    NO_LEADER_TEXT,
    PASSWORD_ENV,
    CliError,
    _endpoints,
)
from electfsm.config import (
    ElectorConfig,
)
from electfsm.errors import (
    ConfigError,
    PermissionDenied,
)
from electfsm.etcd.security import TLS, Auth

if TYPE_CHECKING:
    from electfsm.etcd import EtcdClient
    from electfsm.events import LeaderInfo

log = logging.getLogger("electfsm.cli")


# ------------------------------------------------------------------------------ connection
@attrs.frozen(kw_only=True)
class Connection:
    """Where and how to reach etcd, built from the command line by :func:`build_connection`."""

    endpoints: tuple[str, ...]
    tls: TLS | None = None
    auth: Auth | None = None
    connect_timeout: float = 10.0
    call_timeout: float = 2.0

    def elector_kwargs(self) -> dict[str, Any]:
        return {"endpoints": list(self.endpoints), "tls": self.tls, "auth": self.auth,
                "call_timeout": self.call_timeout}

    def client(self) -> EtcdClient:
        from electfsm.etcd import EtcdClient

        return EtcdClient.connect(list(self.endpoints), tls=self.tls, auth=self.auth,
                                  timeout=self.call_timeout)


def build_connection(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None,
                     ask_password: Callable[[str], str] | None = None,
                     interactive: bool | None = None) -> Connection:
    """A :class:`Connection` from parsed ``--endpoints/--cacert/--cert/--key/--user`` options.

    Raises :class:`CliError` (exit 2) saying what to fix. ``environ``, ``ask_password`` and
    ``interactive`` default to ``os.environ``, :func:`getpass.getpass` and "stdin is a tty".
    """
    env = os.environ if environ is None else environ
    endpoints: list[str] | None = getattr(args, "endpoints", None)
    if endpoints is None:
        for name in ENDPOINT_ENV:
            if env.get(name, "").strip():
                try:
                    endpoints = _endpoints(env[name])
                except ConfigError as exc:
                    raise CliError(f"${name}: {exc}", EXIT_USAGE) from None
                break
        else:
            endpoints = [DEFAULT_ENDPOINT]
    tls = None
    cacert, cert, key = (getattr(args, n, None) for n in ("cacert", "cert", "key"))
    try:
        if cacert or cert or key:
            tls = TLS(ca=cacert, cert=cert, key=key)
        auth = _auth(getattr(args, "user", None), env, ask_password, interactive)
        # Validates the whole set once (schemes, TLS with http://, ...).
        ElectorConfig(endpoints=endpoints, election="x", identity="x", tls=tls, auth=auth)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return Connection(endpoints=tuple(endpoints), tls=tls, auth=auth,
                      connect_timeout=getattr(args, "connect_timeout", 10.0))


def _auth(user: str | None, env: Mapping[str, str],
          ask_password: Callable[[str], str] | None, interactive: bool | None) -> Auth | None:
    if user is None:
        return None
    if ":" in user:
        raise ConfigError("--user takes a user name only, not name:password (a password on the "
                          "command line shows in ps and shell history); put the password in "
                          f"${PASSWORD_ENV} instead")
    if not user:
        raise ConfigError("--user needs a user name")
    password = env.get(PASSWORD_ENV)
    if password is None:
        if interactive is None:
            interactive = sys.stdin is not None and sys.stdin.isatty()
        if not interactive:
            raise ConfigError(f"--user {user} needs a password: set ${PASSWORD_ENV} (stdin is "
                              "not a terminal, so it cannot be asked for)")
        ask = ask_password if ask_password is not None else getpass.getpass
        try:
            password = ask(f"Password for etcd user {user}: ")
        except (EOFError, KeyboardInterrupt):
            raise ConfigError("no password given") from None
    return Auth(user=user, password=password)


# ------------------------------------------------------------------------------ helpers
def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose,
                                                                                  logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("transitions").setLevel(max(level, logging.WARNING))


class _Signals:
    """SIGINT/SIGTERM/SIGHUP set :attr:`received` and call ``wake`` (once: later ones only
    say that we are stopping already; every wait while stopping is bounded)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, wake: Callable[[], None]) -> None:
        self.received: int | None = None
        self._wake = wake
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            os.write(2, b"electfsm: stopping already, please wait\n")
            return
        self.received = signum
        self._wake()


def _write(stream: IO[bytes], data: bytes) -> None:
    stream.write(data)
    stream.flush()


def _stdout() -> IO[bytes]:
    return sys.stdout.buffer


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _leader_json(leader: LeaderInfo | None, revision: int) -> str:
    return json.dumps({
        "identity": leader.identity if leader else None,
        "key": leader.key if leader else None,
        "create_revision": leader.create_revision if leader else None,
        "lease": leader.lease if leader else None,
        "revision": revision,
        "time": _now_iso(),
    })


def _leader_text(leader: LeaderInfo | None) -> bytes:
    if leader is None:
        return NO_LEADER_TEXT.encode() + b"\n"
    return leader.key.encode() + b"\n" + leader.value + b"\n"


def _refused(exc: BaseException) -> bool:
    """etcd refused us for good (permission or authentication), not a passing failure."""
    from electfsm.etcd import TokenExpired

    return isinstance(exc, PermissionDenied) and not isinstance(exc, TokenExpired)


def _exit_code_of(returncode: int) -> int:
    """A child's return code as a shell reports it (128+S for a death by signal S)."""
    return 128 - returncode if returncode < 0 else returncode
