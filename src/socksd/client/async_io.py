"""The asyncio driver: the one send/receive loop over a stream pair, for every command.

:func:`open_session` connects to the proxy and runs the handshake that
:func:`~socksd.client.handshake.client_handshake` builds; :func:`handshake_over_streams` is the
loop itself (BIND's second reply goes through it again); :func:`target_streams` hands the caller
the streams to the target or peer, RFC 1961-encapsulating ones after GSSAPI. Failures come out as
the client's errors (``proxy_errors``) and the connection is closed on any failure. The loop takes
any object with ``read``/``write``/``drain`` (``ByteReader``, ``ByteWriter``).

GSS-API mechanism steps may ask the KDC for a ticket (blocking), so they run on a thread.
Each read takes everything the reader holds (``_READ_ALL``): what arrived after the reply is then
in the handshake, never left behind in a reader that GSSAPI streams replace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from socksd.client.errors import ProxyError, proxy_errors
from socksd.client.gssapi import encapsulated_streams
from socksd.client.handshake import ClientHandshake, client_handshake
from socksd.client.proxy import Proxy
from socksd.protocol import Address, Command

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class ByteReader(Protocol):
    """What the handshake loop reads from: an ``asyncio.StreamReader`` or any such object."""

    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    """What the handshake loop writes to: an ``asyncio.StreamWriter`` or any such object."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class _Closable(Protocol):
    async def aclose(self) -> None: ...


T = TypeVar("T", bound=_Closable)


class Opening(Generic[T], Awaitable[T]):
    """``await`` it for the object, or ``async with`` it to have the object closed at the end."""

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._value: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    async def __aenter__(self) -> T:
        self._value = await self._coro
        return self._value

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._value is not None:
            await self._value.aclose()


# Larger than anything a StreamReader can hold (2 x its 64 KiB limit + one 256 KiB read), so the
# handshake's last read leaves nothing behind in the reader when GSSAPI streams replace it.
_READ_ALL = 1 << 20


async def open_session(
    p: Proxy,
    command: Command,
    address: Address | Callable[[asyncio.StreamWriter], Address],
    timeout: float,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientHandshake, bytes]:
    """Connect to ``p`` and run the handshake of ``command``: (reader, writer, handshake, early).

    ``address`` may be a function of the connected writer (UDP ASSOCIATE declares the address of
    a UDP socket bound beside it). ``timeout`` bounds connecting and the whole handshake.
    """
    with proxy_errors(f"SOCKS handshake with {p.where}"):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(p.host, p.port)
            try:
                hs = client_handshake(p, command, address(writer) if callable(address) else address)
                early = await handshake_over_streams(reader, writer, hs)
            except BaseException:
                writer.close()
                raise
    return reader, writer, hs, early


async def wait_second_reply(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hs: ClientHandshake,
    timeout: float | None,
) -> bytes:
    """BIND: wait for the second reply (the peer connected); return the early bytes after it."""
    hs.expect_second_reply()
    with proxy_errors("waiting for the BIND peer through the proxy"):
        async with asyncio.timeout(timeout):
            return await handshake_over_streams(reader, writer, hs)


async def handshake_over_streams(
    reader: ByteReader, writer: ByteWriter, hs: ClientHandshake
) -> bytes:
    """Run ``hs`` to completion over a stream pair; return plain bytes read past the reply.

    Any reader and writer with the stream methods will do (the server's upstream connection is
    an ``asyncio.Protocol`` that offers them: ``socksd.server.commands.upstream``)."""
    while True:
        out = hs.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        if hs.done:
            return hs.trailing_data()
        if hs.step_pending:
            try:
                await asyncio.to_thread(hs.run_step)
            except ProxyError:
                writer.write(hs.data_to_send())  # the abort message, as a courtesy
                raise
            continue
        hs.receive_data(await reader.read(_READ_ALL))


def target_streams(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: ClientHandshake, early: bytes
) -> Streams:
    """The streams to the target (or BIND peer) once the handshake is done.

    After GSSAPI: new streams that wrap and unwrap (the old pair must not be used any more).
    """
    if hs.encapsulation is not None:
        return encapsulated_streams(writer, hs.encapsulation, early)
    if early:
        # Target bytes that came in the same read as the reply: the reader's buffer is empty
        # now, so putting them back keeps them ahead of everything read later.
        reader.feed_data(early)
    return reader, writer
