"""CONNECT through a SOCKS5 proxy: asyncio streams, or a plain blocking socket.

``open_connection(proxy, host, port)`` returns ``(reader, writer)`` like
``asyncio.open_connection``; ``create_connection(proxy, (host, port))`` returns a connected
``socket.socket`` like ``socket.create_connection``. Host names are sent to the proxy as names
(resolved there), IP literals as addresses.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from socksd.client.errors import ProxyConnectionError, ProxyError, ProxyTimeoutError
from socksd.client.handshake import ClientHandshake
from socksd.protocol import Address, Command, Reply


@dataclass(frozen=True, slots=True)
class Proxy:
    """Where the proxy is and how to log in to it."""

    host: str
    port: int = 1080
    username: str | bytes | None = None
    password: str | bytes | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """``socks5://user:pass@host:port`` or ``host:port`` (IPv6 as ``[::1]:1080``)."""
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url if "://" in url else f"socks5://{url}")
        if parts.scheme not in ("socks5", "socks5h"):
            raise ValueError(f"not a socks5:// URL: {url!r}")
        if parts.hostname is None:
            raise ValueError(f"no proxy host in {url!r}")
        user = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, parts.port or 1080, user, password)


ProxyLike = Proxy | str


def _proxy(proxy: ProxyLike) -> Proxy:
    return Proxy.parse(proxy) if isinstance(proxy, str) else proxy


async def handshake_over_streams(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hs: ClientHandshake
) -> bytes:
    """Run ``hs`` to completion over a stream pair; return bytes read past the last reply."""
    while True:
        out = hs.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        if hs.done:
            return hs.trailing_data()
        hs.receive_data(await reader.read(4096))


async def open_connection(
    proxy: ProxyLike,
    host: str,
    port: int,
    *,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``host:port`` through ``proxy``; return asyncio streams to the target."""
    p = _proxy(proxy)
    hs = ClientHandshake(
        Command.CONNECT, Address.of(host, port), username=p.username, password=p.password
    )
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(p.host, p.port)
            try:
                early = await handshake_over_streams(reader, writer, hs)
            except BaseException:
                writer.close()
                raise
    except ProxyError:
        raise
    except TimeoutError:
        raise ProxyTimeoutError(f"SOCKS handshake with {p.host}:{p.port} timed out") from None
    except OSError as e:
        raise ProxyConnectionError(f"cannot reach proxy {p.host}:{p.port}: {e}") from e
    if early:
        reader.feed_data(early)  # cannot happen with a StreamReader; kept for completeness
    return reader, writer


def handshake_over_socket(sock: socket.socket, hs: ClientHandshake) -> bytes:
    """Run ``hs`` to completion over a blocking socket; return bytes read past the last reply."""
    while True:
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
        if hs.done:
            return hs.trailing_data()
        hs.receive_data(sock.recv(4096))


def create_connection(
    proxy: ProxyLike,
    address: tuple[str, int],
    *,
    timeout: float = 10.0,
) -> socket.socket:
    """Blocking CONNECT through ``proxy``; the returned socket talks to the target."""
    p = _proxy(proxy)
    hs = ClientHandshake(
        Command.CONNECT, Address.of(*address), username=p.username, password=p.password
    )
    try:
        sock = socket.create_connection((p.host, p.port), timeout=timeout)
    except TimeoutError:
        raise ProxyTimeoutError(f"cannot reach proxy {p.host}:{p.port}: timed out") from None
    except OSError as e:
        raise ProxyConnectionError(f"cannot reach proxy {p.host}:{p.port}: {e}") from e
    try:
        handshake_over_socket(sock, hs)
    except TimeoutError:
        sock.close()
        raise ProxyTimeoutError(f"SOCKS handshake with {p.host}:{p.port} timed out") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def bound_address(reply: Reply) -> tuple[str, int]:
    """(host, port) of a reply's BND.ADDR/BND.PORT."""
    return reply.address.host, reply.address.port
