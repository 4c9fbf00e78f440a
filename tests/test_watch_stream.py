"""The shared watch stream leaks nothing: no watch left open at etcd, no stream, no reader.

Each test runs its own etcd and reads etcd's own gauges of open watchers and watch streams
(/metrics), so what is checked is the server's side, not only our bookkeeping.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import electfsm.etcd.watch as etcd_module
from electfsm import EtcdError, LeaderSeen
from electfsm.errors import WatchCompacted
from electfsm.etcd import EtcdClient, Watch
from electfsm.etcd.watch import _WatchStream
from electfsm.events import ErrorReported, Event
from electfsm.sources.observe import Observer
from electfsm.testing.local_etcd import LocalEtcd

WAIT = 30.0  # generous: the CI machine is small and shared


@pytest.fixture
def server(make_etcd: Callable[..., LocalEtcd]) -> LocalEtcd:
    return make_etcd()


@pytest.fixture
def client(server: LocalEtcd) -> Iterator[EtcdClient]:
    c = EtcdClient([server.endpoint], timeout=5)
    yield c
    c.close()


def gauge(server: LocalEtcd, name: str) -> float:
    text = urllib.request.urlopen(server.client_url + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"etcd reports no {name}")


def open_watchers(server: LocalEtcd) -> float:
    return gauge(server, "etcd_debugging_mvcc_watcher_total")


def open_streams(server: LocalEtcd) -> float:
    return gauge(server, "etcd_debugging_mvcc_watch_stream_total")


def until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def drain(watch: Watch) -> queue.Queue[Any]:
    """Iterate ``watch`` in a thread; its responses, then its error or None, land in the queue."""
    out: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        try:
            for resp in watch:
                out.put(resp)
        except EtcdError as exc:
            out.put(exc)
        else:
            out.put(None)

    threading.Thread(target=run, daemon=True, name="test-watch-drain").start()
    return out


def test_a_cancel_racing_the_created_answer_leaves_no_watch_open(
        server: LocalEtcd, client: EtcdClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cancel()`` landing just as the reader takes the ``created`` answer (after it looked
    at ``cancelled``, before the watch had its id) found no id to cancel, and the reader had
    already decided the watch was live: etcd kept the watch, and its events piled up in a
    queue nobody read."""
    raced: list[threading.Thread] = []

    def cancel_meanwhile(watch: Watch) -> None:
        if raced:
            return
        canceller = threading.Thread(target=watch.cancel, daemon=True, name="test-cancel")
        raced.append(canceller)
        canceller.start()
        canceller.join(1.0)  # returns at once unless cancel() waits for this answer

    monkeypatch.setattr(etcd_module, "_created_seam", cancel_meanwhile)
    watch = client.watch(b"raced")
    assert until(lambda: bool(raced)), "the created answer never came"
    raced[0].join(WAIT)
    assert watch.cancelled
    client.put(b"raced", b"after the cancel")
    assert until(lambda: open_watchers(server) == 0), \
        f"etcd still has {open_watchers(server)} watcher(s) open"
    stream = watch._stream
    assert not stream._active, "the stream still routes events to the cancelled watch"


def test_a_stream_retired_by_a_refused_watch_is_closed_once_idle(
        server: LocalEtcd, client: EtcdClient) -> None:
    """etcd refusing a watch at creation retires the stream (new watches get a fresh one).
    With no other watch on it, nothing would ever close it: a reader thread and an open
    stream at etcd, leaked for the client's lifetime."""
    refused = client.watch(b"z", b"a")  # range end before the key: etcd refuses it
    with pytest.raises(EtcdError, match="cancelled"):
        for _ in refused:
            pass
    stream = refused._stream
    assert until(lambda: not stream._reader.is_alive()), "the retired stream's reader lives"
    assert until(lambda: open_streams(server) == 0), "etcd still holds the retired stream"
    fresh = client.watch(b"k")  # the client goes on, on a new stream
    got = drain(fresh)
    assert until(lambda: fresh.watch_id is not None), "etcd never created the watch"
    client.put(b"k", b"v")
    assert [ev.kv.value for ev in got.get(timeout=WAIT).events] == [b"v"]
    fresh.cancel()


