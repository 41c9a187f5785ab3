"""CONNECT: resolve the target, connect with Happy Eyeballs, reply, relay.

The command awaits the outgoing connection, then writes the success reply itself, with the
connection's local address as BND.ADDR/BND.PORT: a reply that says "connected" is true. The
connection is opened with a :class:`~socksd.server.dataplane.relay.Holding` protocol, which keeps
whatever the target sends before the reply is out (banners) for the relay: target bytes never
overtake the reply. Domain names are resolved by the server's resolver, and the access rules see
each address (``CommandSession.allowed_addresses``); with several allowed addresses the attempts
follow RFC 8305 (``aiohappyeyeballs``, 250 ms stagger, address families interleaved). Failures
become reply codes through ``replycodes``; then the client connection is closed at once. With
``bind_out`` or the rule's ``via`` (``session.outgoing``, ``socksd.outgoing``) the connection
leaves from the address of the target's family; a target of another family gets 0x03.

Through an upstream proxy (``upstream``: the request's rule or the global ``upstream`` names one)
the target is not resolved or connected here: the upstream is, then the client library's
handshake asks it for the target, and its reply's BND is passed on; the relay is the same.
"""

from __future__ import annotations

import asyncio
import socket
from functools import partial
from typing import TYPE_CHECKING

import aiohappyeyeballs

from socksd.outgoing import unbound_port_socket
from socksd.protocol import Address, AddressType, ReplyCode, format_hostport
from socksd.resolver import AddrInfo
from socksd.server.commands.base import timed
from socksd.server.commands.replycodes import reply_for_error
from socksd.server.commands.upstream import UpstreamFailure, connect_upstream
from socksd.server.dataplane.relay import Holding
from socksd.server.handshake.admission import Refusal

if TYPE_CHECKING:
    from socksd.accesslog import SessionRecord
    from socksd.client.proxy import Proxy
    from socksd.outgoing import SourceAddresses
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


async def open_target(
    infos: list[AddrInfo],
    timeout: float,
    record: SessionRecord,
    held: Holding | None = None,
    source: SourceAddresses | None = None,
) -> Holding:
    """The connection to the first reachable of ``infos``, holding what it delivers (in
    ``held``, when given: an upstream's connection), from ``source``'s address of each one's
    family when given (``bind_out``/``via``: the others are not tried)."""
    loop = asyncio.get_running_loop()
    held = held or Holding()
    if source is not None:
        infos = source.usable(infos)
    async with asyncio.timeout(timeout):
        if len(infos) == 1:
            family, _, _, _, sockaddr = infos[0]
            record.remote = format_hostport(sockaddr[0], sockaddr[1])
            if source is None:
                await loop.create_connection(lambda: held, sockaddr[0], sockaddr[1], family=family)
                return held
        sock = await aiohappyeyeballs.start_connection(
            infos,
            local_addr_infos=None if source is None else source.addr_infos,
            happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
            interleave=1,
            socket_factory=None if source is None else unbound_port_socket,
        )
    await loop.create_connection(lambda: held, sock=sock)
    return held


async def connect(session: CommandSession, address: Address) -> None:
    """Carry out one CONNECT request."""
    config, metrics = session.config, session.metrics
    bound: Address | None = None  # the upstream's BND
    infos: list[AddrInfo] = []
    try:
        upstream = session.upstream()
        if upstream is None:
            if address.atyp == AddressType.DOMAIN:
                resolving = session.resolver.resolve(address.host, address.port)
                infos = await (resolving if metrics is None else timed(resolving, metrics.resolved))
                allowed = session.allowed_addresses(address, infos)  # the rules, by address
                if isinstance(allowed, Refusal):
                    session.refuse(allowed)
                    return
                infos = allowed
                upstream = session.upstream()  # the rule the addresses matched may name one
            else:
                infos = literal_addrinfo(address)
        if upstream is None:
            opening = open_target(
                infos, config.connect_timeout, session.record, source=session.outgoing
            )
            held = await (opening if metrics is None else timed(opening, metrics.connected))
        else:
            connector = partial(open_to_upstream, session, upstream.proxy)
            chaining = connect_upstream(upstream, address, config.connect_timeout, connector)
            held, bound = await (
                chaining if metrics is None else timed(chaining, metrics.connected)
            )
    except asyncio.CancelledError:
        raise
    except UpstreamFailure as e:
        session.fail(e.reply, str(e))
        return
    except Exception as e:  # every failure is a reply code, never a crash
        session.fail(reply_for_error(e), _describe(e, config.connect_timeout))
        return
    target = held.transport
    assert target is not None
    if session.closed:  # the client left while the connection was being made
        target.close()
        return
    if session.record.remote is None or len(infos) > 1 or bound is not None:
        session.record.remote = _peer(target)
    if bound is None:
        bound = Address.of(*target.get_extra_info("sockname")[:2])
    session.reply(ReplyCode.SUCCEEDED, bound)
    session.start_relay(held)


async def open_to_upstream(session: CommandSession, proxy: Proxy, held: Holding) -> None:
    """The TCP connection to an upstream proxy (its name through socksd's resolver)."""
    where = Address.of(proxy.host, proxy.port)
    if where.atyp == AddressType.DOMAIN:
        infos = await session.resolver.resolve(where.host, where.port)
    else:
        infos = literal_addrinfo(where)
    await open_target(infos, session.config.connect_timeout, session.record, held, session.outgoing)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return format_hostport(str(peer[0]), peer[1])


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"connect timeout after {timeout:g}s"
    return str(exc) or type(exc).__name__
