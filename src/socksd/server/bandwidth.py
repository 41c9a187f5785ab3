"""Per-user bandwidth: a relay whose endpoints forward only what the user's token bucket allows.

:func:`relay_for` is how a command gets its relay: a plain :class:`Relay` for sessions without a
limit (nothing added to their per-chunk path), a :class:`ThrottledRelay` for users with a
``[bandwidth]`` rate. Both directions are limited, each by its own bucket shared by all sessions of
the user (``socksd.limits``).

A :class:`ThrottledEndpoint` forwards what the bucket grants of each read at once. The rest is
held, reading from that side is paused (``pause_reading``), and a ``call_later`` timer releases the
held bytes in pieces of a quarter of the bucket's capacity as tokens come in, then resumes reading.
There is no polling: each timer waits exactly as long as the bucket needs. A session holds at most
one read of data per direction besides the write buffers, as an unlimited one does.

Reading on a side is paused for two reasons, each with its flag: the other side's write buffer is
full (``blocked``, backpressure as in ``socksd.server.relay``) or data is held; it resumes only when
neither holds. An EOF or a lost connection that arrives while data is held waits until the data is
delivered, so half-close and "nothing is lost" hold as in the plain relay; the transport is still
closed as soon as both its directions have ended (shared/HAZARDS.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from socksd.limits import TokenBucket
from socksd.server.relay import Relay, RelayEndpoint, RelayOwner

if TYPE_CHECKING:
    from socksd.server.session import Session

MIN_DELAY = 0.001
"""Shortest timer: a bucket that another session just emptied is not asked again at once."""


def relay_for(session: Session) -> Relay:
    """The relay for ``session``: idle timeout from its rule (else the config's), and limited
    when its user has a bandwidth limit."""
    ctx = session.ctx
    config = ctx.config
    admission = session.admission
    idle = config.idle_timeout
    if admission is not None and admission.idle_timeout is not None:
        idle = admission.idle_timeout
    user = session.record.user if session.record is not None else None
    buckets = ctx.limits.buckets_for(user, time.monotonic()) if user is not None else None
    if buckets is None:
        return Relay(session, high_water=config.relay_buffer, idle_timeout=idle)
    return ThrottledRelay(session, buckets, high_water=config.relay_buffer, idle_timeout=idle)


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

    def __init__(
        self, relay: Relay, bucket: TokenBucket, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(relay)
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
        if self.peer.lost:  # gone while its own held data still goes out: nothing to write to
            return
        if self.held:  # a read already under way when reading was paused
            self.held += data
            return
        granted = self.bucket.take(len(data), self.clock())
        if granted == len(data):
            self.peer.transport.write(data)  # type: ignore[union-attr]
            return
        if granted:
            self.peer.transport.write(data[:granted])  # type: ignore[union-attr]
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
            peer.transport.write(held[:granted])  # type: ignore[union-attr]
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


class ThrottledRelay(Relay):
    """A relay whose two directions are limited by ``buckets`` (client to target, the reverse)."""

    __slots__ = ()

    def __init__(
        self,
        owner: RelayOwner,
        buckets: tuple[TokenBucket, TokenBucket],
        *,
        high_water: int = 256 * 1024,
        idle_timeout: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(owner, high_water=high_water, idle_timeout=idle_timeout)
        self.client = ThrottledEndpoint(self, buckets[0], clock)
        self.target = ThrottledEndpoint(self, buckets[1], clock)
        self.client.peer = self.target
        self.target.peer = self.client

    def start(
        self, client: asyncio.Transport, first_data: bytes = b"", client_eof: bool = False
    ) -> None:
        super().start(client, first_data, client_eof)
        if cast(ThrottledEndpoint, self.client).held and not self.client.lost:
            client.pause_reading()  # start() resumed reading; the first data is still held
