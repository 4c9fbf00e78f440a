"""What every etcd call shares: gRPC channel options, require-leader metadata, the
translation of gRPC failures, and key helpers."""

from __future__ import annotations

from typing import Any

import grpc

from electfsm import logs
from electfsm.errors import (
    PermissionDenied,
)

log = logs.logger("electfsm.etcd")


#: Watch and keepalive streams carry this so a member cut off from quorum fails them fast.
REQUIRE_LEADER = (("hasleader", "true"),)

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Reconnect quickly after etcd comes back (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5000),  # also the connect timeout
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Find a dead peer under a long-lived watch. etcd refuses pings more often than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]

_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


class TokenExpired(PermissionDenied):
    """etcd rejected our auth token (it expired); the next call authenticates again."""


def _tls_failure(details: str) -> str | None:
    """The TLS reason in a gRPC error's details, if the failure was a TLS one."""
    lowered = details.lower()
    for marker in ("certificate_verify_failed", "certificate verify failed", "ssl_error",
                   "handshake", "wrong_version_number", "tsi_", "ssl", "certificate"):
        if marker in lowered:
            return details.strip()[:300]
    return None


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a range or watch cover every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def to_bytes(value: str | bytes) -> bytes:
    """``value`` as bytes (a str is encoded as UTF-8)."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)
