"""``python -m electfsm.chaos``: the randomized fault runner."""

import sys

from electfsm.chaos.runner import main

sys.exit(main())
