"""electfsm: leader election on etcd v3, as an explicit finite-state machine.

::

    from electfsm import Elector

    with Elector(endpoints=["127.0.0.1:2379"], election="jobs/scheduler",
                 identity="node-a", ttl=5) as elector:
        elector.wait_for("leader", "follower", timeout=10)
        print(elector.state, elector.leader)
"""

import os as _os
from typing import TYPE_CHECKING as _TYPE_CHECKING

from electfsm._lazy import exports as _exports

# gRPC's C core logs every failed connection attempt (each TLS handshake retry, for one) to
# stderr at INFO before Python sees it. electfsm reports those failures itself, through
# logging and on_error, so unless the user chose a verbosity, keep gRPC to its errors. Read
# once, when grpc is first imported: it must be set before any electfsm module imports it.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

# The names below are imported on first use (PEP 562), so that ``import electfsm.testing.plugin``
# (loaded by pytest in every run of a project that installs electfsm) costs no grpc, etcd3 or
# transitions import. Type checkers see ordinary imports.
if _TYPE_CHECKING:
    from electfsm.dispatcher import Change
    from electfsm.elector import Elector, TxnResult
    from electfsm.errors import (
        ConfigError,
        ElectfsmError,
        ElectorForkedError,
        ElectorStopped,
        ElectorThreadError,
        EtcdError,
        EtcdUnavailable,
        HookError,
        LeaseNotFound,
        NotLeaderError,
        PermissionDenied,
    )
    from electfsm.etcd.security import TLS, Auth
    from electfsm.events import (
        Elected,
        ErrorReported,
        LeaderInfo,
        LeaderSeen,
        Resign,
        SessionLost,
        SessionUp,
        Stop,
    )
    from electfsm.machine import STATES, TABLE, State
    from electfsm.sessions import Session
    from electfsm.term import Term

_LAZY = {
    "Auth": "electfsm.etcd.security",
    "Change": "electfsm.dispatcher",
    "ConfigError": "electfsm.errors",
    "Elected": "electfsm.events",
    "ElectfsmError": "electfsm.errors",
    "Elector": "electfsm.elector",
    "ElectorForkedError": "electfsm.errors",
    "ElectorStopped": "electfsm.errors",
    "ElectorThreadError": "electfsm.errors",
    "ErrorReported": "electfsm.events",
    "EtcdError": "electfsm.errors",
    "EtcdUnavailable": "electfsm.errors",
    "HookError": "electfsm.errors",
    "LeaderInfo": "electfsm.events",
    "LeaderSeen": "electfsm.events",
    "LeaseNotFound": "electfsm.errors",
    "NotLeaderError": "electfsm.errors",
    "PermissionDenied": "electfsm.errors",
    "Resign": "electfsm.events",
    "STATES": "electfsm.machine",
    "Session": "electfsm.sessions",
    "SessionLost": "electfsm.events",
    "SessionUp": "electfsm.events",
    "State": "electfsm.machine",
    "Stop": "electfsm.events",
    "TABLE": "electfsm.machine",
    "TLS": "electfsm.etcd.security",
    "Term": "electfsm.term",
    "TxnResult": "electfsm.elector",
}


__getattr__, __dir__ = _exports(__name__, _LAZY, globals())

__all__ = [
    "STATES",
    "TABLE",
    "TLS",
    "Auth",
    "Change",
    "ConfigError",
    "Elected",
    "ElectfsmError",
    "Elector",
    "ElectorForkedError",
    "ElectorStopped",
    "ElectorThreadError",
    "ErrorReported",
    "EtcdError",
    "EtcdUnavailable",
    "HookError",
    "LeaderInfo",
    "LeaderSeen",
    "LeaseNotFound",
    "NotLeaderError",
    "PermissionDenied",
    "Resign",
    "Session",
    "SessionLost",
    "SessionUp",
    "State",
    "Stop",
    "Term",
    "TxnResult",
]
