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

Authentication is the same as CONNECT's (``client_handshake``). After GSSAPI both replies and the
relayed stream are RFC 1961-encapsulated: ``accept()`` then returns wrapping streams, and the
blocking version is ``create_gssapi_bind``, whose ``accept()`` returns a socket-like
:class:`~socksd.client.gssapi.GssapiSocket` (``create_bind`` refuses a GSSAPI proxy, as
``create_connection`` does: a plain socket cannot hide the framing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Self

from socksd.client import async_io, sync_io
from socksd.client.async_io import Opening, Streams
from socksd.client.errors import ProxyError
from socksd.client.gssapi import GssapiSocket
from socksd.client.handshake import ClientHandshake, advertised
from socksd.client.proxy import ProxyLike, as_proxy
from socksd.protocol import Address, Command, Reply


def _peer(second: Reply) -> tuple[str, int]:
    return second.address.host, second.address.port


class BindListener:
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

    async def accept(self, timeout: float | None = None) -> Streams:
        """Wait for the second reply (the peer connected); return streams to the peer."""
        if self.peer is not None:
            raise ProxyError("a BIND accepts one connection only")
        hs = self._hs
        early = await async_io.wait_second_reply(self._reader, self._writer, hs, timeout)
        self.peer = _peer(hs.replies[1])
        self._reader, self._writer = async_io.target_streams(self._reader, self._writer, hs, early)
        return self._reader, self._writer

    async def aclose(self) -> None:
        """Close the connection to the proxy (before ``accept``: cancels the BIND)."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def _open_bind(proxy: ProxyLike, peer: tuple[str, int], timeout: float) -> BindListener:
    p = as_proxy(proxy)
    reader, writer, hs, _ = await async_io.open_session(p, Command.BIND, Address.of(*peer), timeout)
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


class _BlockingBindBase:
    """What both blocking BINDs share: the proxy connection and the wait for the peer."""

    def __init__(self, sock: socket.socket, hs: ClientHandshake, address: tuple[str, int]) -> None:
        self.sock = sock
        self._hs = hs
        self.address = address
        self.peer: tuple[str, int] | None = None

    def _wait_peer(self, timeout: float | None) -> tuple[bytes, tuple[str, int]]:
        if self.peer is not None:
            raise ProxyError("a BIND accepts one connection only")
        early = sync_io.wait_second_reply(self.sock, self._hs, timeout)
        self.peer = _peer(self._hs.replies[1])
        return early, self.peer

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlockingBind(_BlockingBindBase):
    """The blocking BIND: ``address`` for the peer, ``accept()`` returns the connected socket."""

    def accept(self, timeout: float | None = None) -> tuple[socket.socket, tuple[str, int]]:
        """Wait for the second reply; return (socket to the peer, peer address)."""
        _, peer = self._wait_peer(timeout)  # nothing early: the reply alone was consumed
        return self.sock, peer


class GssapiBind(_BlockingBindBase):
    """The blocking BIND through a GSSAPI proxy: ``accept()`` returns a :class:`GssapiSocket`."""

    def accept(self, timeout: float | None = None) -> tuple[GssapiSocket, tuple[str, int]]:
        """Wait for the second reply; return (socket-like object to the peer, peer address)."""
        early, peer = self._wait_peer(timeout)
        return sync_io.gssapi_socket(self.sock, self._hs, early), peer


def create_bind(
    proxy: ProxyLike, peer: tuple[str, int] = ("0.0.0.0", 0), *, timeout: float = 10.0
) -> BlockingBind:
    """Blocking BIND through ``proxy``: returns once the proxy listens (first reply).

    For a GSSAPI proxy use :func:`create_gssapi_bind` (ValueError here, before connecting).
    """
    p = as_proxy(proxy)
    sync_io.check_style(p, gssapi=False, other="create_gssapi_bind")
    sock, hs, _ = sync_io.open_session(p, Command.BIND, Address.of(*peer), timeout)
    return BlockingBind(sock, hs, advertised(hs.replies[0], p.host))


def create_gssapi_bind(
    proxy: ProxyLike, peer: tuple[str, int] = ("0.0.0.0", 0), *, timeout: float = 10.0
) -> GssapiBind:
    """Blocking BIND through a GSSAPI proxy (``proxy.gssapi`` set; RFC 1961)."""
    p = as_proxy(proxy)
    sync_io.check_style(p, gssapi=True, other="create_bind")
    sock, hs, _ = sync_io.open_session(p, Command.BIND, Address.of(*peer), timeout)
    return GssapiBind(sock, hs, advertised(hs.replies[0], p.host))
