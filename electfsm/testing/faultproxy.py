"""A TCP proxy on loopback that injects network faults between a client and a server, for tests.

::

    from electfsm.testing.faultproxy import FaultProxy

    with FaultProxy(etcd.endpoint) as proxy:         # listens on 127.0.0.1:<free port>
        client = EtcdClient([proxy.endpoint])        # talk to etcd through the proxy
        proxy.latency(0.2, jitter=0.05)              # each chunk waits 0.15-0.25 s, both ways
        proxy.blackhole()                            # bytes are read and thrown away, both ways
        proxy.drop_responses()                       # requests reach etcd, answers are lost
        proxy.pass_through()                         # back to normal
        proxy.reset()                                # RST every open connection
        proxy.refuse()                               # new connects are refused ...
        proxy.accept_again()                         # ... until the port listens again
        print(proxy.stats())                         # connections and bytes each way

Modes (:meth:`pass_through`, :meth:`latency`, :meth:`blackhole`, :meth:`drop_responses`) are
switched at run time from any thread and apply at once to open connections and new ones alike.
:meth:`reset` and :meth:`refuse` are actions that leave the mode as it was.

Threads: one accepts connections, one more per connection moves bytes both ways with
``select`` on non-blocking sockets; all are daemon threads that the proxy owns and
:meth:`stop` joins, so it returns within about a second. Only 127.0.0.1 is used: the proxy
listens there and its upstream must be a loopback ``host:port``.

Half-closes are passed on: when one side shuts its sending half, the other side sees it once
the bytes before it were delivered; while that direction drops bytes (blackhole, or answers under
drop_responses), the shutdown is held back too, as a partition would. A reset (RST) from either
side, or a failed connect to the upstream, closes both sides with RST.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import random
import select
import socket
import struct
import threading
from types import TracebackType

import attrs

from electfsm import clock

__all__ = ["FaultProxy", "ProxyStats"]

_HOST = "127.0.0.1"
_TICK = 0.05  # longest select wait: how fast threads notice a mode change, reset or stop
_CHUNK = 65536
_MAX_BUFFER = 1 << 20  # bytes held per direction before the proxy stops reading that side
_CONNECT_TIMEOUT = 2.0
_JOIN_TIMEOUT = 1.0


@attrs.frozen
class ProxyStats:
    """Counters since :meth:`~electfsm.testing.FaultProxy.start` (snapshot)."""

    #: connections accepted in all
    connections: int
    #: connections open right now
    open_connections: int
    #: bytes forwarded client -> server
    bytes_to_upstream: int
    #: bytes forwarded server -> client
    bytes_to_client: int
    #: bytes read and thrown away (blackhole, drop_responses)
    bytes_dropped: int


@attrs.frozen
class _Mode:
    name: str  # "pass", "latency", "blackhole", "drop_responses"
    delay: float = 0.0
    jitter: float = 0.0

    def drops(self, to_upstream: bool) -> bool:
        return self.name == "blackhole" or (self.name == "drop_responses" and not to_upstream)

    def due(self, now: float) -> float:
        if self.name != "latency":
            return now
        return now + max(0.0, self.delay + random.uniform(-self.jitter, self.jitter))


_PASS = _Mode("pass")


def _parse_upstream(upstream: str) -> tuple[str, int]:
    host, sep, port = upstream.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"upstream must be 'host:port', not {upstream!r}")
    host = host.strip("[]")
    if host == "localhost":
        host = _HOST
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or ":" in host:
        raise ValueError(f"upstream {upstream!r} is not an IPv4 loopback address "
                         "(127.0.0.0/8 or localhost): the fault proxy only targets loopback")
    return host, int(port)


def _rst_close(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Direction:
    """Bytes on their way from ``src`` to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, to_upstream: bool) -> None:
        self.src = src
        self.dst = dst
        self.to_upstream = to_upstream
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.pending_bytes = 0
        self.out = bytearray()  # due, being written to dst
        self.eof = False  # src shut its sending half
        self.shut = False  # ... and we passed that on to dst

    def buffered(self) -> int:
        return self.pending_bytes + len(self.out)

    def drop_all(self) -> int:
        dropped = self.buffered()
        self.pending.clear()
        self.pending_bytes = 0
        self.out.clear()
        return dropped

    def release_due(self, now: float, all_now: bool) -> None:
        while self.pending and (all_now or self.pending[0][0] <= now):
            _, data = self.pending.popleft()
            self.pending_bytes -= len(data)
            self.out += data

    def next_due(self) -> float | None:
        return self.pending[0][0] if self.pending else None


