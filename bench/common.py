"""Shared pieces of the benchmarks: summaries and etcd's own request counters."""

from __future__ import annotations

import re
import statistics
import urllib.request

_METRIC = re.compile(r'^grpc_server_msg_received_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)$')


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": pct(values, 0.95),
            "p99": pct(values, 0.99), "max": max(values), "n": len(values)}


def fmt_ms(values: list[float]) -> str:
    s = stats(values)
    return (f"{s['median'] * 1000:.2f} ms (p95 {s['p95'] * 1000:.2f}, p99 {s['p99'] * 1000:.2f},"
            f" max {s['max'] * 1000:.2f}; n={int(s['n'])})")


def fmt_s(values: list[float]) -> str:
    s = stats(values)
    return (f"{s['median']:.3f} s (p95 {s['p95']:.3f}, max {s['max']:.3f}; n={int(s['n'])})")


def requests(client_url: str) -> dict[str, float]:
    """Messages etcd received, per gRPC method (unary calls and stream messages)."""
    text = urllib.request.urlopen(client_url + "/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
