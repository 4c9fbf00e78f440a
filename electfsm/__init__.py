"""electfsm: leader election on etcd v3, as an explicit finite-state machine.

::

    from electfsm import Elector

    with Elector(endpoints=["127.0.0.1:2379"], election="jobs/scheduler",
                 identity="node-a", ttl=5) as elector:
        elector.wait_for("leader", "follower", timeout=10)
        print(elector.state, elector.leader)
"""

from electfsm.dispatcher import Change
from electfsm.elector import Elector, TxnResult
from electfsm.errors import (
    ConfigError,
    ElectfsmError,
    ElectorStopped,
    EtcdError,
    EtcdUnavailable,
    HookError,
    LeaseNotFound,
    NotLeaderError,
    PermissionDenied,
)
from electfsm.events import (
    Deposed,
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
from electfsm.term import Term

__all__ = [
    "STATES",
    "TABLE",
    "Change",
    "ConfigError",
    "Deposed",
    "Elected",
    "ElectfsmError",
    "Elector",
    "ElectorStopped",
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
    "SessionLost",
    "SessionUp",
    "State",
    "Stop",
    "Term",
    "TxnResult",
]
