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

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from electfsm.cli.campaign import cmd_campaign
from electfsm.cli.commands import (
    cmd_demo,
    cmd_diagram,
    cmd_etcd,
    cmd_leader,
    cmd_observe,
    cmd_status,
)
from electfsm.cli.connection import configure_logging
from electfsm.cli.parser import EXIT_ERROR, EXIT_USAGE, CliError, build_parser
from electfsm.errors import (
    ConfigError,
    ElectfsmError,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger("electfsm.cli")


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


__all__ = ["entry", "main"]
