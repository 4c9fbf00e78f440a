"""``python -m electfsm``: the ``electfsm`` command (see :mod:`electfsm.cli.main`)."""

from __future__ import annotations

from electfsm.cli.main import entry

if __name__ == "__main__":
    entry()
