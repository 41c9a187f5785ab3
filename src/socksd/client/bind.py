"""BIND through a SOCKS5 proxy: the proxy listens for one connection from a peer, for the client.

The usual use is a protocol where the other side connects back (FTP active mode): ask the proxy
to listen, tell the peer the address from the first reply, then accept its connection.

>>> async with socksd.client.bind("127.0.0.1:1080", ("ftp.example", 0)) as listener:
...     send_port_command(listener.address)      # where the peer must connect
...     reader, writer = await listener.accept()  # the second reply: the peer is connected
...     print(listener.peer)

``peer`` is the host expected to connect (a name is resolved by the proxy); ``("0.0.0.0", 0)``
accepts any peer. A BND.ADDR of 0.0.0.0 or :: in the first reply (some servers send it) is
replaced by the proxy's own address. ``create_bind`` is the blocking version over plain sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

from socksd.client.connect import ProxyLike, _proxy, connect_to_proxy, handshake_errors
from socksd.client.errors import ProxyConnectionError, ProxyError, ProxyTimeoutError
from socksd.client.handshake import ClientHandshake
from socksd.protocol import Address, Command, Reply, State
from socksd.protocol.udp import is_unspecified

T = TypeVar("T", bound="_Closable")


class _Closable:
    async def aclose(self) -> None:
        raise NotImplementedError


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


def advertised(reply: Reply, proxy_host: str) -> tuple[str, int]:
    """(host, port) of a reply's BND, with an unspecified address replaced by the proxy's."""
    if is_unspecified(reply.address):
        return proxy_host, reply.address.port
    return reply.address.host, reply.address.port


class BindListener(_Closable):
    """A BIND in progress: ``address`` is where the peer must connect; ``accept()`` waits."""

    def __init__(
        self,
        hs: ClientHandshake,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: tuple[str, int],
    ) -> None:
        self._hs = hs
        self._reader = reader
        self._writer = writer
        self.address = address
        self.peer: tuple[str, int] | None = None

    async def accept(
        self, timeout: float | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Wait for the second reply (the peer connected); return streams to the peer."""
        if self.peer is not None:
            raise ProxyError("a BIND accepts one connection only")
        hs = self._hs
        hs.expect_second_reply()
        try:
            async with asyncio.timeout(timeout):
                while not hs.done:
                    hs.receive_data(await self._reader.read(4096))
        except ProxyError:
            raise
        except TimeoutError:
            raise ProxyTimeoutError("no peer connected through the proxy in time") from None
        except OSError as e:
            raise ProxyConnectionError(f"proxy connection failed: {e}") from e
        second = hs.replies[1]
        self.peer = (second.address.host, second.address.port)
        early = hs.trailing_data()
        if early:
            self._reader.feed_data(early)  # the buffer is empty: the order is kept
        return self._reader, self._writer

    async def aclose(self) -> None:
        """Close the connection to the proxy (before ``accept``: cancels the BIND)."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def _open_bind(proxy: ProxyLike, peer: tuple[str, int], timeout: float) -> BindListener:
    p = _proxy(proxy)
    hs = ClientHandshake(Command.BIND, Address.of(*peer), username=p.username, password=p.password)
    hs.first_reply_only()
    with handshake_errors(p):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(p.host, p.port)
            try:
                while not hs.done:
                    out = hs.data_to_send()
                    if out:
                        writer.write(out)
                        await writer.drain()
                    if not hs.done:
                        hs.receive_data(await reader.read(4096))
            except BaseException:
                writer.close()
                raise
    return BindListener(hs, reader, writer, advertised(hs.replies[0], p.host))


def bind(
    proxy: ProxyLike,
    peer: tuple[str, int] = ("0.0.0.0", 0),
    *,
    timeout: float = 10.0,
) -> Opening[BindListener]:
    """Ask ``proxy`` to listen for a connection from ``peer``; ``timeout`` bounds the handshake.

    ``await`` it for a :class:`BindListener`, or use ``async with`` to close it at the end.
    """
    return Opening(_open_bind(proxy, peer, timeout))


def recv_step(sock: socket.socket, hs: ClientHandshake, pending: bytearray) -> None:
    """Read from a blocking socket into ``hs``, never past the end of a reply.

    Replies are read with MSG_PEEK first, so the peer's first bytes after BIND's second reply
    stay in the socket for the caller. ``pending`` holds the start of a reply read so far.
    """
    if hs.conn.state not in (State.REPLY, State.BIND_WAIT):
        hs.receive_data(sock.recv(4096))  # the proxy says nothing more before our next message
        return
    peek = sock.recv(4096, socket.MSG_PEEK)
    if not peek:
        hs.receive_data(b"")
        return
    parsed = Reply.parse(bytes(pending) + peek)
    data = sock.recv(parsed[1] - len(pending) if parsed else len(peek))
    if parsed:
        pending.clear()
    else:
        pending += data
    hs.receive_data(data)


class BlockingBind:
    """The blocking BIND: ``address`` for the peer, ``accept()`` returns the connected socket."""

    def __init__(self, sock: socket.socket, hs: ClientHandshake, address: tuple[str, int]) -> None:
        self.sock = sock
        self._hs = hs
        self.address = address
        self.peer: tuple[str, int] | None = None

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, tuple[str, int]]:
        """Wait for the second reply; return (socket to the peer, peer address)."""
        hs = self._hs
        hs.expect_second_reply()
        self.sock.settimeout(timeout)
        pending = bytearray()
        try:
            while not hs.done:
                recv_step(self.sock, hs, pending)
        except TimeoutError:
            raise ProxyTimeoutError("no peer connected through the proxy in time") from None
        second = hs.replies[1]
        self.peer = (second.address.host, second.address.port)
        self.sock.settimeout(None)
        return self.sock, self.peer

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> BlockingBind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_bind(
    proxy: ProxyLike, peer: tuple[str, int] = ("0.0.0.0", 0), *, timeout: float = 10.0
) -> BlockingBind:
    """Blocking BIND through ``proxy``: returns once the proxy listens (first reply)."""
    p = _proxy(proxy)
    hs = ClientHandshake(Command.BIND, Address.of(*peer), username=p.username, password=p.password)
    hs.first_reply_only()
    sock = connect_to_proxy(p, timeout)
    pending = bytearray()
    try:
        while not hs.done:
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
            if not hs.done:
                recv_step(sock, hs, pending)
    except TimeoutError:
        sock.close()
        raise ProxyTimeoutError(f"SOCKS handshake with {p.host}:{p.port} timed out") from None
    except BaseException:
        sock.close()
        raise
    return BlockingBind(sock, hs, advertised(hs.replies[0], p.host))
