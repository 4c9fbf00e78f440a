"""Health, leader and status endpoints for one or more electors (standard library only)::

    from electfsm import Elector
    from electfsm.health import StatusServer

    with Elector(...) as elector, StatusServer([elector], port=8080):
        ...

=============  ===========================================================================
``/livez``     200, or 503 when this process is broken: the dispatcher has been stuck on
               one event longer than ``stall``, or it believes it leads while the lease's
               deadline passed more than ``tolerance`` ago. A follower whose etcd is down
               stays live (no restart storms during an etcd outage).
``/readyz``    200, or 503 while an elector is disconnected.
``/leader``    200 only while leading with a valid term, else 503.
``/follower``  200 only while following, else 503.
``/status``    200 and JSON: state, leader, term token, time left to the deadline, age of
               the last renewal, for each elector.
``/metrics``   the Prometheus text (``pip install electfsm[metrics]``; 501 without it).
=============  ===========================================================================

GET, HEAD and OPTIONS are answered (HAProxy: ``option httpchk OPTIONS /leader``); any other
method gets 405; any other path 404. Responses carry ``Cache-Control: no-store``. With
several electors, ``?election=NAME`` picks one; without it, each check must hold for all.
The server binds to loopback unless told otherwise: the endpoints say who leads, so bind them
elsewhere only behind what you trust.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from electfsm import clock
from electfsm.elector import Elector
from electfsm.errors import ConfigError


class StatusServer:
    """Serves the endpoints above from a daemon thread; ``stop()`` (or leaving the ``with``)
    closes the socket and ends the thread."""

    def __init__(self, electors: Sequence[Elector], host: str = "127.0.0.1", port: int = 0, *,
                 stall: float = 30.0, tolerance: float | None = None,
                 registry: Any = None) -> None:
        if not electors:
            raise ConfigError("StatusServer needs at least one elector")
        self.electors = list(electors)
        self.stall = stall
        self.tolerance = tolerance
        self.registry = registry
        self._metrics: list[Any] = []
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(self))
        except OSError as exc:
            raise ConfigError(f"cannot serve status on {host}:{port}: {exc.strerror or exc}; "
                              "choose a free port (or 0 for any)") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=f"electfsm-status[{self.address}]")

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> StatusServer:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def with_metrics(self) -> StatusServer:
        """Register every elector's metrics (in ``registry``) and serve them on /metrics."""
        from electfsm import metrics

        self._metrics = [metrics.register(e, self.registry) for e in self.electors]
        return self

    # ------------------------------------------------------------------ the checks
    def pick(self, election: str | None) -> list[Elector] | None:
        if election is None:
            return self.electors
        chosen = [e for e in self.electors if e.config.election == election]
        return chosen or None

    def live(self, e: Elector) -> bool:
        if e.dispatch_stalled_for > self.stall:
            return False
        term = e.term
        if e.state == "leader" and term is not None:
            tolerance = e.ttl if self.tolerance is None else self.tolerance
            return term.remaining() > -tolerance
        return True

    def status(self, e: Elector) -> dict[str, Any]:
        leader = e.leader
        term = e.term
        left = e.deadline_remaining
        return {
            "election": e.config.election,
            "identity": e.identity,
            "state": e.state,
            "is_leader": e.is_leader,
            "leader": None if leader is None else {
                "identity": leader.identity, "key": leader.key, "token": leader.token},
            "token": term.token if term is not None and e.is_leader else None,
            "deadline_remaining": None if left is None else round(left, 3),
            "last_renewal_age": (None if e.last_renewal is None
                                 else round(clock.now() - e.last_renewal, 3)),
        }

    def metrics_text(self) -> bytes | None:
        try:
            import prometheus_client
        except ImportError:
            return None
        for m in self._metrics:
            m.refresh()
        registry = self.registry if self.registry is not None else prometheus_client.REGISTRY
        text: bytes = prometheus_client.generate_latest(registry)
        return text


def _handler(server: StatusServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "electfsm"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: probes are frequent
            pass

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_OPTIONS(self) -> None:
            self._answer(body=True)

        def _not_allowed(self) -> None:
            self._send(405, b"method not allowed: use GET, HEAD or OPTIONS\n", "text/plain",
                       body=True, extra={"Allow": "GET, HEAD, OPTIONS"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

        def _answer(self, *, body: bool) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            chosen = server.pick(query.get("election", [None])[0])
            if chosen is None:
                self._send(404, b"no such election here\n", "text/plain", body=body)
                return
            path = url.path.rstrip("/") or "/"
            if path == "/metrics":
                text = server.metrics_text()
                if text is None:
                    self._send(501, b"metrics need prometheus-client: pip install "
                               b"electfsm[metrics]\n", "text/plain", body=body)
                else:
                    self._send(200, text, "text/plain; version=0.0.4", body=body)
                return
            checks: dict[str, Callable[[Elector], bool]] = {
                "/livez": server.live,
                "/readyz": lambda e: e.state != "disconnected",
                "/leader": lambda e: e.is_leader,
                "/follower": lambda e: e.state == "follower",
                "/status": lambda e: True,
            }
            check = checks.get(path)
            if check is None:
                self._send(404, b"not found: /livez /readyz /leader /follower /status "
                           b"/metrics\n", "text/plain", body=body)
                return
            ok = all(check(e) for e in chosen)
            payload = [server.status(e) for e in chosen]
            data = json.dumps(payload[0] if len(payload) == 1 else payload).encode() + b"\n"
            self._send(200 if ok else 503, data, "application/json", body=body)

        def _send(self, code: int, data: bytes, ctype: str, *, body: bool,
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
