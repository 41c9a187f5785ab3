"""Requests through an upstream SOCKS5 proxy (chaining), with the client library's handshake.

A request whose allow rule (or the global ``upstream``) names an ``[upstreams]`` entry is carried
out by that proxy: socksd connects to it (its address resolved by socksd's resolver, Happy
Eyeballs as for any target: ``connect.open_target``), then runs the client library's handshake
(``socksd.client.handshake.client_handshake``, driven by ``async_io.handshake_over_streams``) on
that same connection, with the upstream's username/password or GSSAPI. The target goes to the
upstream as the client gave it: a domain name stays a name, resolved by the upstream.

The connection is an :class:`UpstreamHolding`: the relay's ``Holding`` protocol that also offers
the ``read``/``write``/``drain`` the handshake loop needs. Once the upstream's reply is in, what
came after it is held like a target's banner, and the command hands it to the session's one relay
(``make_relay``): half-close, backpressure, idle timeout, bandwidth and byte counts are those of a
direct connection. Connecting and the handshake together are bounded by ``connect_timeout``.

After a GSSAPI login to the upstream, its connection carries RFC 1961 frames: ``encapsulate``
puts the client library's ``EncapsulatingTransport`` (plain writes out as frames) in front of it
and an unwrapping protocol under it, so the holding and then the relay see plain bytes (counted
as such), whatever the client's own method (a GSSAPI client's frames are unwrapped on its side).

Failures (:class:`UpstreamFailure` carries the reply code for the client):

| what failed                                              | REP                     |
|----------------------------------------------------------|-------------------------|
| the upstream replied with a failure                      | the upstream's code     |
| the upstream is unreachable (refused, unreachable, its   | 0x01 (the target was    |
|   name does not resolve, no TCP connection in time)      |   not tried)            |
| the login to the upstream failed (or no common method)   | 0x01, and an error log  |
| the upstream broke the protocol or closed during it      | 0x01                    |
| no reply in time once connected (the upstream, or its    | 0x06                    |
|   connection to the target, is slow)                     |                         |

BIND and UDP ASSOCIATE go through an upstream too: ``socksd.server.commands.bind.bind_through``
(the upstream's two replies passed on; :func:`second_reply` waits for the second) and
``socksd.server.commands.udp_upstream`` (datagrams relayed through the upstream's association).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from socksd.client.async_io import handshake_over_streams
from socksd.client.errors import AuthenticationError, ProxyError, ReplyError, proxy_errors
from socksd.client.gssapi import EncapsulatingTransport
from socksd.client.handshake import ClientHandshake, client_handshake
from socksd.protocol import Address, Command, GssapiEncapsulation, GssapiError, ReplyCode
from socksd.server.dataplane.relay import HOLD_LIMIT, Holding

if TYPE_CHECKING:
    from socksd.client.proxy import Proxy
    from socksd.server.commands.base import CommandSession

log = logging.getLogger("socksd.upstream")


@dataclass(frozen=True, slots=True)
class Upstream:
    """An ``[upstreams]`` entry in force: its name and how to reach and log in to it."""

    name: str
    proxy: Proxy

    def __str__(self) -> str:
        return f"upstream {self.name} ({self.proxy.where})"


class UpstreamFailure(Exception):
    """The upstream could not carry the request; ``reply`` is what the client is told."""

    def __init__(self, reply: ReplyCode, message: str) -> None:
        super().__init__(message)
        self.reply = reply


async def routed(
    session: CommandSession,
    address: Address,
    what: str,
    here: Callable[[CommandSession, Address], Awaitable[None]],
    through: Callable[[CommandSession, Upstream, Address], Awaitable[None]],
) -> None:
    """Carry out a request ``here`` or ``through`` the upstream its rule names (a request whose
    route is known before any name is resolved: BIND, UDP ASSOCIATE)."""
    try:
        upstream = session.upstream()
    except UpstreamFailure as e:
        session.fail(e.reply, f"{what}: {e}")
        return
    if upstream is None:
        await here(session, address)
    else:
        await through(session, upstream, address)


class UpstreamHolding(Holding):
    """The connection to an upstream: a byte stream for the handshake, then a ``Holding``."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        super().__init__()
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._wake()

    def eof_received(self) -> bool:
        super().eof_received()
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake()

    # -- the stream methods the handshake loop uses --------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Everything received so far (waiting for something); b"" at EOF."""
        while not self.chunks and not self.eof and not self.lost:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if not self.chunks:
            if self.exc is not None:
                raise self.exc
            return b""
        data = b"".join(self.chunks)
        paused = self.size >= HOLD_LIMIT  # Holding paused reading
        self.chunks.clear()
        self.size = 0
        if paused and self.transport is not None and not self.eof:
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        """Send handshake bytes to the upstream."""
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Handshake messages are small: nothing to wait for, unless the connection is gone."""
        if self.lost:
            raise ConnectionResetError("connection to the upstream lost")

    def close(self) -> None:
        """Drop the connection at once (a failed or abandoned request)."""
        if self.transport is not None:
            self.transport.abort()

    def hold(self, early: bytes) -> None:
        """After the handshake: ``early`` (target bytes read with the reply) is held first."""
        if early:
            self.chunks.insert(0, early)
            self.size += len(early)


Connector = Callable[[Holding], Awaitable[object]]
"""Opens the TCP connection to the upstream proxy with the given protocol (``connect.py``)."""


async def open_upstream(
    upstream: Upstream, command: Command, address: Address, timeout: float, connect: Connector
) -> tuple[UpstreamHolding, ClientHandshake, bytes]:
    """Connect to ``upstream`` (``connect`` opens the TCP connection) and run the handshake of
    ``command`` to ``address`` up to its (first) reply, in at most ``timeout``: the connection,
    the handshake and the bytes read after the reply. Raises :class:`UpstreamFailure`."""
    held = UpstreamHolding()
    connected = False
    try:
        async with asyncio.timeout(timeout):
            await connect(held)
            connected = True
            hs = client_handshake(upstream.proxy, command, address)
            with proxy_errors(f"SOCKS handshake with {upstream}"):
                early = await handshake_over_streams(held, held, hs)
    except Exception as e:
        held.close()
        raise _failure(upstream, e, connected=connected, timeout=timeout) from None
    except BaseException:
        held.close()
        raise
    return held, hs, early


async def connect_upstream(
    upstream: Upstream, address: Address, timeout: float, connect: Connector
) -> tuple[UpstreamHolding, Address]:
    """CONNECT to ``address`` through ``upstream``: the connection, holding what the target sent
    after the reply, and the upstream's BND address."""
    held, hs, early = await open_upstream(upstream, Command.CONNECT, address, timeout, connect)
    relay_ready(held, hs, early)
    return held, hs.replies[0].address


