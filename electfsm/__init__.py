"""electfsm: leader election on etcd v3, as an explicit finite-state machine.

::

    from electfsm import Elector

    with Elector(endpoints=["127.0.0.1:2379"], election="jobs/scheduler",
                 identity="node-a", ttl=5) as elector:
        elector.wait_for("leader", "follower", timeout=10)
        print(elector.state, elector.leader)
"""

import os as _os

# gRPC's C core logs every failed connection attempt (each TLS handshake retry, for one) to
# stderr at INFO before Python sees it. electfsm reports those failures itself, through
# logging and on_error, so unless the user chose a verbosity, keep gRPC to its errors. Read
# once, when grpc is first imported: it must be set before the imports below.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

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
