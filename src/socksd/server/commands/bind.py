"""BIND (RFC 1928 sections 4 and 6): listen for one connection from the client's peer, relay it.

1. The request's DST.ADDR names the peer the client expects (a name is resolved; 0.0.0.0 or ::
   means any peer). socksd picks the local address on the route towards that peer: the source
   address of a UDP socket connected to it (``connect`` on a UDP socket sends nothing, it only asks
   the kernel for the route); for an unspecified DST, the address the control connection arrived
   on. With ``bind_out`` or the rule's ``via`` (``socksd.outgoing``), the address of the peer's
   family there instead (the peer is a host of the targets' side; 0x03 when its family has
   none; for any peer, the family the client came in on, else the one there is). A listening
   socket is bound there on a free port.
2. First reply: BND.ADDR/BND.PORT of that listener. With ``advertise`` set, that address
   instead; the listener is then bound on it when it is this host's own (a node behind a load
   balancer), else on the local address (NAT, the port forwarded).
3. Wait, at most ``bind_timeout`` seconds, for a connection from the expected peer. A connection
   from another host is closed and logged, and the wait goes on until the deadline. Timeout:
   reply 0x06 and close.
4. Second reply, carrying the peer's address and port (:class:`BindRelayOwner`, written from the
   accepted connection's ``connection_made`` so no peer byte can overtake it); then the
   connection is relayed with the same :class:`~socksd.server.dataplane.relay.Relay` as CONNECT (after
   GSSAPI: a :class:`~socksd.server.dataplane.gssapi.GssapiRelay`; both replies are wrapped too).

Through an upstream proxy (:func:`bind_through`) the upstream listens: its first reply (its
listener's address) and its second (the peer's) are passed on, the peer of a BIND for any peer is
checked against the rules, and the upstream's connection is relayed like a peer's.

While it waits, the control connection is watched by :class:`BindControl`. An EOF with nothing
sent is a client that gave up: the BIND ends and its listener is closed at once. (TCP cannot tell
that from a half-close without writing, and nothing may be written before the second reply; but a
client has no connection of its own to half-close yet: SOCKS libraries and socksify hand the
connection to the application only after the second reply.) Bytes a client sends early anyway are
kept (bounded: reading pauses past ``EARLY_DATA_LIMIT``) and relayed to the peer after the second
reply; an EOF after them is a half-close, passed on to the peer. A reset ends the BIND at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial
from typing import TYPE_CHECKING, Any

from socksd.protocol import Address, AddressType, BindPeerFilter, Command, ReplyCode
from socksd.protocol.udp import is_unspecified
from socksd.server.commands.base import bind_address, timed
from socksd.server.commands.connect import open_to_upstream
from socksd.server.commands.replycodes import answer_failure
from socksd.server.commands.upstream import (
    UpstreamFailure,
    open_upstream,
    routed,
    second_reply,
)
from socksd.server.dataplane.relay import Holding

if TYPE_CHECKING:
    from socksd.server.commands.base import CommandSession
    from socksd.server.commands.upstream import Upstream

log = logging.getLogger("socksd.bind")

EARLY_DATA_LIMIT = 64 * 1024
"""Bytes the client may send before the peer connects before reading pauses."""

LISTEN_BACKLOG = 8
"""Connections from wrong peers queue here while the right one is awaited; a few are enough."""


def local_address_towards(ip: str) -> str:
    """The local address the kernel would use to reach ``ip`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((ip, 9))
        return str(probe.getsockname()[0])


def listening_ip(session: CommandSession, route_ip: str | None) -> str:
    """The local address a BIND listens on, before ``advertise`` (module comment, step 1)."""
    control_ip = str(session.client.get_extra_info("sockname")[0])
    source = session.outgoing
    if source is not None:  # bind_out/via: the peer's family's (any peer: the client's)
        return source.for_ip(route_ip or control_ip, any_family=route_ip is None)
    return local_address_towards(route_ip) if route_ip is not None else control_ip


def open_listener(ip: str) -> socket.socket:
    """A non-blocking listening TCP socket on ``ip`` and a free port."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((ip, 0))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class BindControl(asyncio.Protocol):
    """The client's control connection while BIND waits for the peer (see the module comment)."""

    def __init__(self, session: CommandSession) -> None:
        self.session = session
        self.transport: asyncio.Transport | None = None

    def watch(self, transport: asyncio.Transport) -> None:
        """Take over ``transport`` (the session's) until the peer connects."""
        self.transport = transport
        transport.set_protocol(self)
        if self.session.client_eof:  # the EOF came while the listener was being set up
            self.eof_received()
            return
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        conn = self.session.conn
        conn.receive_data(data)  # BIND_WAIT: kept unparsed, handed over as trailing data
        if conn.buffered >= EARLY_DATA_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        session = self.session
        if session.conn.buffered == 0:
            session.abandon("client closed the connection before the peer connected")
            return True
        session.client_eof = True  # a half-close after early data: passed on to the peer later
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)


async def expected_peer(
    session: CommandSession, address: Address
) -> tuple[BindPeerFilter, str | None]:
    """The peer filter of a BIND request and the IP to route towards (None: unspecified)."""
    if address.atyp == AddressType.DOMAIN:
        metrics = session.metrics
        resolving = session.resolver.resolve(address.host, address.port)
        infos = await (resolving if metrics is None else timed(resolving, metrics.resolved))
        ips = [str(info[4][0]) for info in infos]
        return BindPeerFilter.for_request(address, ips), ips[0]
    if is_unspecified(address):
        return BindPeerFilter(), None
    return BindPeerFilter.for_request(address), address.host


def _refusal(session: CommandSession, peers: BindPeerFilter, peer: tuple[Any, ...]) -> str | None:
    """Why the connection from ``peer`` is not the BIND's peer; None when it is."""
    host = str(peer[0])
    if not peers.accept(host):
        return f"expected {', '.join(sorted(peers.expected))}"
    if peers.accepts_any:  # any peer: the rules see the one that came
        decision = session.peer_decision(host, int(peer[1]))
        if not decision.allowed:
            return f"denied by {decision.label}"
    return None


async def bind(session: CommandSession, address: Address) -> None:
    """Carry out one BIND request: here, or at the upstream proxy its rule names."""
    await routed(session, address, "BIND", bind_here, bind_through)


async def bind_here(session: CommandSession, address: Address) -> None:
    """BIND with a listener of this host."""
    config = session.config
    transport = session.client
    loop = asyncio.get_running_loop()
    try:
        peers, route_ip = await expected_peer(session, address)
        local_ip = listening_ip(session, route_ip)
        listener = open_listener(bind_address(config.advertise, local_ip))
    except asyncio.CancelledError:
        raise
    except Exception as e:  # every failure is a reply code, never a crash
        answer_failure(session, "BIND", e, f"BIND: {e or type(e).__name__}")
        return
    accepted: socket.socket | None = None
    try:
        port = listener.getsockname()[1]
        advertised = Address.of(config.advertise or local_ip, port)
        session.reply(ReplyCode.SUCCEEDED, advertised)
        BindControl(session).watch(transport)
        try:
            async with asyncio.timeout(config.bind_timeout):
                while True:
                    accepted, peer = await loop.sock_accept(listener)
                    why = _refusal(session, peers, peer)
                    if why is None:
                        break
                    log.warning(
                        "BIND for %s: refused a connection from %s (%s)",
                        session.record.client,
                        Address.of(*peer[:2]),
                        why,
                    )
                    accepted.close()
                    accepted = None
        except TimeoutError:
            session.fail(
                ReplyCode.TTL_EXPIRED, f"BIND: no peer connected within {config.bind_timeout:g}s"
            )
            return
        except OSError as e:
            answer_failure(session, "BIND", e, f"BIND: accept failed: {e}")
            return
    finally:
        listener.close()
        if accepted is not None and session.closed:
            accepted.close()
    if session.closed:
        return
    held = Holding()
    peer_transport, _ = await loop.connect_accepted_socket(lambda: held, sock=accepted)
    if session.closed:  # the client left meanwhile
        peer_transport.close()
        return
    peer_address = Address.of(*peer[:2])
    session.record.remote = str(peer_address)
    session.reply(ReplyCode.SUCCEEDED, peer_address)  # the second reply: the peer is connected
    session.start_relay(held)


async def bind_through(session: CommandSession, upstream: Upstream, address: Address) -> None:
    """BIND at ``upstream``: its first reply (where the peer is to connect: the upstream's
    listener) and its second (the peer) are passed on, then the connection is relayed. The
    peer of a BIND for any peer is checked against the rules here too."""
    config = session.config
    connector = partial(open_to_upstream, session, upstream.proxy)
    try:
        held, hs, _ = await open_upstream(
            upstream, Command.BIND, address, config.connect_timeout, connector
        )
    except UpstreamFailure as e:
        session.fail(e.reply, f"BIND: {e}")
        return
    try:
        session.reply(ReplyCode.SUCCEEDED, hs.replies[0].address)
        BindControl(session).watch(session.client)
        peer = await second_reply(upstream, held, hs, config.bind_timeout)
    except UpstreamFailure as e:
        session.fail(e.reply, str(e))
        return
    if session.closed:  # the client left meanwhile
        held.close()
        return
    session.record.remote = str(peer)
    if is_unspecified(address):  # any peer: the rules see the one that came
        why = "its address is a name" if peer.atyp == AddressType.DOMAIN else None
        if why is None:
            decision = session.peer_decision(peer.host, peer.port)
            why = None if decision.allowed else f"denied by {decision.label}"
        if why is not None:
            log.warning("BIND for %s: refused the peer %s (%s)", session.record.client, peer, why)
            held.close()
            session.fail(ReplyCode.NOT_ALLOWED, f"BIND: peer {peer} {why}")
            return
    session.reply(ReplyCode.SUCCEEDED, peer)  # the second reply: the peer is connected
    session.start_relay(held)
