"""CONNECT through a SOCKS5 proxy: asyncio streams, or a plain blocking socket.

``open_connection(proxy, host, port)`` returns ``(reader, writer)`` like
``asyncio.open_connection``; ``create_connection(proxy, (host, port))`` returns a connected
``socket.socket`` like ``socket.create_connection``. Host names are sent to the proxy as names
(resolved there), IP literals as addresses.

With ``Proxy(..., gssapi=GssapiOptions(...))`` the client authenticates with GSS-API (RFC 1961)
and all later traffic is encapsulated: ``open_connection`` returns streams that wrap and unwrap
(``socksd.client.gssapi``), and the blocking ``create_gssapi_connection`` returns a socket-like
``GssapiSocket`` (a real ``socket.socket`` cannot hide the framing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

from socksd.client.errors import ProxyConnectionError, ProxyError, ProxyTimeoutError
from socksd.client.gssapi import GssapiOptions, GssapiSocket, encapsulated_streams
from socksd.client.handshake import ClientHandshake
from socksd.protocol import Address, Command, Reply, State


@dataclass(frozen=True, slots=True)
class Proxy:
    """Where the proxy is and how to log in to it."""

    host: str
    port: int = 1080
    username: str | bytes | None = None
    password: str | bytes | None = field(default=None, repr=False)
    gssapi: GssapiOptions | None = None

    @classmethod
    def parse(cls, url: str, *, gssapi: GssapiOptions | None = None) -> Proxy:
        """``socks5://user:pass@host:port`` or ``host:port`` (IPv6 as ``[::1]:1080``)."""
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url if "://" in url else f"socks5://{url}")
        if parts.scheme not in ("socks5", "socks5h"):
            raise ValueError(f"not a socks5:// URL: {url!r}")
        if parts.hostname is None:
            raise ValueError(f"no proxy host in {url!r}")
        user = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, parts.port or 1080, user, password, gssapi)


ProxyLike = Proxy | str


# Larger than anything a StreamReader can hold (2 x its 64 KiB limit + one 256 KiB read), so the
# handshake's last read leaves nothing behind in the reader when GSSAPI streams replace it.
_READ_ALL = 1 << 20


def _proxy(proxy: ProxyLike) -> Proxy:
    return Proxy.parse(proxy) if isinstance(proxy, str) else proxy


def _handshake(p: Proxy, address: Address) -> ClientHandshake:
    return ClientHandshake(
        Command.CONNECT,
        address,
        username=p.username,
        password=p.password,
        gssapi=p.gssapi,
        proxy_host=p.host,
    )


@contextlib.contextmanager
def handshake_errors(p: Proxy) -> Iterator[None]:
    """Turn what can go wrong reaching a proxy into the client's errors (ProxyError passes)."""
    try:
        yield
    except ProxyError:
        raise
    except TimeoutError:
        raise ProxyTimeoutError(f"SOCKS handshake with {p.host}:{p.port} timed out") from None
    except OSError as e:
        raise ProxyConnectionError(f"cannot reach proxy {p.host}:{p.port}: {e}") from e


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
        if hs.step_pending:
            try:
                await asyncio.to_thread(hs.run_step)
            except ProxyError:
                writer.write(hs.data_to_send())  # the abort message, as a courtesy
                raise
            continue
        hs.receive_data(await reader.read(_READ_ALL))


async def open_connection(
    proxy: ProxyLike,
    host: str,
    port: int,
    *,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``host:port`` through ``proxy``; return asyncio streams to the target."""
    p = _proxy(proxy)
    hs = _handshake(p, Address.of(host, port))
    with handshake_errors(p):
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(p.host, p.port)
            try:
                early = await handshake_over_streams(reader, writer, hs)
            except BaseException:
                writer.close()
                raise
    if hs.encapsulation is not None:
        return encapsulated_streams(writer, hs.encapsulation, early)
    if early:
        # Target bytes that came in the same read as the reply: the reader's buffer is empty
        # now, so putting them back keeps them ahead of everything read later.
        reader.feed_data(early)
    return reader, writer


def handshake_over_socket(sock: socket.socket, hs: ClientHandshake) -> bytes:
    """Run ``hs`` to completion over a blocking socket; return bytes read past the last reply."""
    while True:
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
        if hs.done:
            return hs.trailing_data()
        if hs.step_pending:
            try:
                hs.run_step()
            except ProxyError:
                sock.sendall(hs.data_to_send())  # the abort message, as a courtesy
                raise
            continue
        # Once the request is out, target bytes may follow the reply in the same segment. A plain
        # socket cannot give them back, so the reply is read a byte at a time (it is 10-22 bytes;
        # GSSAPI sessions keep early bytes in their GssapiSocket instead).
        at_reply = hs.conn.state in (State.REPLY, State.BIND_WAIT) and hs.encapsulation is None
        hs.receive_data(sock.recv(1 if at_reply else 65536))


def create_connection(
    proxy: ProxyLike,
    address: tuple[str, int],
    *,
    timeout: float = 10.0,
) -> socket.socket:
    """Blocking CONNECT through ``proxy``; the returned socket talks to the target.

    For a GSSAPI proxy use :func:`create_gssapi_connection` (ValueError here).
    """
    p = _proxy(proxy)
    if p.gssapi is not None:
        raise ValueError("a GSSAPI proxy encapsulates the data: use create_gssapi_connection()")
    sock, _, _ = _blocking_connect(p, address, timeout)
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
    p = _proxy(proxy)
    if p.gssapi is None:
        raise ValueError("proxy.gssapi is not set: use create_connection()")
    sock, hs, early = _blocking_connect(p, address, timeout)
    assert hs.encapsulation is not None
    return GssapiSocket(sock, hs.encapsulation, early)


def connect_to_proxy(p: Proxy, timeout: float) -> socket.socket:
    """A blocking TCP connection to the proxy, failures as the client's errors."""
    try:
        return socket.create_connection((p.host, p.port), timeout=timeout)
    except TimeoutError:
        raise ProxyTimeoutError(f"cannot reach proxy {p.host}:{p.port}: timed out") from None
    except OSError as e:
        raise ProxyConnectionError(f"cannot reach proxy {p.host}:{p.port}: {e}") from e


def _blocking_connect(
    p: Proxy, address: tuple[str, int], timeout: float
) -> tuple[socket.socket, ClientHandshake, bytes]:
    hs = _handshake(p, Address.of(*address))
    sock = connect_to_proxy(p, timeout)
    try:
        early = handshake_over_socket(sock, hs)
    except TimeoutError:
        sock.close()
        raise ProxyTimeoutError(f"SOCKS handshake with {p.host}:{p.port} timed out") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, hs, early


def bound_address(reply: Reply) -> tuple[str, int]:
    """(host, port) of a reply's BND.ADDR/BND.PORT."""
    return reply.address.host, reply.address.port
