"""The etcd transport: unary calls with failover (:mod:`~electfsm.etcd.client`), the watch
stream (:mod:`~electfsm.etcd.watch`), the keepalive stream (:mod:`~electfsm.etcd.keepalive`),
TLS and authentication (:mod:`~electfsm.etcd.security`), and what they share: channel options
and the translation of gRPC failures (:mod:`~electfsm.etcd.wire`)."""

from electfsm.etcd.client import EtcdClient
from electfsm.etcd.watch import Watch
from electfsm.etcd.wire import REQUIRE_LEADER, TokenExpired, prefix_end, to_bytes

__all__ = ["REQUIRE_LEADER", "EtcdClient", "TokenExpired", "Watch", "prefix_end", "to_bytes"]
