"""Helpers shared by unit and end-to-end tests: waiting for a condition, and a clock tests advance.

Tests wait for what they expect (a log line, a state, a count) by polling it under a deadline, never
by sleeping a fixed time and hoping: a loaded machine makes them slower, not wrong. Rates are
checked against a :class:`FakeClock` the code under test reads, never against the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_INTERVAL = 0.01
"""Seconds between two looks at a condition."""


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; return whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


async def await_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = POLL_INTERVAL
) -> bool:
    """:func:`wait_for` inside an event loop: the loop runs between two looks."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


class FakeClock:
    """A monotonic clock that moves only when the test calls :meth:`advance`."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