def test_a_watch_opened_just_as_its_stream_retired_goes_to_a_fresh_stream(
        server: LocalEtcd, client: EtcdClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch may pick the stream just before etcd's refusal of another watch retires it
    and, that being its last watch, closes it. The new watch must not fail for that (its
    owner would report an error and back off): it goes to a fresh stream."""
    refused = client.watch(b"z", b"a")
    with pytest.raises(EtcdError, match="cancelled"):
        for _ in refused:
            pass
    retired = refused._stream
    assert until(lambda: not retired._reader.is_alive())
    pick = client._watch_stream
    picked: list[str] = []

    def picked_before_it_retired(what: str) -> _WatchStream:
        if not picked:
            picked.append(what)
            return retired
        return pick(what)

    monkeypatch.setattr(client, "_watch_stream", picked_before_it_retired)
    watch = client.watch(b"k")
    assert picked and watch._stream is not retired
    got = drain(watch)
    assert until(lambda: watch.watch_id is not None), "etcd never created the watch"
    client.put(b"k", b"v")
    assert [ev.kv.value for ev in got.get(timeout=WAIT).events] == [b"v"]
    watch.cancel()


def test_a_retired_stream_is_closed_when_etcd_cancels_its_last_watch(
        server: LocalEtcd, client: EtcdClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same leak the other way round: the stream is retired while a watch still runs on
    it, and etcd then ends that watch itself (here: its start revision was compacted)."""
    for i in range(3):
        client.put(b"old", str(i).encode())
    compacted = int(client.put(b"old", b"3").header.revision)
    client.compact(compacted)
    stream = client._watch_stream("test")
    release = threading.Event()
    route = stream._route

    def held(resp: Any) -> None:  # both creates go out before any answer is taken
        release.wait(WAIT)
        route(resp)

    monkeypatch.setattr(stream, "_route", held)
    refused = client.watch(b"z", b"a")
    late = client.watch(b"old", start_revision=2)
    assert refused._stream is stream and late._stream is stream
    release.set()
    with pytest.raises(EtcdError, match="cancelled"):
        for _ in refused:
            pass
    with pytest.raises(WatchCompacted):
        for _ in late:
            pass
    assert until(lambda: not stream._reader.is_alive()), "the retired stream's reader lives"
    assert until(lambda: open_streams(server) == 0), "etcd still holds the retired stream"


def fail_on_events(stream: _WatchStream, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the stream's reader raise (as a bug of ours would) on the first response with
    events."""
    route = stream._route

    def broken(resp: Any) -> None:
        if resp.events:
            raise RuntimeError("a bug in routing")
        route(resp)

    monkeypatch.setattr(stream, "_route", broken)


def test_a_reader_that_fails_unexpectedly_fails_every_watch_on_its_stream(
        server: LocalEtcd, client: EtcdClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once an unexpected exception ended the reader thread silently: every watch of the
    client waited forever for an answer that no thread would route."""
    watches = [client.watch(f"w/{i}".encode()) for i in range(3)]
    stream = watches[0]._stream
    assert all(w._stream is stream for w in watches)
    fail_on_events(stream, monkeypatch)
    outs = [drain(w) for w in watches]
    assert until(lambda: all(w.watch_id is not None for w in watches))
    client.put(b"w/0", b"x")
    for out in outs:
        error = out.get(timeout=WAIT)
        assert isinstance(error, EtcdError) and "reader failed" in str(error), error
    assert until(lambda: not stream._reader.is_alive())
    assert until(lambda: open_streams(server) == 0), "etcd still holds the failed stream"
    fresh = client.watch(b"w/1")  # a new stream serves the next watch
    assert fresh._stream is not stream
    got = drain(fresh)
    assert until(lambda: fresh.watch_id is not None), "etcd never created the watch"
    client.put(b"w/1", b"y")
    assert [ev.kv.value for ev in got.get(timeout=WAIT).events] == [b"y"]
    fresh.cancel()


def test_a_reader_failing_as_it_takes_a_created_answer_fails_that_watch_too(
        server: LocalEtcd, client: EtcdClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch whose ``created`` answer was being taken when the reader failed is neither
    waiting nor live at that moment; it must get the stream's error like the others."""
    def bug(watch: Watch) -> None:
        raise RuntimeError("a bug while taking the created answer")

    monkeypatch.setattr(etcd_module, "_created_seam", bug)
    watch = client.watch(b"k")
    error = drain(watch).get(timeout=WAIT)
    assert isinstance(error, EtcdError) and "reader failed" in str(error), error
    monkeypatch.setattr(etcd_module, "_created_seam", None)
    assert until(lambda: open_streams(server) == 0), "etcd still holds the failed stream"


def test_observe_reports_a_failed_reader_and_keeps_following(
        server: LocalEtcd, client: EtcdClient, election: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """observe hears of the failed reader as an error (reported to ``on_error``), reads the
    election again and goes on reporting who leads."""
    raw = EtcdClient([server.endpoint], timeout=5)
    events: queue.Queue[Event] = queue.Queue()
    observer = Observer(client, election, events.put, backoff_max=0.2)
    observer.start()
    try:
        assert until(lambda: client._watches is not None and bool(client._watches._active))
        assert client._watches is not None
        fail_on_events(client._watches, monkeypatch)
        lease, _ = raw.grant(60)
        raw.put(f"{election}/{lease:x}".encode(), b"node-1", lease=lease)
        got: list[Event] = []
        deadline = time.monotonic() + WAIT
        while not any(isinstance(e, LeaderSeen) and e.leader is not None for e in got):
            assert time.monotonic() < deadline, f"observe stalled; saw {got}"
            with contextlib.suppress(queue.Empty):
                got.append(events.get(timeout=0.5))
        errors = [e for e in got if isinstance(e, ErrorReported)]
        assert errors and "reader failed" in str(errors[0].error), got
        assert errors[0].where == "observe"
        raw.revoke(lease)
    finally:
        observer.stop(5)
        raw.close()
