"""The relay: copies bytes between the client's and the target's connections until both are done.

Each connection gets a :class:`RelayEndpoint` (an ``asyncio.Protocol``, not streams: streams cost
several times more CPU per byte). What one endpoint receives is written to its peer's transport.
A :class:`Relay` owns the two endpoints; it is the one small interface commands use:
``Relay(owner, ...)``, ``relay.target`` as the protocol of the outgoing connection, ``start()``
once the client's reply is written, ``close()`` to end it early.

Half-close: an EOF from one side becomes ``write_eof()`` (shutdown SHUT_WR) on the other side, and
the relay keeps carrying the other direction. A transport is closed as soon as both of its
directions have ended (EOF received and EOF sent): leaving a fully shut-down transport open crashes
uvloop (shared/HAZARDS.md), and closing both sides on the first EOF loses data.

Backpressure: when a transport's write buffer passes its high-water mark, its protocol's
``pause_writing()`` pauses reading on the peer; ``resume_writing()`` resumes it. A slow reader
therefore makes the server hold at most one high-water mark plus one read of data per direction.

A lost connection (reset, error) closes the peer after flushing what is already buffered for it.
When both are lost, the owner's ``relay_finished`` is called once.

Idle timeout: a timer looks at the byte counters every quarter of the timeout, so a session is
closed between 1 and 1.25 timeouts after its last byte; nothing is added to the per-chunk path.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast


class RelayOwner(Protocol):
    """What a relay reports to the session that owns it."""

    def target_connected(self, relay: Relay, transport: asyncio.Transport) -> None:
        """The outgoing connection is up: write the reply now, then call ``relay.start()``."""

    def relay_finished(self, relay: Relay, error: str | None) -> None:
        """Both connections are closed; ``relay.up`` / ``relay.down`` hold the byte counts."""


class RelayEndpoint(asyncio.Protocol):
    """One side of a relayed pair. ``received`` counts the bytes read from this side."""

    __slots__ = ("lost", "peer", "read_done", "received", "relay", "transport", "write_done")

    relay: Relay
    """Set by the :class:`Relay` the endpoint is given to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: RelayEndpoint = self
        self.received = 0
        self.read_done = False
        self.write_done = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.relay._target_made(transport)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def forward(self, data: bytes) -> None:
        """Pass bytes read from this side on (a throttled endpoint may hold some back)."""
        self.emit(data)

    def emit(self, data: bytes) -> None:
        """Write bytes read from this side to the peer's connection (an encoder frames them)."""
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.read_done = True
        self.pass_eof()
        if self.write_done:
            self.transport.close()  # type: ignore[union-attr]
        return True

    def pass_eof(self) -> None:
        """Shut down the peer's write side for this side's EOF; close the peer if it is done."""
        peer = self.peer
        if not peer.lost:
            if not peer.write_done:
                peer.write_done = True
                peer.transport.write_eof()  # type: ignore[union-attr]
            if peer.read_done:
                peer.transport.close()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        if not self.peer.lost:
            self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if not self.peer.lost:
            self.peer.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer.lost or peer.transport is None:
            self.relay._finished(exc)
        else:
            peer.transport.close()


class Relay:
    """A client connection and a target connection relayed both ways."""

    __slots__ = (
        "_done",
        "_error",
        "_idle",
        "_idle_mark",
        "_idle_timer",
        "client",
        "high_water",
        "owner",
        "target",
    )

    def __init__(
        self,
        owner: RelayOwner,
        *,
        high_water: int = 256 * 1024,
        idle_timeout: float = 0.0,
        endpoints: tuple[RelayEndpoint, RelayEndpoint] | None = None,
    ) -> None:
        self.owner = owner
        self.high_water = high_water
        self.client, self.target = endpoints or (RelayEndpoint(), RelayEndpoint())
        self.client.relay = self.target.relay = self
        self.client.peer = self.target
        self.target.peer = self.client
        self._idle = idle_timeout
        self._idle_mark = (-1, 0.0)
        self._idle_timer: asyncio.TimerHandle | None = None
        self._error: str | None = None
        self._done = False

    @property
    def up(self) -> int:
        """Bytes relayed from the client to the target."""
        return self.client.received

    @property
    def down(self) -> int:
        """Bytes relayed from the target to the client."""
        return self.target.received

    def _target_made(self, transport: asyncio.Transport) -> None:
        transport.set_write_buffer_limits(self.high_water, self.high_water // 4)
        self.owner.target_connected(self, transport)

    def start(
        self,
        client: asyncio.Transport,
        first_data: bytes = b"",
        client_eof: bool = False,
    ) -> None:
        """Relay from now on; ``first_data`` is what the client sent after its request."""
        client.set_protocol(self.client)
        client.set_write_buffer_limits(self.high_water, self.high_water // 4)
        self.client.transport = client
        if not client_eof:
            client.resume_reading()  # no read is delivered before the first data is passed on
        if first_data:
            self.client.data_received(first_data)
        if client_eof:
            self.client.eof_received()
        if self._idle > 0:
            self._schedule_idle_check()

    def close(self, error: str | None = None) -> None:
        """End the relay now: both connections are closed (what is buffered is still flushed)."""
        if error and self._error is None:
            self._error = error
        for endpoint in (self.client, self.target):
            if endpoint.transport is not None and not endpoint.lost:
                endpoint.transport.close()

    def abort(self, error: str) -> None:
        """End the relay at once, dropping what is buffered (shutdown deadline)."""
        if self._error is None:
            self._error = error
        for endpoint in (self.client, self.target):
            if endpoint.transport is not None and not endpoint.lost:
                endpoint.transport.abort()

    def reloaded(self) -> None:
        """A reload does not change an established relay (its limits live in shared buckets)."""

    def _finished(self, exc: Exception | None) -> None:
        if self._done:
            return
        self._done = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._error is None and exc is not None:
            self._error = str(exc) or type(exc).__name__
        self.owner.relay_finished(self, self._error)

    def _schedule_idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self._idle / 4, self._check_idle)

    def _check_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        total = self.client.received + self.target.received
        if total != self._idle_mark[0]:
            self._idle_mark = (total, now)
        elif now - self._idle_mark[1] >= self._idle:
            self.close(f"idle for {self._idle:g}s")
            return
        self._schedule_idle_check()
