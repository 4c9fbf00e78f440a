"""electfsm.testing.FaultProxy: real TCP on loopback, against a real etcd and an echo server."""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scenario_kit import eventually, slack

from electfsm.errors import EtcdError, EtcdUnavailable
from electfsm.etcd import EtcdClient
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.local_etcd import LocalEtcd

# ---------------------------------------------------------------- fixtures


class EchoServer:
    """A TCP echo server on 127.0.0.1: one thread accepts, one per connection echoes.
    Closes its side once the peer closed its sending half. Owned by the ``echo`` fixture."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._accept_loop, name="echo-accept",
                                        daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._echo, args=(conn,), name="echo-conn",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._accept.join(2)
        self._listener.close()
        for t in self._threads:
            t.join(2)
        assert not self._accept.is_alive() and not any(t.is_alive() for t in self._threads)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def make_proxy() -> Iterator[Callable[[str], FaultProxy]]:
    made: list[FaultProxy] = []

    def make(upstream: str) -> FaultProxy:
        proxy = FaultProxy(upstream).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
        assert not proxy_threads(proxy), "stop() joins every thread"


@pytest.fixture
def clients() -> Iterator[Callable[..., EtcdClient]]:
    made: list[EtcdClient] = []

    def make(endpoint: str, **kw: Any) -> EtcdClient:
        client = EtcdClient([endpoint], **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def proxy_threads(proxy: FaultProxy) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"faultproxy-{proxy.port}-")]


def connect(proxy: FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    sock.settimeout(2)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``predicate`` (the proxy's threads update counters after the bytes moved) for
    ``timeout`` seconds times the tests' slack factor."""
    deadline = time.monotonic() + slack(timeout)
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def key() -> bytes:
    return f"faultproxy/{uuid.uuid4().hex}".encode()


# ---------------------------------------------------------------- raw TCP


