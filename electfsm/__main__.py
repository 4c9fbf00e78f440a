"""``python -m electfsm``: the ``electfsm`` command (see :mod:`electfsm.cli`)."""

from __future__ import annotations

from electfsm.cli import entry

if __name__ == "__main__":
    entry()
