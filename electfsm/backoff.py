"""Retry pacing shared by the elector's threads."""

from __future__ import annotations

import random


class Backoff:
    """Exponential backoff with full jitter: 50 ms, 100 ms, … up to ``maximum`` seconds."""

    def __init__(self, maximum: float, initial: float = 0.05) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self._next = self.initial
