"""CONNECT: resolve the target, connect with Happy Eyeballs, reply, relay.

The success reply is written only once the outgoing connection is established, from the target
protocol's ``connection_made`` (see ``Session.target_connected``), never before: a reply that says
"connected" must be true, and target bytes must not overtake it. Domain names are resolved by the
server's resolver, and the access rules see each address (``admission.allowed_addresses``); with
several allowed addresses the attempts follow RFC 8305 (``aiohappyeyeballs``,
250 ms stagger, address families interleaved). Failures become reply codes through
``socksd.server.replycodes``; then the client connection is closed at once.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import aiohappyeyeballs

from socksd.protocol import Address, AddressType, format_hostport
from socksd.resolver import AddrInfo
from socksd.server.admission import allowed_addresses
from socksd.server.replycodes import reply_for_error

if TYPE_CHECKING:
    from socksd.server.relay import Relay
    from socksd.server.session import Session

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


async def open_target(
    session: Session, relay: Relay, infos: list[AddrInfo], timeout: float
) -> None:
    """Connect to the first reachable of ``infos`` with ``relay.target`` as the protocol."""
    loop = asyncio.get_running_loop()
    record = session.record
    async with asyncio.timeout(timeout):
        if len(infos) == 1:
            family, _, _, _, sockaddr = infos[0]
            if record is not None:
                record.remote = format_hostport(sockaddr[0], sockaddr[1])
            await loop.create_connection(
                lambda: relay.target, sockaddr[0], sockaddr[1], family=family
            )
            return
        sock = await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1
        )
    await loop.create_connection(lambda: relay.target, sock=sock)


async def connect(session: Session, address: Address) -> None:
    """Carry out one CONNECT request for ``session``."""
    config = session.ctx.config
    try:
        if address.atyp == AddressType.DOMAIN:
            infos = await session.ctx.resolver.resolve(address.host, address.port)
            infos = allowed_addresses(session, address, infos)  # the rules, by address
            if not infos:
                return  # denied: the session has answered 0x02
        else:
            infos = literal_addrinfo(address)
        await open_target(session, session.new_relay(), infos, config.connect_timeout)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # every failure is a reply code, never a crash
        session.fail(reply_for_error(e), _describe(e, config.connect_timeout))


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"connect timeout after {timeout:g}s"
    return str(exc) or type(exc).__name__
