"""Idle timeouts: end a session that moved nothing for a while, for relays and UDP associations.

An :class:`IdleWatch` looks at a byte or datagram counter every quarter of the timeout, so a
session ends between 1 and 1.25 timeouts after its last traffic; nothing is added to the
per-chunk or per-datagram path, and one timer a session is all it costs.

How long a session has been idle, for ``socksd sessions``, costs nothing per byte either: for a
TCP connection the kernel knows when data last arrived (:func:`tcp_quiet_for`, ``TCP_INFO``); for
a UDP association an :class:`ActivityMark` remembers when its datagram counter was first seen at
its current value, by its idle watch or by a query, so it is exact to within the time between two
looks.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52
"""Of ``tcpi_last_data_recv`` (ms since data last arrived) in Linux's ``struct tcp_info``: eight
one-byte fields, then nine ``__u32`` (rto .. fackets), last_data_sent, last_ack_sent."""


def tcp_quiet_for(conn: asyncio.BaseTransport | socket.socket | None) -> float | None:
    """Seconds since data last arrived on a TCP connection (kernel ``TCP_INFO``), given as a
    transport or as a socket (the splice relay's); None when the platform or it cannot tell."""
    if conn is None or _TCP_INFO is None:
        return None
    if isinstance(conn, socket.socket):
        sock = conn
    elif conn.is_closing():
        return None
    else:
        sock = conn.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 104)
    except (OSError, ValueError):
        return None
    if len(info) < _LAST_DATA_RECV_OFFSET + 4:
        return None
    (ms,) = _TCP_INFO_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)
    return float(ms) / 1000.0


class ActivityMark:
    """When a counter was first seen at its current value: it has not moved since, as far as
    anyone looked."""

    __slots__ = ("since", "total")

    def __init__(self, total: int = -1, since: float = 0.0) -> None:
        self.total = total
        self.since = since

    def see(self, total: int, now: float) -> float:
        """Look at the counter at ``now``; return the seconds it has stood still (0 if it moved
        since the last look)."""
        if total != self.total:
            self.total, self.since = total, now
        return now - self.since


class IdleWatch:
    """Calls ``expire(reason)`` once ``activity()`` has not changed for ``timeout`` seconds."""

    __slots__ = ("_activity", "_expire", "_reason", "_timeout", "_timer", "mark")

    def __init__(
        self,
        timeout: float,
        activity: Callable[[], int],
        expire: Callable[[str], None],
        what: str = "idle",
        mark: ActivityMark | None = None,
    ) -> None:
        self._timeout = timeout
        self._activity = activity
        self._expire = expire
        self._reason = f"{what} for {timeout:g}s"
        self.mark = mark if mark is not None else ActivityMark()
        """Shared with whoever else looks at the counter (a query of the live sessions)."""
        self._timer: asyncio.TimerHandle | None = None
        self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout / 4, self._check)

    def _check(self) -> None:
        now = asyncio.get_running_loop().time()
        if self.mark.see(self._activity(), now) >= self._timeout:
            self._timer = None
            self._expire(self._reason)
            return
        self._schedule()

    def cancel(self) -> None:
        """Stop watching (the session ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
