"""The chaos schedule: drawn from the seed alone, over every kind or the kinds asked for."""

from __future__ import annotations

import pytest

from electfsm.chaos.runner import CLASSIC_KINDS, KINDS, draw_schedule


def test_the_same_seed_draws_the_same_schedule_and_kinds_restrict_it() -> None:
    assert draw_schedule(5, 600, 5) == draw_schedule(5, 600, 5)
    every = {f["kind"] for f in draw_schedule(5, 3600, 5)}
    assert every == set(KINDS)
    classic = {f["kind"] for f in draw_schedule(5, 3600, 5, kinds=CLASSIC_KINDS)}
    assert classic == set(CLASSIC_KINDS)
    only = draw_schedule(5, 120, 3, kinds=["pause_write", "stale_control"])
    assert only and {f["kind"] for f in only} <= {"pause_write", "stale_control"}
    with pytest.raises(ValueError, match="unknown fault kinds"):
        draw_schedule(5, 60, 3, kinds=["gc"])
