"""Deadlines of one fixed length shared by many sessions, kept by one timer.

Every session in its handshake has a deadline (``handshake_timeout``), and so has every CONNECT
being opened without a task (``connect_timeout``). A timer per session would cost a timer
handle (on uvloop a libuv timer: allocated, started, stopped and closed again) for a deadline that
almost never fires. A :class:`DeadlineQueue` holds all deadlines of one length in a dict in the
order they were added, which, as every one is the same length from a monotonic clock, is the
order they fall due: adding or dropping one is a dict operation, and one timer, armed for the
earliest deadline only while the queue is not empty, calls ``expire(key)`` for each key that is
due. Deadlines are exact (no coarser than the loop's timers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class DeadlineQueue(Generic[K]):
    """Keys that expire ``timeout`` seconds after they were added, unless discarded first."""

    __slots__ = ("_due", "_expire", "_timer", "timeout")

    def __init__(self, timeout: float, expire: Callable[[K], None]) -> None:
        self.timeout = timeout
        self._expire = expire
        self._due: dict[K, float] = {}
        """Key -> its deadline (``time.monotonic()``), in the order added: earliest first."""
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def add(self, key: K) -> None:
        """``expire(key)`` in ``timeout`` seconds, unless :meth:`discard` comes first."""
        due = self._due
        if key in due:  # a new deadline goes to the end, where its time belongs
            del due[key]
        due[key] = time.monotonic() + self.timeout
        if self._timer is None:
            self._arm(self.timeout)

    def discard(self, key: K) -> None:
        """Drop the deadline of ``key`` (none: nothing happens). The timer stays armed; it
        finds the earliest remaining deadline when it fires."""
        self._due.pop(key, None)

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        due = self._due
        now = time.monotonic()
        expired: list[K] = []
        for key, deadline in due.items():
            if deadline > now:
                break
            expired.append(key)
        for key in expired:
            del due[key]
        if due:
            self._arm(next(iter(due.values())) - now)
        for key in expired:
            try:
                self._expire(key)
            except Exception as e:  # one failing expiry must not keep the others alive
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "deadline expiry failed", "exception": e}
                )

    def close(self) -> None:
        """Forget every deadline and stop the timer."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
