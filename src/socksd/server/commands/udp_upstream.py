"""UDP ASSOCIATE through an upstream proxy: the client's datagrams relayed through the upstream's
own association.

:func:`udp_command` is the UDP ASSOCIATE command: served here (``udp.udp_associate``) or, when
the request's rule (or the global ``upstream``) names an upstream, by :func:`udp_through`:

1. the client side is opened as for any association (the client's datagrams arrive there, with
   the same source check, FRAG check, per-destination rules and drop counters);
2. socksd asks the upstream for a UDP association of its own (the client library's handshake on
   an ``UpstreamHolding``, declaring ``0.0.0.0:0``: the upstream takes socksd's first datagram's
   port) and connects one UDP socket to the upstream's relay address (its BND, or the upstream's
   address when BND is unspecified);
3. each client datagram whose destination the rules allow is sent on to the upstream's relay
   as it came, SOCKS UDP header included: a name stays a name in the datagram (socksd resolves
   it too, for the per-datagram rules, as for a direct association; the upstream resolves it
   again);
   after a GSSAPI login to the upstream each datagram is one RFC 1961 frame on that leg;
4. what the upstream relays back (header with the source, and DATA) goes to the client as it
   came (re-wrapped for a GSSAPI client); the upstream decides which sources it lets through.

The association ends as any does (control connection, ``udp_idle_timeout``, shutdown), and also
when the upstream ends its control connection. Bytes and datagrams are counted as for a direct
association; ``remote`` in the access log is the upstream's relay address.
"""

from __future__ import annotations

import asyncio
import socket
import time
from functools import partial
from typing import TYPE_CHECKING

from socksd.client.handshake import advertised
from socksd.protocol import (
    Address,
    AddressType,
    Command,
    GssapiEncapsulation,
    GssapiError,
    RemoteProtocolError,
    ReplyCode,
    UdpClientFilter,
    format_hostport,
    udp_header_length,
)
from socksd.rules import parse_ip
from socksd.server.commands.base import bind_address
from socksd.server.commands.connect import open_to_upstream
from socksd.server.commands.replycodes import answer_failure
from socksd.server.commands.udp import (
    TargetSide,
    UdpAssociation,
    UdpControl,
    tune_udp_socket,
    udp_associate,
)
from socksd.server.commands.upstream import UpstreamFailure, open_upstream, routed

if TYPE_CHECKING:
    from socksd.server.commands.base import CommandSession
    from socksd.server.commands.upstream import Upstream, UpstreamHolding


async def udp_command(session: CommandSession, address: Address) -> None:
    """Carry out one UDP ASSOCIATE request: here, or through the upstream its rule names."""
    await routed(session, address, "UDP ASSOCIATE", udp_associate, udp_through)


class UpstreamSide(TargetSide):
    """The UDP socket connected to the upstream's relay: what it relays back goes to the client."""

    def __init__(
        self, association: UpstreamUdpAssociation, codec: GssapiEncapsulation | None
    ) -> None:
        super().__init__(association)
        self.codec = codec
        self.to_client = association.to_client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        a = self.association
        if self.codec is not None:
            try:
                data = self.codec.decode_datagram(data)
            except GssapiError:
                a.drop("gssapi")
                return
        try:
            end = udp_header_length(data)
        except RemoteProtocolError:
            a.drop("header")
            return
        if data[2]:
            a.drop("frag")
            return
        if a.client_side.paused:
            a.drop("congested")
            return
        payload = data[end:]
        if a.down_bucket is not None and not a.down_bucket.take_whole(
            len(payload), time.monotonic()
        ):
            a.drop("bandwidth")
            return
        self.to_client.deliver(a, data[:end], payload)


class _UpstreamControl(UdpControl):
    """The upstream's control connection: its end is the association's end."""

    def eof_received(self) -> bool:
        self.association.close("the upstream ended the UDP association")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.association.close(f"upstream control connection lost{f': {exc}' if exc else ''}")


