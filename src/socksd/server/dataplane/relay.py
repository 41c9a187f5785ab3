"""The relay: copies bytes between the client's and the target's connections until both are done.

Each connection gets a :class:`RelayEndpoint` (an ``asyncio.Protocol``, not streams: streams cost
several times more CPU per byte). What one endpoint receives is written to its peer's transport.
A :class:`Relay` owns the two endpoints; it is the one small interface commands use: the outgoing
connection is opened with a :class:`Holding` protocol, the command writes its reply, then
``relay.start(client, target, ...)`` relays both; ``close()`` ends it early.

Holding: targets that speak first (SSH, SMTP and FTP banners, a bulk source) may deliver bytes as
soon as the connection is up, before the command has resumed and written the SOCKS reply. The
:class:`Holding` protocol keeps them (and an EOF or a loss) until ``start()`` hands them to the
relay, so the reply always comes first (docs/design-notes.md) and the command, not a callback,
decides when the reply is written. It holds at most one read and ``HOLD_LIMIT`` bytes (then
reading pauses).

Half-close: an EOF from one side becomes ``write_eof()`` (shutdown SHUT_WR) on the other side, and
the relay keeps carrying the other direction. A transport is closed as soon as both of its
directions have ended (EOF received and EOF sent): leaving a fully shut-down transport open crashes
uvloop (docs/design-notes.md), and closing both sides on the first EOF loses data.

Backpressure: when a transport's write buffer passes its high-water mark, its protocol's
``pause_writing()`` pauses reading on the peer; ``resume_writing()`` resumes it. A slow reader
therefore makes the server hold at most one high-water mark plus one read of data per direction.

A lost connection (reset, error) closes the peer after flushing what is already buffered for it.
When both are lost, the owner's ``relay_finished`` is called once.

Idle timeout (``socksd.server.dataplane.idle``): the loop's sweep for that timeout looks at the
byte counters every quarter of the timeout, so a session is closed between 1 and 1.25 timeouts
after its last byte; nothing is added to the per-chunk path and no timer to the session.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from socksd.server.dataplane.idle import IdleSweep, tcp_quiet_for, watch_idle

HOLD_LIMIT = 64 * 1024
"""Bytes an outgoing connection may deliver before its relay starts, until reading pauses."""


class RelayOwner(Protocol):
    """What a relay reports to the session that owns it."""

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

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def moved(self) -> int:
        """Bytes from this side passed on so far: what the idle timeout watches."""
        return self.received

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


class Holding(asyncio.Protocol):
    """An outgoing connection until its relay starts: what it delivers is kept for the relay."""

    __slots__ = ("chunks", "eof", "exc", "lost", "size", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.eof = False
        self.lost = False
        self.exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= HOLD_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the relay decides when the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.exc = exc


class Relay:
    """A client connection and a target connection relayed both ways."""

    __slots__ = (
        "_done",
        "_error",
        "_idle",
        "_idle_sweep",
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
        self._idle_sweep: IdleSweep | None = None
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

    def start(
        self,
        client: asyncio.Transport,
        held: Holding,
        first_data: bytes = b"",
        client_eof: bool = False,
    ) -> None:
        """Relay from now on (the reply is written): ``held`` is the outgoing connection with
        what it delivered so far, ``first_data`` what the client sent after its request."""
        target = held.transport
        assert target is not None
        target.set_protocol(self.target)
        target.set_write_buffer_limits(self.high_water, self.high_water // 4)
        self.target.transport = target
        client.set_protocol(self.client)
        client.set_write_buffer_limits(self.high_water, self.high_water // 4)
        self.client.transport = client
        self._client_first(first_data, client_eof)
        self._release(held)
        if self._idle > 0:
            self._idle_sweep = watch_idle(self, self._idle)

    def _client_first(self, first_data: bytes, client_eof: bool) -> None:
        """Pass on what the client sent after its request (and its EOF, if it came)."""
        client = self.client
        if not client_eof:
            client.transport.resume_reading()  # type: ignore[union-attr]
        if first_data:
            client.data_received(first_data)
        if client_eof:
            client.eof_received()

    def _release(self, held: Holding) -> None:
        """Pass on what the outgoing connection delivered before the relay started."""
        target = self.target
        for chunk in held.chunks:
            if target.lost:
                break
            target.data_received(chunk)
        if held.lost:
            target.connection_lost(held.exc)
            return
        if held.eof:
            target.eof_received()
        elif held.size >= HOLD_LIMIT:
            target.transport.resume_reading()  # type: ignore[union-attr]

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

    def quiet_for(self) -> float | None:
        """Seconds since data last arrived on either connection (None: unknown)."""
        quiet = [tcp_quiet_for(e.transport) for e in (self.client, self.target)]
        known = [q for q in quiet if q is not None]
        return min(known) if known else None

    def reloaded(self) -> None:
        """A reload does not change an established relay (its limits live in shared buckets)."""

    def _finished(self, exc: Exception | None) -> None:
        if self._done:
            return
        self._done = True
        if self._idle_sweep is not None:
            self._idle_sweep.discard(self)
        if self._error is None and exc is not None:
            self._error = str(exc) or type(exc).__name__
        self.owner.relay_finished(self, self._error)

    def traffic(self) -> int:
        """Bytes passed on both ways so far: what the idle timeout watches."""
        return self.client.moved() + self.target.moved()
