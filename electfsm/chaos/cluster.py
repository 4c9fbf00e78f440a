"""A 3-member etcd cluster whose peer links can be cut (:class:`PartitionableCluster`)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Sequence

from electfsm import clock
from electfsm.errors import EtcdError
from electfsm.etcd import EtcdClient
from electfsm.testing.etcd_binaries import find_etcd_binary, free_port
from electfsm.testing.local_etcd import LocalEtcd

# --------------------------------------------------------------------------- peer partitions


def _socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the TCP socket 127.0.0.1:local_port -> 127.0.0.1:remote_port."""
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1] == want_local and parts[2] == want_remote:
                    return int(parts[9])
    except (OSError, IndexError, ValueError):
        return None
    return None


def _owner(inode: int, pids: dict[int, int]) -> int | None:
    """Which of ``pids`` (pid -> member index) holds the socket ``inode``."""
    target = f"socket:[{inode}]"
    for pid, index in pids.items():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return index
    return None


class _PeerProxy:
    """Forwards one member's peer port; drops connections between isolated members.

    It finds which member dialled each connection from the socket's owner in ``/proc``, so
    it can cut member ``i`` off from the others in both directions even though every member
    dials the same advertised URLs.
    """

    def __init__(self, net: PeerNetwork, index: int, listen_port: int, upstream_port: int
                 ) -> None:
        self.net = net
        self.index = index
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self._sock = socket.create_server(("127.0.0.1", listen_port))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[tuple[socket.socket, socket.socket], int | None] = {}
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True,
                             name=f"peerproxy-{listen_port}")
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            src = self.net.dialer(int(addr[1]), self.listen_port)
            if self.net.cut(src, self.index):
                _rst(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port),
                                                    timeout=1.0)
            except OSError:
                _rst(client)
                continue
            with self._lock:
                self._conns[(client, upstream)] = src
            t = threading.Thread(target=self._pump, args=(client, upstream), daemon=True,
                                 name=f"peerproxy-{self.listen_port}-conn")
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            for s in (a, b):
                s.setblocking(False)
            while not self._stop.is_set():
                with self._lock:
                    if (a, b) not in self._conns:
                        return
                r, _, _ = select.select([a, b], [], [], 0.05)
                for s in r:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    out = peers[s]
                    out.setblocking(True)
                    out.settimeout(2.0)
                    out.sendall(data)
                    out.setblocking(False)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.pop((a, b), None)
            _rst(a)
            _rst(b)

    def cut_now(self) -> None:
        """RST every open connection that the current partition forbids."""
        with self._lock:
            doomed = [(a, b) for (a, b), src in self._conns.items()
                      if self.net.cut(src, self.index)]
            for pair in doomed:
                self._conns.pop(pair, None)
        for a, b in doomed:
            _rst(a)
            _rst(b)

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for t in self._threads:
            t.join(1.0)


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


class PeerNetwork:
    """Which members may talk to which; shared by the peer proxies of one cluster."""

    def __init__(self, members: Sequence[LocalEtcd]) -> None:
        self.isolated: set[int] = set()
        self.members = members
        self.proxies: list[_PeerProxy] = []

    def dialer(self, local_port: int, proxy_port: int) -> int | None:
        """The member that dialled from ``local_port`` to ``proxy_port`` (None: unknown)."""
        for _ in range(5):
            pids = {m.pid: i for i, m in enumerate(self.members) if m.pid is not None}
            inode = _socket_inode(local_port, proxy_port)
            if inode is not None:
                owner = _owner(inode, pids)
                if owner is not None:
                    return owner
            time.sleep(0.005)
        return None

    def cut(self, src: int | None, dst: int) -> bool:
        """Whether traffic dialled by ``src`` to ``dst`` is cut (while a partition is on,
        a connection whose dialer is unknown is cut too)."""
        if not self.isolated:
            return False
        if src is None:
            return True
        return src != dst and (dst in self.isolated or src in self.isolated)


class PartitionableCluster:
    """A 3-member (``size``) etcd cluster whose peer traffic passes through proxies, so one
    member can be cut off from the others (:meth:`isolate`) while clients still reach it.

    ::

        with PartitionableCluster() as cluster:
            cluster.isolate(0)          # member 0 loses its peers: a minority of one
            cluster.heal()
    """

    def __init__(self, size: int = 3, *, extra_args: Sequence[str] = ()) -> None:
        self.size = size
        binary = find_etcd_binary()
        token = f"electfsm-part-{uuid.uuid4().hex[:10]}"
        self._real = [free_port() for _ in range(size)]
        self._adv = [free_port() for _ in range(size)]
        clients = [free_port() for _ in range(size)]
        names = [f"part-{i}" for i in range(size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, self._adv,
                                                                        strict=True))
        self.members = [
            LocalEtcd(binary=binary, name=names[i], client_port=clients[i],
                      peer_port=self._adv[i], initial_cluster=initial,
                      extra_args=(f"--initial-cluster-token={token}",
                                  f"--listen-peer-urls=http://127.0.0.1:{self._real[i]}",
                                  *extra_args))
            for i in range(size)
        ]
        self.net = PeerNetwork(self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 30.0) -> PartitionableCluster:
        self.net.proxies = [_PeerProxy(self.net, i, self._adv[i], self._real[i])
                            for i in range(self.size)]
        errors: list[BaseException] = []

        def boot(m: LocalEtcd) -> None:
            try:
                m.start(timeout)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=boot, args=(m,)) for m in self.members]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]
        return self

    def isolate(self, index: int) -> None:
        """Cut member ``index`` off from every other member, both ways."""
        self.net.isolated = {index}
        for p in self.net.proxies:
            p.cut_now()

    def heal(self) -> None:
        self.net.isolated = set()

    def leader_index(self) -> int | None:
        for i, m in enumerate(self.members):
            if m.pid is None:
                continue
            c = EtcdClient([m.endpoint], timeout=0.5)
            try:
                st = c.status()
                if st.leader and st.leader == st.header.member_id:
                    return i
            except EtcdError:
                continue
            finally:
                c.close()
        return None

    def wait_for_leader(self, timeout: float = 10.0, exclude: Sequence[int] = ()) -> int:
        deadline = clock.now() + timeout
        while clock.now() < deadline:
            i = self.leader_index()
            if i is not None and i not in exclude:
                return i
            time.sleep(0.05)
        raise TimeoutError(f"no etcd leader (outside {list(exclude)}) within {timeout}s")

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.stop()
        for p in self.net.proxies:
            p.stop()

    def __enter__(self) -> PartitionableCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
