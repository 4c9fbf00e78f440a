"""Prometheus metrics for electors (``pip install electfsm[metrics]``)::

    from electfsm import Elector, metrics

    elector = Elector(...)
    metrics.register(elector)            # the default registry, or registry=...

Every gauge is a plain gauge (one 0/1 gauge per state, no ``Enum``), so the metrics work in
prometheus-client's multiprocess mode too (``multiprocess_mode="livemax"``).

``leader_election_master_status{name}`` is client-go's metric, so dashboards and alerts made
for Kubernetes controllers work unchanged. etcd's own ``etcd_server_is_leader`` is etcd's raft
leader, not the leader of your election.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from electfsm.errors import ConfigError
from electfsm.machine import STATES, State

if TYPE_CHECKING:
    from electfsm.elector import Elector

INSTALL = "pip install electfsm[metrics]  (prometheus-client)"
_families: dict[int, _Families] = {}
_lock = threading.Lock()


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError(f"electfsm metrics need prometheus-client: {INSTALL}") from exc
    return prometheus_client


class _Families:
    """The metric families of one registry, shared by every elector registered there."""

    def __init__(self, registry: Any) -> None:
        p = _prometheus()
        g = {"registry": registry, "multiprocess_mode": "livemax"}
        self.is_leader = p.Gauge("electfsm_is_leader", "1 while this process leads the "
                                 "election with a valid term", ["election"], **g)
        self.state = p.Gauge("electfsm_state", "1 for the elector's current state, 0 for the "
                             "others", ["election", "state"], **g)
        self.term_token = p.Gauge("electfsm_term_token", "The fencing token of our current "
                                  "term (0 when not leading)", ["election"], **g)
        self.deadline = p.Gauge("electfsm_deadline_remaining_seconds", "Seconds before the "
                                "lease's local deadline (as of the last renewal or scrape)",
                                ["election"], **g)
        self.master = p.Gauge("leader_election_master_status", "client-go compatible: 1 "
                              "while leading, 0 otherwise (group by name)", ["name"], **g)
        self.transitions = p.Counter("electfsm_transitions", "Transitions of the machine",
                                     ["election", "source", "dest", "trigger"],
                                     registry=registry)
        self.leader_changes = p.Counter("electfsm_leader_changes", "Times the known leader "
                                        "changed", ["election"], registry=registry)
        self.errors = p.Counter("electfsm_errors", "Errors reported to on_error, by where "
                                "they happened", ["election", "where"], registry=registry)
        self.fenced = p.Counter("electfsm_fenced_txn", "fenced_txn calls by result "
                                "(committed, compare_failed, fenced_out, error)",
                                ["election", "result"], registry=registry)
        self.keepalive = p.Histogram("electfsm_keepalive_duration_seconds", "How long a "
                                     "confirmed lease keepalive took", ["election"],
                                     registry=registry,
                                     buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5,
                                              1, 2.5))
        self.hook = p.Histogram("electfsm_hook_duration_seconds", "How long each hook ran "
                                "on the dispatcher thread", ["election", "hook"],
                                registry=registry,
                                buckets=(.0001, .0005, .001, .005, .01, .05, .1, .25, .5, 1,
                                         2.5, 5))


class ElectorMetrics:
    """One elector's metrics; made by :func:`register`. Updated as the elector acts;
    :meth:`refresh` brings the time-dependent gauges up to date (the status server calls it
    before each scrape)."""

    def __init__(self, elector: Elector, families: _Families) -> None:
        self._elector = elector
        self._f = families
        self._name = elector.config.election
        for state in STATES:  # every series exists from the start, at 0
            families.state.labels(self._name, state)
        families.leader_changes.labels(self._name)
        self.refresh()

    def refresh(self) -> None:
        """Bring the time-dependent gauges (deadline remaining, leading) up to date."""
        e, f, name = self._elector, self._f, self._name
        state = e.state
        leading = e.is_leader
        term = e.term
        for s in STATES:
            f.state.labels(name, s).set(1 if s == state else 0)
        f.is_leader.labels(name).set(1 if leading else 0)
        f.master.labels(name).set(1 if leading else 0)
        f.term_token.labels(name).set(term.token if leading and term is not None else 0)
        left = e.deadline_remaining
        f.deadline.labels(name).set(max(0.0, left) if left is not None else 0.0)

    # Telemetry ------------------------------------------------------------------------
    def transition(self, source: State, dest: State, trigger: str) -> None:
        self._f.transitions.labels(self._name, source, dest, trigger).inc()
        self.refresh()

    def hook(self, name: str, seconds: float) -> None:
        self._f.hook.labels(self._name, name).observe(seconds)

    def leader_change(self) -> None:
        self._f.leader_changes.labels(self._name).inc()

    def error(self, where: str) -> None:
        self._f.errors.labels(self._name, where or "unknown").inc()

    def keepalive(self, seconds: float) -> None:
        self._f.keepalive.labels(self._name).observe(seconds)
        self.refresh()

    def fenced(self, result: str) -> None:
        self._f.fenced.labels(self._name, result).inc()


def register(elector: Elector, registry: Any = None) -> ElectorMetrics:
    """Publish ``elector``'s metrics in ``registry`` (prometheus-client's default registry
    when None). Electors registered in one registry share its metric families, told apart by
    the ``election`` label."""
    p = _prometheus()
    registry = p.REGISTRY if registry is None else registry
    with _lock:
        families = _families.get(id(registry))
        if families is None:
            families = _families[id(registry)] = _Families(registry)
    m = ElectorMetrics(elector, families)
    elector.add_telemetry(m)
    return m
