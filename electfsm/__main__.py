"""``python -m electfsm``: the ``electfsm`` command (see :mod:`electfsm.cli`)."""

from __future__ import annotations

import sys

from electfsm.cli import main

if __name__ == "__main__":
    sys.exit(main())