class _Connection:
    """One accepted client and its upstream socket, served by one thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, number: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self._reset = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"faultproxy-{proxy.port}-conn-{number}")

    def request_reset(self) -> None:
        self._reset.set()

    # ------------------------------------------------------------------ thread
    def _run(self) -> None:
        rst = True
        try:
            upstream = self._connect()
            if upstream is not None:
                self.upstream = upstream
                rst = self._pump(upstream)
        except OSError:
            rst = True
        finally:
            for sock in (self.client, self.upstream):
                if sock is not None:
                    if rst:
                        _rst_close(sock)
                    else:
                        sock.close()
            self.proxy._forget(self)

    def _should_end(self) -> bool:
        return self._reset.is_set() or self.proxy._stopping.is_set()

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            code = sock.connect_ex(self.proxy._upstream)
            if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                raise OSError(code, "connect to upstream failed")
            deadline = clock.now() + _CONNECT_TIMEOUT
            while code != 0:
                if self._should_end() or clock.now() > deadline:
                    raise OSError(errno.ETIMEDOUT, "connect to upstream timed out")
                _, writable, _ = select.select([], [sock], [], _TICK)
                if writable:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code != 0:
                        raise OSError(code, "connect to upstream failed")
                    break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError:
            sock.close()
            return None

    def _pump(self, upstream: socket.socket) -> bool:
        """Move bytes until both sides closed (``False``), or a reset/error (``True``: RST)."""
        client, proxy = self.client, self.proxy
        dirs = (_Direction(client, upstream, True), _Direction(upstream, client, False))
        while True:
            if self._reset.is_set():
                return True
            if proxy._stopping.is_set():
                return False
            mode = proxy._mode
            now = clock.now()
            for d in dirs:
                if mode.drops(d.to_upstream):
                    proxy._count(dropped=d.drop_all())
                else:
                    d.release_due(now, all_now=mode.name != "latency")
                    if d.eof and not d.shut and not d.buffered():
                        with contextlib.suppress(OSError):
                            d.dst.shutdown(socket.SHUT_WR)
                        d.shut = True
            if all(d.shut for d in dirs):
                return False
            readable = [d.src for d in dirs if not d.eof and d.buffered() < _MAX_BUFFER]
            writable = [d.dst for d in dirs if d.out]
            wait = _TICK
            for d in dirs:
                due = d.next_due()
                if due is not None:
                    wait = min(wait, max(0.0, due - now))
            r, w, _ = select.select(readable, writable, [], wait)
            for d in dirs:
                if d.src in r and not self._receive(d):
                    return True
                if d.dst in w and d.out and not self._send(d):
                    return True

    def _receive(self, d: _Direction) -> bool:
        try:
            data = d.src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False  # reset by the peer: pass an RST on to the other side
        mode = self.proxy._mode  # now, not when select started: it may have changed since
        if not data:
            d.eof = True
        elif mode.drops(d.to_upstream):
            self.proxy._count(dropped=len(data))
        else:
            due = mode.due(clock.now())
            if d.pending:
                due = max(due, d.pending[-1][0])  # a stream: never reorder
            d.pending.append((due, data))
            d.pending_bytes += len(data)
        return True

    def _send(self, d: _Direction) -> bool:
        if self.proxy._mode.drops(d.to_upstream):
            return True
        try:
            sent = d.dst.send(d.out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del d.out[:sent]
        if d.to_upstream:
            self.proxy._count(up=sent)
        else:
            self.proxy._count(down=sent)
        return True


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 in front of ``upstream`` (``"127.0.0.1:<port>"``).

    ::

        proxy = FaultProxy("127.0.0.1:2379").start()
        try:
            client = EtcdClient([proxy.endpoint], timeout=0.5)
            proxy.blackhole()            # client calls now time out
            proxy.pass_through()         # and work again
        finally:
            proxy.stop()

    ``listen_port``: the port to listen on (default: a free one, chosen at :meth:`start` and
    kept for :meth:`accept_again` and later starts). All methods are thread-safe.
    """

    def __init__(self, upstream: str, listen_port: int | None = None) -> None:
        self.upstream = upstream
        self._upstream = _parse_upstream(upstream)
        self._port = listen_port
        self._lock = threading.Lock()  # mode, connections, counters
        self._control = threading.Lock()  # start/stop/refuse/accept_again/reset, one at a time
        self._mode = _PASS
        self._stopping = threading.Event()
        self._stopping.set()  # not started
        self._listener: socket.socket | None = None
        self._accept_stop = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._numbered = 0
        self._up = self._down = self._dropped = 0

    # ------------------------------------------------------------------ address
    @property
    def port(self) -> int:
        """The listening port (known once started, or when given)."""
        if self._port is None:
            raise RuntimeError("the fault proxy has no port before start()")
        return self._port

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:<port>"``: give this to clients instead of the upstream."""
        return f"{_HOST}:{self.port}"

    @property
    def mode(self) -> str:
        """``"pass"``, ``"latency"``, ``"blackhole"`` or ``"drop_responses"``."""
        return self._mode.name

    @property
    def running(self) -> bool:
        return not self._stopping.is_set()

    @property
    def accepting(self) -> bool:
        """Whether the port listens (``False`` after :meth:`refuse` or :meth:`stop`)."""
        return self._listener is not None

    def __repr__(self) -> str:
        where = f"{_HOST}:{self._port}" if self._port is not None else "unstarted"
        state = "running" if self.running else "stopped"
        return f"<FaultProxy {where} -> {self.upstream} {self.mode} {state}>"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FaultProxy:
        """Listen and start accepting. A no-op if it runs already."""
        with self._control:
            if self.running:
                return self
            with self._lock:
                self._up = self._down = self._dropped = self._numbered = 0
            self._stopping.clear()
            try:
                self._listen()
            except BaseException:
                self._stopping.set()
                raise
            return self

    def stop(self) -> None:
        """Close the listening socket and every connection, and join every thread (bounded:
        about a second at worst). Idempotent; :meth:`start` may be called again."""
        with self._control:
            self._stopping.set()
            self._stop_accepting()
            self._join_connections()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ modes
    def _set_mode(self, mode: _Mode) -> None:
        with self._lock:
            self._mode = mode

    def pass_through(self) -> None:
        """Forward everything both ways, at once (bytes held back by :meth:`latency` go now)."""
        self._set_mode(_PASS)

    def latency(self, seconds: float, jitter: float = 0.0) -> None:
        """Delay each chunk, both ways, by ``seconds`` plus a uniform ``±jitter`` (at least
        0); order is kept."""
        if seconds < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")
        self._set_mode(_Mode("latency", float(seconds), float(jitter)))

    def blackhole(self) -> None:
        """Accept connections and read their bytes, but forward and answer nothing, either way
        (bytes still held back are thrown away too)."""
        self._set_mode(_Mode("blackhole"))

    def drop_responses(self) -> None:
        """Forward client -> server, throw away server -> client: requests land, callers never
        hear back (a half-open link)."""
        self._set_mode(_Mode("drop_responses"))

    # ------------------------------------------------------------------ actions
    def reset(self) -> int:
        """Close every open connection with RST, on both sides; returns how many. The mode
        and the listening socket are unchanged, so clients may connect again at once."""
        with self._control:
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                conn.request_reset()
            deadline = clock.now() + _JOIN_TIMEOUT
            for conn in connections:
                conn.thread.join(max(0.0, deadline - clock.now()))
            return len(connections)

    def refuse(self) -> None:
        """Close the listening socket: new connects are refused (open connections go on)."""
        with self._control:
            self._stop_accepting()

    def accept_again(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        with self._control:
            if not self.running:
                raise RuntimeError(f"{self!r} is stopped; start() it")
            if self._listener is None:
                self._listen()

    # ------------------------------------------------------------------ counters
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(connections=self._numbered,
                              open_connections=len(self._connections),
                              bytes_to_upstream=self._up, bytes_to_client=self._down,
                              bytes_dropped=self._dropped)

    def _count(self, *, up: int = 0, down: int = 0, dropped: int = 0) -> None:
        if up or down or dropped:
            with self._lock:
                self._up += up
                self._down += down
                self._dropped += dropped

    # ------------------------------------------------------------------ internals
    def _listen(self) -> None:
        """Bind and start the accept thread (caller holds ``_control``)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((_HOST, self._port or 0))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = int(sock.getsockname()[1])
        self._listener = sock
        self._accept_stop = threading.Event()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(sock, self._accept_stop), daemon=True,
            name=f"faultproxy-{self._port}-accept")
        self._accept_thread.start()

    def _stop_accepting(self) -> None:
        """Join the accept thread and close the listener (caller holds ``_control``)."""
        thread, listener = self._accept_thread, self._listener
        self._accept_thread = self._listener = None
        self._accept_stop.set()
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        if listener is not None:
            listener.close()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], _TICK)
                if not ready:
                    continue
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return  # the listener was closed
            try:
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._numbered += 1
                conn = _Connection(self, client, self._numbered)
                self._connections.add(conn)
            conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _join_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        deadline = clock.now() + _JOIN_TIMEOUT
        for conn in connections:
            conn.thread.join(max(0.0, deadline - clock.now()))
