"""The elector's transition table, written once as data.

The ``transitions`` machine (:func:`build_machine`), the diagrams in ``diagrams/``
(:mod:`electfsm.diagram`) and the README's table are all made from :data:`TABLE`.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import attrs
from transitions import Machine

#: A state name.
State = Literal["disconnected", "candidate", "follower", "leader"]

#: Every state, the initial one first.
STATES: tuple[State, ...] = ("disconnected", "candidate", "follower", "leader")
INITIAL: State = "disconnected"
LIVE: tuple[State, ...] = ("candidate", "follower", "leader")


@attrs.frozen
class Row:
    """One line of the table: ``trigger`` moves each of ``sources`` to ``dest``.

    ``internal`` rows stay in the state without leaving it (no exit/enter hooks run).
    """

    sources: tuple[State, ...]
    trigger: str
    dest: State
    note: str
    internal: bool = False


#: The machine as data: each row moves its sources to its destination on its trigger.
TABLE: tuple[Row, ...] = (
    Row(("disconnected",), "session_up", "candidate", "a fresh lease; campaign for it"),
    Row(("candidate",), "leader_seen", "follower", "another candidate leads"),
    Row(("candidate", "follower"), "elected", "leader",
        "etcd showed our key first at a revision (event stream or read)"),
    Row(("follower",), "leader_seen", "follower", "the leader changed", internal=True),
    Row(("follower",), "leader_gone", "candidate", "nobody leads right now"),
    Row(("leader",), "deposed", "candidate", "our key vanished or is not first; campaign again"),
    Row(("leader",), "resign", "candidate", "delete our key (guarded); queue again at the back"),
    Row(LIVE, "session_lost", "disconnected",
        "lease expired, revoked, or unconfirmed past its deadline"),
    Row(STATES, "stop", "disconnected", "revoke the lease, end every thread; terminal"),
)

#: Every trigger name, in table order.
TRIGGERS: tuple[str, ...] = tuple(dict.fromkeys(row.trigger for row in TABLE))


def transition_configs() -> list[dict[str, Any]]:
    """The table in the form ``transitions.Machine(transitions=...)`` takes."""
    configs: list[dict[str, Any]] = []
    for row in TABLE:
        for source in row.sources:
            configs.append(
                {"trigger": row.trigger, "source": source,
                 "dest": None if internal(source, row.trigger) else row.dest}
            )
    return configs


def build_machine(model: Any, **callbacks: Any) -> Machine:
    """A ``transitions`` machine for ``model`` (None: no model yet) built from :data:`TABLE`.

    Invalid triggers are ignored (the caller decides what a state does not accept),
    and no ``to_<state>`` shortcuts exist: the table is the only way between states.
    """
    return Machine(
        model=model,
        states=list(STATES),
        transitions=transition_configs(),
        initial=INITIAL,
        auto_transitions=False,
        ignore_invalid_triggers=True,
        model_attribute="fsm_state",
        **callbacks,
    )


#: (source, trigger) -> its row of the table; built once, looked up on every transition
_ROW: dict[tuple[State, str], Row] = {(source, row.trigger): row
                                      for row in reversed(TABLE) for source in row.sources}


def internal(source: State, trigger: str) -> bool:
    """True if ``trigger`` keeps ``source`` without leaving it (no exit or enter hooks)."""
    row = _ROW.get((source, trigger))
    return row is not None and (row.internal or (row.trigger == "stop" and source == row.dest))


def legal(source: State, trigger: str) -> State | None:
    """Where ``trigger`` takes ``source`` according to the table, or None if it does not apply."""
    row = _ROW.get((source, trigger))
    return None if row is None else row.dest


#: The one machine every dispatcher's model moves through. Its states, events and
#: transitions are the table's and nothing else (no callbacks: the dispatcher runs its hooks
#: around the trigger), so they are built once per process instead of once per elector,
#: where they were the largest part of an elector's memory. Unqueued, it keeps no state of
#: its own between triggers: models on different threads move through it independently.
_MACHINE = build_machine(None)
_MACHINE_LOCK = threading.Lock()


def attach(model: Any) -> None:
    """Give ``model`` the table's triggers and put it in the initial state (``disconnected``).

    The shared machine keeps no reference to it: transitions' ``remove_model`` leaves a
    model's triggers working, so the model lives exactly as long as its dispatcher.
    """
    with _MACHINE_LOCK:
        _MACHINE.add_model(model, initial=INITIAL)
        _MACHINE.remove_model(model)