async def second_reply(
    upstream: Upstream, held: UpstreamHolding, hs: ClientHandshake, timeout: float
) -> Address:
    """BIND: wait at most ``timeout`` for the upstream's second reply (its peer connected); the
    peer's address. Then ``held`` holds what the peer sent after it. Raises UpstreamFailure."""
    hs.expect_second_reply()
    try:
        async with asyncio.timeout(timeout):
            with proxy_errors(f"BIND through {upstream}"):
                early = await handshake_over_streams(held, held, hs)
    except TimeoutError:
        held.close()
        raise UpstreamFailure(
            ReplyCode.TTL_EXPIRED, f"BIND: no peer connected within {timeout:g}s ({upstream})"
        ) from None
    except Exception as e:
        held.close()
        raise _failure(upstream, e, connected=True, timeout=timeout) from None
    except BaseException:
        held.close()
        raise
    relay_ready(held, hs, early)
    return hs.replies[1].address


def relay_ready(held: UpstreamHolding, hs: ClientHandshake, early: bytes) -> None:
    """The handshake is over: ``early`` is held first; after GSSAPI, the frames are unwrapped
    and wrapped from now on (``encapsulate``)."""
    codec = hs.encapsulation
    if codec is None:
        held.hold(early)
    else:
        encapsulate(held, codec, early)


