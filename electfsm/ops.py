"""Building blocks for :meth:`electfsm.Elector.fenced_txn`.

::

    from electfsm import ops

    elector.fenced_txn(
        compare=[ops.value("jobs/cursor") == b"41"],
        success=[ops.put("jobs/cursor", b"42")],
        failure=[ops.get("jobs/cursor")],
    )

Each helper returns the etcd protobuf message (``Compare`` or ``RequestOp``), so raw
messages from ``etcd3.etcdrpc`` are accepted too.
"""

from __future__ import annotations

from typing import Any

from etcd3 import etcdrpc

from electfsm.etcd import prefix_end, to_bytes


class _Target:
    """``value(key) == b"x"``, ``version(key) > 2``… build a ``Compare``."""

    def __init__(self, key: str | bytes, target: str) -> None:
        self._key = to_bytes(key)
        self._target = target

    def _compare(self, result: str, other: Any) -> Any:
        field = {"VALUE": "value", "VERSION": "version", "CREATE": "create_revision",
                 "MOD": "mod_revision"}[self._target]
        operand = to_bytes(other) if self._target == "VALUE" else int(other)
        return etcdrpc.Compare(key=self._key, target=getattr(etcdrpc.Compare, self._target),
                               result=getattr(etcdrpc.Compare, result), **{field: operand})

    def __eq__(self, other: object) -> Any:
        return self._compare("EQUAL", other)

    def __ne__(self, other: object) -> Any:
        return self._compare("NOT_EQUAL", other)

    def __lt__(self, other: object) -> Any:
        return self._compare("LESS", other)

    def __gt__(self, other: object) -> Any:
        return self._compare("GREATER", other)

    __hash__ = None  # type: ignore[assignment]


def value(key: str | bytes) -> _Target:
    """The key's value, to compare: ``value("k") == b"x"``."""
    return _Target(key, "VALUE")


def version(key: str | bytes) -> _Target:
    """The key's version (0: the key does not exist), to compare: ``version("k") == 0``."""
    return _Target(key, "VERSION")


def create_revision(key: str | bytes) -> _Target:
    """The revision that created the key, to compare."""
    return _Target(key, "CREATE")


def mod_revision(key: str | bytes) -> _Target:
    """The revision of the key's last change, to compare."""
    return _Target(key, "MOD")


def put(key: str | bytes, value: str | bytes, *, lease: int = 0) -> Any:
    """Put ``value`` at ``key`` (attached to ``lease`` when given)."""
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=to_bytes(key),
                                                            value=to_bytes(value), lease=lease))


def get(key: str | bytes, *, prefix: bool = False) -> Any:
    """Read ``key`` (every key under it with ``prefix=True``)."""
    k = to_bytes(key)
    return etcdrpc.RequestOp(request_range=etcdrpc.RangeRequest(
        key=k, range_end=prefix_end(k) if prefix else b""))


def delete(key: str | bytes, *, prefix: bool = False) -> Any:
    """Delete ``key`` (every key under it with ``prefix=True``)."""
    k = to_bytes(key)
    return etcdrpc.RequestOp(request_delete_range=etcdrpc.DeleteRangeRequest(
        key=k, range_end=prefix_end(k) if prefix else b""))
