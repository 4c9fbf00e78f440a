"""What the elector tests share: reading an election's keys, the elector's threads, waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from electfsm.etcd import EtcdClient, prefix_end


def keys(client: EtcdClient, election: str) -> list[bytes]:
    """The keys under ``election/``, read directly from etcd."""
    prefix = (election + "/").encode()
    return [bytes(kv.key) for kv in client.range(prefix, prefix_end(prefix)).kvs]


def own_threads(election: str) -> list[str]:
    """The names of the live threads that belong to ``election``."""
    return [t.name for t in threading.enumerate() if election in t.name]


def wait(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
