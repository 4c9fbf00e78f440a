"""A fenced resource for tests: it accepts a write only if its token is not below the highest
token it has seen (the storage of etcd's ``contrib/lock``, and Kleppmann's fencing example).

::

    from electfsm.chaos.fenced import FencedClient, FencedResource

    with FencedResource(log_path="resource.jsonl") as resource:   # 127.0.0.1:<free port>
        client = FencedClient(resource.endpoint)
        assert client.write(token=7, identity="node-a", payload="x")       # accepted
        assert not client.write(token=5, identity="node-b", payload="y")   # stale: rejected
        print(resource.highest, len(resource.accepted), len(resource.rejected))

The protocol is one JSON object per line over TCP on loopback: the client sends
``{"token": int, "identity": str, "payload": ...}``, the server answers
``{"ok": bool, "highest": int}``. Every request is recorded (in memory, and as JSON lines in
``log_path`` when given) with the server's monotonic and wall time, so a checker can verify
afterwards that no stale write was accepted (property P2). ``fenced=False`` makes an
unfenced resource that accepts everything but still records it, to measure overlap.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from types import TracebackType
from typing import Any

import attrs

from electfsm import clock

__all__ = ["FencedClient", "FencedResource", "Write"]

_HOST = "127.0.0.1"
_MAX_LINE = 1 << 16


@attrs.frozen(kw_only=True)
class Write:
    """One write the resource received, and what it answered."""

    mono: float
    wall: float
    token: int
    identity: str
    payload: Any
    accepted: bool
    #: the highest accepted token before this write
    highest_before: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": "resource_write", **attrs.asdict(self)}


class FencedResource:
    """A line-based TCP server on 127.0.0.1 that rejects tokens below the highest seen.

    One thread accepts, one per connection serves; :meth:`stop` closes everything and joins
    the threads. Thread-safe views: :attr:`writes`, :attr:`accepted`, :attr:`rejected`,
    :attr:`highest`.
    """

    def __init__(self, *, log_path: str | None = None, fenced: bool = True) -> None:
        self.fenced = fenced
        self.log_path = log_path
        self._lock = threading.Lock()
        self._writes: list[Write] = []
        self._highest = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._log: Any = None
        self._port: int | None = None

    # ------------------------------------------------------------------ views
    @property
    def endpoint(self) -> str:
        if self._port is None:
            raise RuntimeError("the fenced resource has no port before start()")
        return f"{_HOST}:{self._port}"

    @property
    def highest(self) -> int:
        with self._lock:
            return self._highest

    @property
    def writes(self) -> list[Write]:
        with self._lock:
            return list(self._writes)

    @property
    def accepted(self) -> list[Write]:
        return [w for w in self.writes if w.accepted]

    @property
    def rejected(self) -> list[Write]:
        return [w for w in self.writes if not w.accepted]

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FencedResource:
        if self._listener is not None:
            return self
        if self.log_path is not None:
            self._log = open(self.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        sock = socket.create_server((_HOST, 0))
        sock.settimeout(0.05)
        self._listener = sock
        self._port = int(sock.getsockname()[1])
        self._stop.clear()
        thread = threading.Thread(target=self._accept_loop, daemon=True,
                                  name=f"fenced-{self._port}-accept")
        self._threads.append(thread)
        thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(2.0)
        self._threads = []
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> FencedResource:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ serving
    def submit(self, token: int, identity: str, payload: Any) -> tuple[bool, int]:
        """Apply one write (what a request over TCP does); returns (accepted, highest)."""
        with self._lock:
            before = self._highest
            ok = token >= before or not self.fenced
            if ok and token > self._highest:
                self._highest = token
            write = Write(mono=clock.now(), wall=time.time(), token=token,
                          identity=identity, payload=payload, accepted=ok,
                          highest_before=before)
            self._writes.append(write)
            if self._log is not None:
                self._log.write(json.dumps(write.to_json()) + "\n")
            return ok, self._highest

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"fenced-{self._port}-conn")
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        try:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    conn.sendall(self._answer(line))
                if len(buf) > _MAX_LINE:
                    return
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _answer(self, line: bytes) -> bytes:
        try:
            req = json.loads(line)
            token, identity = int(req["token"]), str(req["identity"])
        except (ValueError, KeyError, TypeError) as exc:
            return json.dumps({"ok": False, "error": f"bad request: {exc}"}).encode() + b"\n"
        ok, highest = self.submit(token, identity, req.get("payload"))
        return json.dumps({"ok": ok, "highest": highest}).encode() + b"\n"


class FencedClient:
    """A client of :class:`FencedResource`: one connection, reopened after any error.

    :meth:`write` returns True (accepted) or False (rejected as stale); it raises
    :class:`OSError` when the resource cannot be reached or does not answer in ``timeout``
    (then the write may or may not have been applied).
    """

    def __init__(self, endpoint: str, *, timeout: float = 1.0) -> None:
        host, _, port = endpoint.rpartition(":")
        self._address = (host, int(port))
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def write(self, *, token: int, identity: str, payload: Any = None) -> bool:
        line = json.dumps({"token": token, "identity": identity, "payload": payload})
        try:
            if self._sock is None:
                self._sock = socket.create_connection(self._address, timeout=self.timeout)
                self._buf = b""
            self._sock.settimeout(self.timeout)
            self._sock.sendall(line.encode() + b"\n")
            while b"\n" not in self._buf:
                data = self._sock.recv(4096)
                if not data:
                    raise ConnectionError("the fenced resource closed the connection")
                self._buf += data
            answer, self._buf = self._buf.split(b"\n", 1)
            return bool(json.loads(answer).get("ok"))
        except OSError:
            self.close()
            raise
        except ValueError as exc:
            self.close()
            raise ConnectionError(f"the fenced resource answered garbage: {exc}") from None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
