"""Idle timeouts: end a session that moved nothing for a while, for relays and UDP associations.

An :class:`IdleWatch` looks at a byte or datagram counter every quarter of the timeout, so a
session ends between 1 and 1.25 timeouts after its last traffic; nothing is added to the
per-chunk or per-datagram path, and one timer a session is all it costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class IdleWatch:
    """Calls ``expire(reason)`` once ``activity()`` has not changed for ``timeout`` seconds."""

    __slots__ = ("_activity", "_expire", "_mark", "_reason", "_timeout", "_timer")

    def __init__(
        self,
        timeout: float,
        activity: Callable[[], int],
        expire: Callable[[str], None],
        what: str = "idle",
    ) -> None:
        self._timeout = timeout
        self._activity = activity
        self._expire = expire
        self._reason = f"{what} for {timeout:g}s"
        self._mark = (-1, 0.0)
        self._timer: asyncio.TimerHandle | None = None
        self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout / 4, self._check)

    def _check(self) -> None:
        now = asyncio.get_running_loop().time()
        total = self._activity()
        if total != self._mark[0]:
            self._mark = (total, now)
        elif now - self._mark[1] >= self._timeout:
            self._timer = None
            self._expire(self._reason)
            return
        self._schedule()

    def cancel(self) -> None:
        """Stop watching (the session ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
