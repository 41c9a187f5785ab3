"""Per-user bandwidth: relay endpoints that forward only what the user's token bucket allows.

``socksd.server.dataplane.terms.make_relay`` gives a session :class:`ThrottledEndpoint` s when its user has
a ``[bandwidth]`` rate (plain endpoints otherwise: nothing added to their per-chunk path), for
every command alike, GSSAPI-encapsulated relays included. Both directions are limited, each by
its own bucket shared by all sessions of the user (``socksd.limits``). The bytes counted are the
plain bytes read (after unwrapping, before wrapping), whatever their framing on the wire.

A :class:`ThrottledEndpoint` forwards what the bucket grants of each read at once. The rest is
held, reading from that side is paused (``pause_reading``), and a ``call_later`` timer releases the
held bytes in pieces of a quarter of the bucket's capacity as tokens come in, then resumes reading.
There is no polling: each timer waits exactly as long as the bucket needs. A session holds at most
one read of data per direction besides the write buffers, as an unlimited one does.

Reading on a side is paused for two reasons, each with its flag: the other side's write buffer is
full (``blocked``, backpressure as in ``socksd.server.dataplane.relay``) or data is held; it resumes only when
neither holds. An EOF or a lost connection that arrives while data is held waits until the data is
delivered, so half-close and "nothing is lost" hold as in the plain relay; the transport is still
closed as soon as both its directions have ended (docs/design-notes.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

from socksd.limits import TokenBucket
from socksd.server.dataplane.relay import RelayEndpoint

MIN_DELAY = 0.001
"""Shortest timer: a bucket that another session just emptied is not asked again at once."""


class ThrottledEndpoint(RelayEndpoint):
    """A relay endpoint that forwards what it reads no faster than ``bucket`` allows."""

    __slots__ = (
        "blocked",
        "bucket",
        "clock",
        "eof_pending",
        "held",
        "lost_exc",
        "lost_pending",
        "timer",
    )

    def __init__(self, bucket: TokenBucket, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.bucket = bucket
        self.clock = clock  # the buckets' time; tests pass a clock they advance
        self.held = b""
        self.timer: asyncio.TimerHandle | None = None
        self.blocked = False
        self.eof_pending = False
        self.lost_pending = False
        self.lost_exc: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.forward(data)

    def moved(self) -> int:
        """Bytes passed on: held bytes count once they go out, so a session whose data waits
        for its bucket is not idle while that data trickles out."""
        return self.received - len(self.held)

    def forward(self, data: bytes) -> None:
        if self.peer.lost:  # gone while its own held data still goes out: nothing to write to
            return
        if self.held:  # a read already under way when reading was paused
            self.held += data
            return
        granted = self.bucket.take(len(data), self.clock())
        if granted == len(data):
            self.emit(data)
            return
        if granted:
            self.emit(data[:granted])
        self.held = data[granted:]
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._schedule()

    def eof_received(self) -> bool:
        if not self.held:
            return super().eof_received()
        self.read_done = True
        self.eof_pending = True  # passed on once the held data is delivered
        if self.write_done:
            self.transport.close()  # type: ignore[union-attr]
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.held and not self.peer.lost:
            self.lost = True
            self.lost_pending = True  # the peer is closed once the held data is delivered
            self.lost_exc = exc
            return
        self._cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        peer = cast(ThrottledEndpoint, self.peer)
        peer.blocked = True
        if not peer.lost:
            peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        peer = cast(ThrottledEndpoint, self.peer)
        peer.blocked = False
        if peer.lost and not peer.lost_pending:
            return
        if peer.held:
            if peer.timer is None:
                peer._schedule()
        elif not peer.lost:
            peer.transport.resume_reading()  # type: ignore[union-attr]

    # -- releasing held data -----------------------------------------------------------------

    def _schedule(self) -> None:
        delay = self.bucket.wait(self._quantum(), self.clock())
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(delay, MIN_DELAY), self._release)

    def _quantum(self) -> int:
        return min(len(self.held), max(int(self.bucket.capacity) // 4, 1))

    def _cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _release(self) -> None:
        self.timer = None
        peer = self.peer
        if peer.lost:
            self.held = b""
            self._delivered()
            return
        if self.blocked:
            return  # resume_writing() schedules the rest
        granted = self.bucket.take(self._quantum(), self.clock())
        if granted:
            held = self.held
            self.emit(held[:granted])
            self.held = held[granted:]
        if self.held:
            self._schedule()
        else:
            self._delivered()

    def _delivered(self) -> None:
        """Everything read has been passed on: carry out what waited for that."""
        if self.eof_pending:
            self.eof_pending = False
            self.pass_eof()
        if self.lost_pending:
            self.lost_pending = False
            super().connection_lost(self.lost_exc)
            return
        if not self.lost and not self.read_done and not self.blocked:
            self.transport.resume_reading()  # type: ignore[union-attr]