class _Unwrapping(asyncio.Protocol):
    """On an upstream connection after GSSAPI: RFC 1961 frames in, plain bytes to ``inner``
    (the holding, then the relay's endpoint). A frame failing its check ends the connection."""

    def __init__(
        self, codec: GssapiEncapsulation, inner: asyncio.Protocol, transport: asyncio.Transport
    ) -> None:
        self.codec = codec
        self.inner = inner
        self.transport = transport
        self.error: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.codec.receive_data(data)
        self.decode()

    def decode(self) -> None:
        """Pass on the plain bytes of every complete frame."""
        try:
            plain = self.codec.read()
        except GssapiError as e:
            log.warning("GSSAPI frame from an upstream failed: %s", e)
            self.error = ConnectionError(f"GSSAPI from the upstream: {e}")
            self.transport.abort()
            return
        if plain:
            self.inner.data_received(plain)

    def eof_received(self) -> bool | None:
        if self.codec.buffered:
            self.error = ConnectionError("the upstream closed in the middle of a GSSAPI message")
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc or self.error)


class _EncapsulatedTransport(EncapsulatingTransport):
    """The upstream connection as the relay sees it: writes wrapped, reads unwrapped; setting
    the protocol sets what the unwrapped bytes go to."""

    def __init__(self, transport: asyncio.Transport, unwrapping: _Unwrapping) -> None:
        super().__init__(transport, unwrapping.codec)
        self._unwrapping = unwrapping

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._unwrapping.inner = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._unwrapping.inner


def encapsulate(held: UpstreamHolding, codec: GssapiEncapsulation, early: bytes) -> None:
    """After a GSSAPI handshake with the upstream: ``held`` (and later the relay) reads and
    writes plain bytes, RFC 1961 frames on the wire. ``early``: plain bytes decoded with the
    reply."""
    raw = held.transport
    assert raw is not None
    unwrapping = _Unwrapping(codec, held, raw)
    raw.set_protocol(unwrapping)
    held.transport = _EncapsulatedTransport(raw, unwrapping)
    held.hold(early)
    if codec.buffered:
        unwrapping.decode()


def _failure(
    upstream: Upstream, e: Exception, *, connected: bool, timeout: float
) -> UpstreamFailure:
    """The reply code (and log line) for what went wrong with the upstream."""
    if isinstance(e, ReplyError):
        return UpstreamFailure(e.reply, f"{upstream} replied {e.reply.value:#04x}")
    if isinstance(e, AuthenticationError):
        log.error("login to %s failed: %s", upstream, e)
        return UpstreamFailure(ReplyCode.GENERAL_FAILURE, f"{upstream}: login failed: {e}")
    if isinstance(e, TimeoutError):
        if connected:
            return UpstreamFailure(
                ReplyCode.TTL_EXPIRED, f"{upstream}: no reply within {timeout:g}s"
            )
        log.warning("%s unreachable: no connection within %gs", upstream, timeout)
        return UpstreamFailure(
            ReplyCode.GENERAL_FAILURE, f"{upstream} unreachable: connect timeout after {timeout:g}s"
        )
    if not connected:
        log.warning("%s unreachable: %s", upstream, e)
        return UpstreamFailure(ReplyCode.GENERAL_FAILURE, f"{upstream} unreachable: {e}")
    if isinstance(e, ProxyError):
        return UpstreamFailure(ReplyCode.GENERAL_FAILURE, str(e))
    return UpstreamFailure(ReplyCode.GENERAL_FAILURE, f"{upstream}: {e}")
