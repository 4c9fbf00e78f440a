"""``electfsm campaign``: run for leader; run a command only while leader."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from electfsm import clock
from electfsm.cli.connection import (
    Connection,
    _exit_code_of,
    _refused,
    _Signals,
    _stdout,
    _write,
    build_connection,
)
from electfsm.cli.parser import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from electfsm.cli.supervisor import Child
from electfsm.errors import (
    ConfigError,
    EtcdUnavailable,
)

if TYPE_CHECKING:
    from electfsm.elector import Elector
    from electfsm.health import StatusServer
    from electfsm.term import Term

log = logging.getLogger("electfsm.cli")


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
