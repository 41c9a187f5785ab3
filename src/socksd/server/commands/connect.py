"""CONNECT: resolve the target, connect with Happy Eyeballs, reply, relay.

The command awaits the outgoing connection, then writes the success reply itself, with the
connection's local address as BND.ADDR/BND.PORT: a reply that says "connected" is true. The
connection is opened with a :class:`~socksd.server.dataplane.relay.Holding` protocol, which keeps
whatever the target sends before the reply is out (banners) for the relay: target bytes never
overtake the reply. Domain names are resolved by the server's resolver, and the access rules see
each address (``CommandSession.allowed_addresses``); with several allowed addresses the attempts
follow RFC 8305 (``aiohappyeyeballs``, 250 ms stagger, address families interleaved). Failures
become reply codes through ``replycodes``; then the client connection is closed at once.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import aiohappyeyeballs

from socksd.protocol import Address, AddressType, ReplyCode, format_hostport
from socksd.resolver import AddrInfo
from socksd.server.commands.base import timed
from socksd.server.commands.replycodes import reply_for_error
from socksd.server.dataplane.relay import Holding
from socksd.server.handshake.admission import Refusal

if TYPE_CHECKING:
    from socksd.accesslog import SessionRecord
    from socksd.server.commands.base import CommandSession

HAPPY_EYEBALLS_DELAY = 0.25


def literal_addrinfo(address: Address) -> list[AddrInfo]:
    """The one addrinfo entry of an IP literal address (no lookup)."""
    if address.atyp == AddressType.IPV6:
        return [
            (
                socket.AF_INET6,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address.host, address.port, 0, 0),
            )
        ]
    return [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address.host, address.port))
    ]


async def open_target(infos: list[AddrInfo], timeout: float, record: SessionRecord) -> Holding:
    """The connection to the first reachable of ``infos``, holding what it delivers."""
    loop = asyncio.get_running_loop()
    held = Holding()
    async with asyncio.timeout(timeout):
        if len(infos) == 1:
            family, _, _, _, sockaddr = infos[0]
            record.remote = format_hostport(sockaddr[0], sockaddr[1])
            await loop.create_connection(lambda: held, sockaddr[0], sockaddr[1], family=family)
            return held
        sock = await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
        )
    await loop.create_connection(lambda: held, sock=sock)
    return held


async def connect(session: CommandSession, address: Address) -> None:
    """Carry out one CONNECT request."""
    config, metrics = session.config, session.metrics
    try:
        if address.atyp == AddressType.DOMAIN:
            resolving = session.resolver.resolve(address.host, address.port)
            infos = await (resolving if metrics is None else timed(resolving, metrics.resolved))
            allowed = session.allowed_addresses(address, infos)  # the rules, by address
            if isinstance(allowed, Refusal):
                session.refuse(allowed)
                return
            infos = allowed
        else:
            infos = literal_addrinfo(address)
        opening = open_target(infos, config.connect_timeout, session.record)
        held = await (opening if metrics is None else timed(opening, metrics.connected))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # every failure is a reply code, never a crash
        session.fail(reply_for_error(e), _describe(e, config.connect_timeout))
        return
    target = held.transport
    assert target is not None
    if session.closed:  # the client left while the connection was being made
        target.close()
        return
    if session.record.remote is None or len(infos) > 1:
        session.record.remote = _peer(target)
    local = target.get_extra_info("sockname")
    session.reply(ReplyCode.SUCCEEDED, Address.of(*local[:2]))
    session.start_relay(held)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return format_hostport(str(peer[0]), peer[1])


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"connect timeout after {timeout:g}s"
    return str(exc) or type(exc).__name__
