"""Idle timeouts: end a session that moved nothing for a while, for relays and UDP associations.

An :class:`IdleSweep` looks at the byte or datagram counter of every session with the same
timeout every quarter of that timeout, so a session ends between 1 and 1.25 timeouts after its
last traffic. Nothing is added to the per-chunk or per-datagram path, and the sessions of a loop
share one timer per timeout: an idle session holds no timer of its own (a timer per session
cost a few hundred bytes and a heap operation each quarter).

How long a session has been idle, for ``socksd sessions``, costs nothing per byte either: for a
TCP connection the kernel knows when data last arrived (:func:`tcp_quiet_for`, ``TCP_INFO``); for
a UDP association an :class:`ActivityMark` remembers when its datagram counter was first seen at
its current value, by the idle sweep or by a query, so it is exact to within the time between two
looks.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Protocol

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


class Idling(Protocol):
    """What an idle timeout watches: a relay or a UDP association."""

    def traffic(self) -> int:
        """A counter that moves with the session's traffic (bytes or datagrams)."""

    def close(self, reason: str | None = None, /) -> None:
        """End the session for ``reason``."""


class SweepLoop(Protocol):
    """What a sweep needs of its event loop: its clock and its timers."""

    def time(self) -> float: ...

    def call_later(
        self, delay: float, callback: Callable[[], object], /
    ) -> asyncio.TimerHandle: ...


class IdleSweep:
    """The idle timeouts of every session of one loop with one timeout: one timer for all.

    Every quarter of the timeout the sweep looks at each watched counter (``Idling.traffic``)
    and closes those that have not moved for the whole timeout. Between two looks a session
    costs nothing: no timer, no callback, no per-byte bookkeeping; watched, it costs one entry
    here (the session and its :class:`ActivityMark`). The timer stops when nothing is watched.
    """

    __slots__ = ("_key", "_loop", "_period", "_reason", "_timeout", "_timer", "watched")

    def __init__(
        self, loop: SweepLoop, timeout: float, what: str = "idle", key: object = None
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._period = timeout / 4
        self._reason = f"{what} for {timeout:g}s"
        self._key = key
        """Its key in the loop's registry (:func:`watch_idle`), so it leaves once empty."""
        self._timer: asyncio.TimerHandle | None = None
        self.watched: dict[Idling, ActivityMark] = {}
        """Each session watched, and when its counter was last seen to move."""

    def add(self, item: Idling, mark: ActivityMark | None = None) -> None:
        """Watch ``item`` from now on. ``mark`` is shared with whoever else looks at its counter
        (a query of the live sessions); by default one that starts now."""
        if mark is None:
            mark = ActivityMark(item.traffic(), self._loop.time())
        self.watched[item] = mark
        if self._timer is None:
            self._timer = self._loop.call_later(self._period, self._sweep)

    def discard(self, item: Idling) -> None:
        """Stop watching ``item`` (its session ended); the last one stops the timer."""
        if self.watched.pop(item, None) is not None and not self.watched:
            self._stop()

    def _sweep(self) -> None:
        # The next look first: a failure below must not end the watch of every other session.
        self._timer = self._loop.call_later(self._period, self._sweep)
        now, timeout = self._loop.time(), self._timeout
        expired = [i for i, mark in self.watched.items() if mark.see(i.traffic(), now) >= timeout]
        for item in expired:
            self.discard(item)  # (the last one stops the timer)
            item.close(self._reason)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if _SWEEPS.get(self._key) is self:
            del _SWEEPS[self._key]


_SWEEPS: dict[object, IdleSweep] = {}
"""The sweeps in use, by (loop, timeout, what); each leaves when it watches nothing."""


def watch_idle(
    item: Idling, timeout: float, what: str = "idle", mark: ActivityMark | None = None
) -> IdleSweep:
    """Close ``item`` with ``"WHAT for TIMEOUTs"`` once its traffic has not moved for
    ``timeout`` seconds (between 1 and 1.25 timeouts after its last traffic), by the running
    loop's sweep for that timeout. Returns the sweep, to ``discard(item)`` from when it ends."""
    loop = asyncio.get_running_loop()
    key = (loop, timeout, what)
    sweep = _SWEEPS.get(key)
    if sweep is None:
        sweep = _SWEEPS[key] = IdleSweep(loop, timeout, what, key)
    sweep.add(item, mark)
    return sweep
