"""``electfsm leader``, ``status``, ``observe``, ``diagram``, ``demo`` and ``etcd``."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from electfsm import clock
from electfsm.cli.connection import (
    Connection,
    _leader_json,
    _leader_text,
    _refused,
    _Signals,
    _stdout,
    _write,
    build_connection,
)
from electfsm.cli.parser import EXIT_ERROR, EXIT_NO_LEADER, EXIT_OK, EXIT_UNREACHABLE, CliError
from electfsm.errors import (
    EtcdError,
    EtcdUnavailable,
)

if TYPE_CHECKING:
    from electfsm.etcd import EtcdClient

log = logging.getLogger("electfsm.cli")


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
    from electfsm.etcd import prefix_end
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
    printed: object = stop  # the leader printed last (none yet)
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
                    if event.leader == printed:
                        continue  # a report with the same leader (another candidate left)
                    printed = event.leader
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
    from electfsm.testing.etcd_binaries import EtcdNotFound
    from electfsm.testing.local_etcd import LocalEtcd

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
