"""A package's public names imported on first use (PEP 562).

pytest imports ``electfsm.testing.plugin`` in every run of every project that installs
electfsm, and with it ``electfsm`` and ``electfsm.testing``: their ``__init__`` must not pull
in grpc, etcd3 or transitions. Each says where its names live; this serves them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, MutableMapping
from typing import Any


def exports(package: str, homes: dict[str, str], namespace: MutableMapping[str, Any],
            ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public name ``n`` lives in module
    ``homes[n]``; a name once looked up is kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