def test_pass_through_echoes_and_counts_bytes_and_connections(
        echo: EchoServer, make_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_proxy(echo.endpoint)
    assert proxy.endpoint == f"127.0.0.1:{proxy.port}" and proxy.mode == "pass"
    with connect(proxy) as a, connect(proxy) as b:
        a.sendall(b"x" * 1000)
        b.sendall(b"hello")
        assert recv_exactly(a, 1000) == b"x" * 1000
        assert recv_exactly(b, 5) == b"hello"
        assert until(lambda: proxy.stats().bytes_to_client == 1005)
        stats = proxy.stats()
        assert stats.connections == 2 and stats.open_connections == 2
        assert stats.bytes_to_upstream == stats.bytes_to_client == 1005
        assert stats.bytes_dropped == 0


def test_a_half_close_is_passed_on(echo: EchoServer,
                                   make_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_proxy(echo.endpoint)
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 10) == b"last words"
        assert sock.recv(10) == b"", "the echo server's FIN came back through the proxy"
    assert until(lambda: proxy.stats().open_connections == 0)


def test_blackhole_reads_but_never_forwards_and_pass_through_resumes(
        echo: EchoServer, make_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_proxy(echo.endpoint)
    with connect(proxy) as sock:
        proxy.blackhole()
        assert proxy.mode == "blackhole"
        sock.sendall(b"lost")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert until(lambda: proxy.stats().bytes_dropped == 4)
        assert proxy.stats().bytes_to_upstream == 0
        with connect(proxy) as fresh:  # new connections are accepted, and ignored too
            fresh.sendall(b"also lost")
            fresh.settimeout(0.2)
            with pytest.raises(TimeoutError):
                fresh.recv(10)
        proxy.pass_through()
        sock.settimeout(2)
        sock.sendall(b"back")
        assert recv_exactly(sock, 4) == b"back"


def test_latency_delays_each_direction(echo: EchoServer,
                                       make_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_proxy(echo.endpoint)
    with connect(proxy) as sock:
        proxy.latency(0.15)
        started = time.monotonic()
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - started >= 0.29, "0.15 s out and 0.15 s back"
        proxy.latency(0.1, jitter=0.05)
        sock.sendall(b"a")
        sock.sendall(b"b")
        assert recv_exactly(sock, 2) == b"ab", "jitter never reorders a stream"
        proxy.pass_through()
        started = time.monotonic()
        sock.sendall(b"fast")
        assert recv_exactly(sock, 4) == b"fast"
        assert time.monotonic() - started < slack(0.1)


def test_reset_sends_rst_to_every_open_connection_and_keeps_the_mode(
        echo: EchoServer, make_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_proxy(echo.endpoint)
    proxy.latency(0.01)
    with connect(proxy) as a, connect(proxy) as b:
        for sock in (a, b):
            sock.sendall(b"1")
            assert recv_exactly(sock, 1) == b"1"
        assert proxy.reset() == 2
        for sock in (a, b):
            with pytest.raises(ConnectionResetError):
                sock.recv(10)
    assert proxy.mode == "latency" and proxy.stats().open_connections == 0
    with connect(proxy) as sock:  # still accepting
        sock.sendall(b"2")
        assert recv_exactly(sock, 1) == b"2"


def test_refuse_closes_the_port_and_accept_again_reopens_it(
        echo: EchoServer, make_proxy: Callable[[str], FaultProxy]) -> None:
    proxy = make_proxy(echo.endpoint)
    port = proxy.port
    with connect(proxy) as open_before:
        proxy.refuse()
        assert not proxy.accepting
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        open_before.sendall(b"still")  # connections made before go on
        assert recv_exactly(open_before, 5) == b"still"
        proxy.accept_again()
        assert proxy.port == port and proxy.accepting
        with connect(proxy) as sock:
            sock.sendall(b"again")
            assert recv_exactly(sock, 5) == b"again"


def test_stop_closes_everything_within_a_second(echo: EchoServer) -> None:
    proxy = FaultProxy(echo.endpoint).start()
    socks = [connect(proxy) for _ in range(3)]
    try:
        proxy.blackhole()
        for sock in socks:
            sock.sendall(b"pending")
        assert until(lambda: proxy.stats().bytes_dropped == 3 * len(b"pending"))
        assert len(proxy_threads(proxy)) == 4  # accept + one per connection
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < slack(1.0)
        assert not proxy_threads(proxy)
        assert not proxy.running and not proxy.accepting
        for sock in socks:
            ready, _, _ = select.select([sock], [], [], 1)
            assert ready, "the client side sees the close"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        proxy.stop()  # idempotent
    finally:
        for sock in socks:
            sock.close()
        proxy.stop()


def test_an_unreachable_upstream_resets_the_client(
        make_proxy: Callable[[str], FaultProxy]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bound:
        bound.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        proxy = make_proxy(f"127.0.0.1:{bound.getsockname()[1]}")
        # an RST, not a clean close; it can come before connect() has returned
        with pytest.raises(ConnectionResetError), connect(proxy) as sock:
            sock.recv(10)


def test_only_loopback_upstreams_are_accepted() -> None:
    for bad in ("example.invalid:2379", "2379", "[::1]:2379"):
        with pytest.raises(ValueError):
            FaultProxy(bad)
    assert FaultProxy("localhost:2379").upstream == "localhost:2379"
    with pytest.raises(RuntimeError, match="before start"):
        _ = FaultProxy("127.0.0.1:2379").endpoint
    assert FaultProxy("127.0.0.1:2379", listen_port=4000).endpoint == "127.0.0.1:4000"


# ---------------------------------------------------------------- etcd through the proxy


def test_etcd_client_works_through_the_proxy(
        etcd: LocalEtcd, make_proxy: Callable[[str], FaultProxy],
        clients: Callable[..., EtcdClient]) -> None:
    proxy = make_proxy(etcd.endpoint)
    client = clients(proxy.endpoint, timeout=2)
    k = key()
    client.put(k, b"v")
    assert client.range(k).kvs[0].value == b"v"
    assert client.status().header.member_id
    stats = proxy.stats()
    assert stats.connections >= 1 and stats.bytes_to_upstream > 0 and stats.bytes_to_client > 0


def test_blackhole_makes_calls_time_out_and_pass_through_brings_the_same_client_back(
        etcd: LocalEtcd, make_proxy: Callable[[str], FaultProxy],
        clients: Callable[..., EtcdClient]) -> None:
    proxy = make_proxy(etcd.endpoint)
    client = clients(proxy.endpoint, timeout=0.5)
    client.status()
    proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        client.status(timeout=0.5)
    assert 0.45 <= time.monotonic() - started < slack(2)
    assert proxy.stats().bytes_dropped > 0
    proxy.pass_through()
    assert eventually(client.status, timeout=3).header.member_id


def test_drop_responses_lands_the_put_but_the_caller_times_out(
        etcd: LocalEtcd, make_proxy: Callable[[str], FaultProxy],
        clients: Callable[..., EtcdClient]) -> None:
    proxy = make_proxy(etcd.endpoint)
    client = clients(proxy.endpoint, timeout=2)
    client.status()  # the connection is up before answers start to vanish
    proxy.drop_responses()
    k = key()
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        client.put(k, b"landed", timeout=0.5)
    assert time.monotonic() - started >= 0.45
    direct = clients(etcd.endpoint, timeout=2)  # not through the proxy
    assert direct.range(k).kvs[0].value == b"landed"
    assert proxy.stats().bytes_dropped > 0


def test_reset_fails_an_open_watch_stream(
        etcd: LocalEtcd, make_proxy: Callable[[str], FaultProxy],
        clients: Callable[..., EtcdClient]) -> None:
    proxy = make_proxy(etcd.endpoint)
    client = clients(proxy.endpoint, timeout=2)
    direct = clients(etcd.endpoint, timeout=2)
    k = key()
    watch = client.watch(k)
    seen: queue.Queue[Any] = queue.Queue()

    def consume() -> None:
        try:
            for resp in watch:
                seen.put(resp)
        except EtcdError as exc:
            seen.put(exc)
        else:
            seen.put(None)

    consumer = threading.Thread(target=consume, name="test-watch-consumer", daemon=True)
    consumer.start()
    try:
        # the stream is open: a put made directly shows up through the proxy
        deadline = time.monotonic() + 5
        first = None
        while first is None and time.monotonic() < deadline:
            direct.put(k, b"1")
            with contextlib.suppress(queue.Empty):
                first = seen.get(timeout=0.2)
        assert first is not None and not isinstance(first, BaseException)
        while not seen.empty():
            seen.get_nowait()
        assert proxy.reset() >= 1
        failure = seen.get(timeout=3)
        assert isinstance(failure, EtcdUnavailable), failure
    finally:
        watch.cancel()
        consumer.join(3)
    assert not consumer.is_alive()


def test_refuse_fails_new_connections_fast_and_accept_again_restores(
        etcd: LocalEtcd, make_proxy: Callable[[str], FaultProxy],
        clients: Callable[..., EtcdClient]) -> None:
    proxy = make_proxy(etcd.endpoint)
    proxy.refuse()
    client = clients(proxy.endpoint, timeout=2)
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        client.status()
    assert time.monotonic() - started < slack(1), "refused, not timed out"
    proxy.accept_again()
    assert eventually(client.status, timeout=3).header.member_id


def test_latency_slows_every_call(
        etcd: LocalEtcd, make_proxy: Callable[[str], FaultProxy],
        clients: Callable[..., EtcdClient]) -> None:
    proxy = make_proxy(etcd.endpoint)
    client = clients(proxy.endpoint, timeout=3)
    client.status()
    proxy.latency(0.2)
    started = time.monotonic()
    client.status()
    assert time.monotonic() - started >= 0.2
    proxy.pass_through()
    started = time.monotonic()
    client.status()
    assert time.monotonic() - started < slack(0.2)