class UpstreamUdpAssociation(UdpAssociation):
    """An association whose datagrams go through an upstream's association (module comment)."""

    upstream_side: UpstreamSide | None = None
    upstream_control: asyncio.Transport | None = None

    def __init__(
        self,
        session: CommandSession,
        client: UdpClientFilter,
        codec: GssapiEncapsulation | None,
    ) -> None:
        super().__init__(session, client, session.terms(), codec)
        self.to_client = self.target_side_class(self)
        """Delivers to the client (wrapping for a GSSAPI client), as a target side does."""

    async def open_upstream_side(
        self, host: str, port: int, codec: GssapiEncapsulation | None
    ) -> None:
        """The UDP socket connected to the upstream's relay at ``host:port``."""
        loop = asyncio.get_running_loop()
        side = UpstreamSide(self, codec)
        source = self.session.outgoing
        local = None  # bind_out/via: of the relay's family (a name: the first there is)
        if source is not None:
            local = (source.for_ip(host, any_family=parse_ip(host) is None), 0)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: side, local_addr=local, remote_addr=(host, port)
        )
        tune_udp_socket(transport)
        self.upstream_side = side
        # names resolved for the rules may be of either family: the datagram goes upstream
        for family in (socket.AF_INET, socket.AF_INET6):
            self.target_sides[family] = side

    def watch(self, held: UpstreamHolding) -> None:
        """Take the upstream's control connection; the association ends with it."""
        transport = held.transport
        assert transport is not None
        self.upstream_control = transport
        transport.set_protocol(_UpstreamControl(self))

    # -- client -> upstream ---------------------------------------------------------------------

    def new_target(self, key: bytes, data: bytes, end: int) -> None:
        """Every datagram: its destination through the rules, then on to the upstream."""
        address = self.destination(data)
        if address is None:
            return
        if address.atyp == AddressType.DOMAIN:
            self._to_name(address.host.lower(), address.port, data, end)  # -> _send_to_ip
        elif self.permitted(None, address.host, address.port):
            self.forward(data, end)

    def _send_to_ip(self, name: str, ip: str, port: int, data: bytes, end: int) -> None:
        if self.permitted(name, ip, port):
            self.forward(data, end)  # with the name, as the client gave it

    def forward(self, data: bytes, end: int) -> None:
        """Send the datagram, header and all, to the upstream's relay."""
        side = self.upstream_side
        if side is None or side.transport is None or side.paused:
            self.drop("congested")
            return
        bucket = self.up_bucket
        if bucket is not None and not bucket.take_whole(len(data) - end, time.monotonic()):
            self.drop("bandwidth")
            return
        size = len(data) - end
        if side.codec is not None:
            try:
                data = side.codec.encode_datagram(bytes(data))
            except (ValueError, GssapiError):
                self.drop("gssapi")
                return
        self.datagrams_up += 1
        self.bytes_up += size
        side.transport.sendto(data)

    # -- end ------------------------------------------------------------------------------------

    def close_sockets(self) -> None:
        super().close_sockets()
        if self.upstream_side is not None and self.upstream_side.transport is not None:
            self.upstream_side.transport.abort()
        if self.upstream_control is not None:
            self.upstream_control.close()


async def udp_through(session: CommandSession, upstream: Upstream, address: Address) -> None:
    """UDP ASSOCIATE through ``upstream`` (module comment)."""
    config = session.config
    control = session.client
    local_ip = str(control.get_extra_info("sockname")[0])
    association = UpstreamUdpAssociation(
        session, UdpClientFilter(session.client_host, address), session.codec
    )
    held: UpstreamHolding | None = None
    try:
        bound = await association.open_client_side(bind_address(config.advertise, local_ip))
        connector = partial(open_to_upstream, session, upstream.proxy)
        held, hs, _ = await open_upstream(
            upstream,
            Command.UDP_ASSOCIATE,
            Address.of("0.0.0.0", 0),
            config.connect_timeout,
            connector,
        )
        assert held.transport is not None
        proxy_ip = str(held.transport.get_extra_info("peername")[0])
        relay_host, relay_port = advertised(hs.replies[0], proxy_ip)
        async with asyncio.timeout(config.connect_timeout):  # BND may be a name to look up
            await association.open_upstream_side(relay_host, relay_port, hs.encapsulation)
    except asyncio.CancelledError:
        association.close_sockets()
        if held is not None:
            held.close()
        raise
    except UpstreamFailure as e:
        association.close_sockets()
        session.fail(e.reply, f"UDP ASSOCIATE: {e}")
        return
    except Exception as e:  # every failure is a reply code, never a crash
        association.close_sockets()
        if held is not None:
            held.close()
        answer_failure(session, "UDP ASSOCIATE", e, f"UDP ASSOCIATE through {upstream}: {e}")
        return
    if session.closed or held.eof or held.lost:  # the client left, or the upstream did
        association.close_sockets()
        held.close()
        if not session.closed:
            session.fail(ReplyCode.GENERAL_FAILURE, f"{upstream} ended the UDP association")
        return
    advertised_bound = Address.of(config.advertise, bound.port) if config.advertise else bound
    session.record.remote = format_hostport(relay_host, relay_port)
    session.reply(ReplyCode.SUCCEEDED, advertised_bound)
    session.hand_over(association)
    association.start(control, session.client_eof)
    if association.closed:
        held.close()
    else:
        association.watch(held)
