"""CONNECT through a SOCKS5 proxy: asyncio streams, or a plain blocking socket.

``open_connection(proxy, host, port)`` returns ``(reader, writer)`` like
``asyncio.open_connection``; ``create_connection(proxy, (host, port))`` returns a connected
``socket.socket`` like ``socket.create_connection``. Host names are sent to the proxy as names
(resolved there), IP literals as addresses.

With ``Proxy(..., gssapi=GssapiOptions(...))`` the client authenticates with GSS-API (RFC 1961)
and all later traffic is encapsulated: ``open_connection`` returns streams that wrap and unwrap
(``socksd.client.gssapi``), and the blocking ``create_gssapi_connection`` returns a socket-like
``GssapiSocket`` (a real ``socket.socket`` cannot hide the framing).

The handshake and its I/O are shared with BIND and UDP ASSOCIATE: ``client_handshake`` builds it,
``sync_io`` and ``async_io`` drive it.
"""

from __future__ import annotations

import asyncio
import socket

from socksd.client import async_io, sync_io
from socksd.client.gssapi import GssapiSocket
from socksd.client.proxy import Proxy, ProxyLike, as_proxy
from socksd.client.sync_io import connect_to_proxy, handshake_over_socket
from socksd.protocol import Address, Command

__all__ = [
    "GssapiSocket",
    "Proxy",
    "ProxyLike",
    "connect_to_proxy",
    "create_connection",
    "create_gssapi_connection",
    "handshake_over_socket",  # importable from here as before; it lives in sync_io
    "open_connection",
]


async def open_connection(
    proxy: ProxyLike,
    host: str,
    port: int,
    *,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``host:port`` through ``proxy``; return asyncio streams to the target."""
    p = as_proxy(proxy)
    session = await async_io.open_session(p, Command.CONNECT, Address.of(host, port), timeout)
    return async_io.target_streams(*session)


def create_connection(
    proxy: ProxyLike,
    address: tuple[str, int],
    *,
    timeout: float = 10.0,
) -> socket.socket:
    """Blocking CONNECT through ``proxy``; the returned socket talks to the target.

    For a GSSAPI proxy use :func:`create_gssapi_connection` (ValueError here, before connecting).
    """
    p = as_proxy(proxy)
    sync_io.check_style(p, gssapi=False, other="create_gssapi_connection")
    sock, _, _ = sync_io.open_session(p, Command.CONNECT, Address.of(*address), timeout)
    return sock


def create_gssapi_connection(
    proxy: ProxyLike,
    address: tuple[str, int],
    *,
    timeout: float = 10.0,
) -> GssapiSocket:
    """Blocking CONNECT through a GSSAPI proxy (``proxy.gssapi`` set; RFC 1961).

    Returns a socket-like :class:`GssapiSocket` whose ``sendall``/``recv`` wrap and unwrap.
    """
    p = as_proxy(proxy)
    sync_io.check_style(p, gssapi=True, other="create_connection")
    return sync_io.gssapi_socket(
        *sync_io.open_session(p, Command.CONNECT, Address.of(*address), timeout)
    )
