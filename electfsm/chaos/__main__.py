"""``python -m electfsm.chaos``: the randomized fault runner."""

import sys

from electfsm.chaos.lab import main

sys.exit(main())
