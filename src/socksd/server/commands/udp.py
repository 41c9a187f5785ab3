"""UDP ASSOCIATE (RFC 1928 sections 4 and 7): one UDP relay per association, tied to its TCP.

Sockets of one association (:class:`UdpAssociation`), none shared with another association:

* the client side: bound on the local address the TCP control connection arrived on (never the
  wildcard, so BND.ADDR is an address the client can send to) and a free port; its address is the
  reply's BND.ADDR/BND.PORT. With ``advertise`` set, that address is in the reply instead, and
  the socket is bound on it when it is this host's own (a node behind a load balancer: the
  client sends its datagrams to the node directly), else on the local address (NAT);
* one target side per address family (IPv4, and IPv6 when the host has it), bound to the
  wildcard address: what targets send back arrives there, apart from the client's traffic, so a
  datagram on the client side is either the client's or dropped. With ``bind_out`` or the rule's
  ``via`` (``socksd.outgoing``) each is bound to the address of its family there instead, and a
  family with no address there has no target side (its datagrams are dropped as ``unresolved``).

Client to target (``ClientSide.datagram_received``): the source must pass the
:class:`~socksd.protocol.udp.UdpClientFilter` (the control connection's client IP; the declared
port, or the first datagram's port); FRAG must be 0 (RFC 1928 lets a server without reassembly
drop fragments); the header's address bytes are the key of a small cache of target socket
addresses, so a datagram to a known target costs one dict lookup and one ``sendto`` of a
memoryview of its DATA (no copy). A domain name is resolved by the server's resolver, one
lookup per name at a time (a Task per name, never per datagram), with at most
``PENDING_PER_NAME`` datagrams held while it runs; answers are cached for ``NAME_TTL`` seconds.

Target to client (``TargetSide.datagram_received``): accepted from a host the client has sent a
datagram to (any port: a restricted-cone NAT's rule, which lets TFTP-style replies from a new port
through); others are dropped. The header with the source's address is prepended and the result
sent to the client's address.

Drops are counted by reason and written in the session's access-log line: ``source`` (not the
client), ``frag``, ``header`` (malformed), ``unresolved``, ``reply_source`` (from a host the client
never sent to), ``send`` (the kernel refused to send, e.g. a reply too large for the header),
``congested`` (the outgoing socket's buffer is full and the transport has paused writing past its
high-water mark: further datagrams are dropped rather than queued, so a slow path cannot grow
memory), ``gssapi`` (see below).

After GSSAPI authentication (RFC 1961) every datagram between the client and the relay is one
MTYP=3 frame whose unwrapped payload is the ordinary SOCKS UDP datagram (header and DATA):
:class:`GssapiClientSide` unwraps before the usual path, :class:`GssapiTargetSide` wraps header and
DATA together. The plain classes are untouched, so an association without GSSAPI costs nothing
more. A datagram that fails gss_unwrap is dropped as ``gssapi``: tampered, replayed, unencrypted at
level 2. One that comes after a lost one or late (GSS_S_GAP_TOKEN/UNSEQ_TOKEN, supplementary status
of a good message) is relayed: the codec's ``decode_datagram`` accepts it, ``read`` on a stream not.

The association ends when its TCP control connection does (:class:`UdpControl` sees the EOF or
the loss and closes every UDP socket in that same callback, so no datagram is relayed after),
when nothing was relayed for ``udp_idle_timeout`` seconds, or at the server's shutdown deadline.
Bytes the client sends on the control connection are read and discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from socksd.accesslog import UdpStats
from socksd.fdlimit import is_shortage
from socksd.protocol import (
    UDP_HEADER_IPV4,
    Address,
    AddressType,
    GssapiEncapsulation,
    GssapiError,
    RemoteProtocolError,
    ReplyCode,
    UdpClientFilter,
    parse_address,
    udp_header_length,
    udp_reply_header,
)
from socksd.server.commands.base import bind_address, timed
from socksd.server.commands.replycodes import answer_failure
from socksd.server.dataplane.idle import ActivityMark, IdleSweep, watch_idle

if TYPE_CHECKING:
    from socksd.limits import TokenBucket
    from socksd.outgoing import SourceAddresses
    from socksd.server.commands.base import CommandSession
    from socksd.server.dataplane.terms import RelayTerms

log = logging.getLogger("socksd.udp")

SOCKET_BUFFER = 1 << 22
"""Requested SO_RCVBUF/SO_SNDBUF of relay sockets (the kernel caps it at its own maximum)."""

TARGET_CACHE_SIZE = 256
"""Header -> target address entries kept per association (the cache is emptied when full)."""

REPLY_HEADER_CACHE_SIZE = 256
"""Source -> reply header entries kept per association (emptied when full)."""

MAX_PEER_HOSTS = 4096
"""Hosts the client has sent to that may answer (the oldest is forgotten past this)."""

NAME_TTL = 60.0
"""Seconds a resolved name is used before it is resolved again."""

MAX_NAMES = 64
"""Resolved names kept per association."""

MAX_PENDING_NAMES = 8
"""Names being resolved at once per association; datagrams to more names are dropped."""

PENDING_PER_NAME = 32
"""Datagrams held while their name is resolved; more are dropped."""

SockAddr = tuple[Any, ...]


def tune_udp_socket(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def _target_socket(family: int, ip: str | None = None) -> socket.socket:
    """A UDP socket on ``ip`` (None: the wildcard address) and a free port (IPv6: IPv6 only)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((ip or "::", 0))
        else:
            sock.bind((ip or "0.0.0.0", 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ClientSide(asyncio.DatagramProtocol):
    """The socket the client sends to (BND.ADDR/BND.PORT): client -> target."""

    def __init__(self, association: UdpAssociation) -> None:
        self.association = association
        self.paused = False

    def datagram_received(self, data: bytes, addr: SockAddr) -> None:
        # The hot path: every check inline, one dict lookup, one sendto of a memoryview.
        a = self.association
        if (addr[1] != a.client_port or addr[0] != a.client_ip) and not a.accept_source(addr):
            return
        if len(data) >= UDP_HEADER_IPV4 and data[3] == 1:  # IPv4, the common case
            end = UDP_HEADER_IPV4
        else:
            try:
                end = udp_header_length(data)
            except RemoteProtocolError:
                a.drop("header")
                return
        if data[2]:
            a.drop("frag")
            return
        key = data[3:end]
        target = a.targets.get(key)
        if target is None:
            a.new_target(key, data, end)
            return
        side = target[0]
        if side.paused or end == len(data) or a.up_bucket is not None:
            a.send(target, data, end)  # the rare cases: congestion, empty, bandwidth limit
            return
        a.datagrams_up += 1
        a.bytes_up += len(data) - end
        side.transport.sendto(memoryview(data)[end:], target[1])  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def error_received(self, exc: Exception) -> None:
        self.association.drop("send")

    def connection_lost(self, exc: Exception | None) -> None:
        self.association.close("UDP socket closed" if exc is None else f"UDP socket error: {exc}")


class TargetSide(asyncio.DatagramProtocol):
    """A socket datagrams to targets leave from, and their answers arrive on: target -> client."""

    def __init__(self, association: UdpAssociation, sock: socket.socket | None = None) -> None:
        self.association = association
        self.sock = sock  # for empty datagrams, which the transport does not send
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def datagram_received(self, data: bytes, addr: SockAddr) -> None:
        a = self.association
        header = a.reply_headers.get(addr)  # keyed by the address tuple as the socket gives it
        if header is None:
            header = a.reply_header(addr)
            if header is None:
                return
        if a.client_side.paused:
            a.drop("congested")
            return
        if a.down_bucket is not None and not a.down_bucket.take_whole(len(data), time.monotonic()):
            a.drop("bandwidth")
            return
        self.deliver(a, header, data)

    def deliver(self, a: UdpAssociation, header: bytes, data: bytes) -> None:
        """Send ``data`` from a target to the client behind its SOCKS UDP ``header``."""
        a.datagrams_down += 1
        a.bytes_down += len(data)
        a.client_transport.sendto(header + data, a.client_addr)  # type: ignore[union-attr]

    def error_received(self, exc: Exception) -> None:
        self.association.drop("send")

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.association.close(f"UDP socket error: {exc}")


class GssapiClientSide(ClientSide):
    """The client side after GSSAPI: each datagram is one RFC 1961 frame, unwrapped first."""

    def __init__(self, association: UdpAssociation, codec: GssapiEncapsulation) -> None:
        super().__init__(association)
        self.codec = codec

    def datagram_received(self, data: bytes, addr: SockAddr) -> None:
        a = self.association
        if addr[0] != a.client_ip:  # a stranger's datagram is not worth a gss_unwrap
            a.drop("source")
            return
        try:
            plain = self.codec.decode_datagram(data)
        except GssapiError as e:
            log.debug("UDP datagram from %s dropped: %s", addr[0], e)
            a.drop("gssapi")
            return
        super().datagram_received(plain, addr)


class GssapiTargetSide(TargetSide):
    """A target side after GSSAPI: header and data go to the client as one RFC 1961 frame."""

    def deliver(self, a: UdpAssociation, header: bytes, data: bytes) -> None:
        codec = cast(GssapiClientSide, a.client_side).codec
        try:
            datagram = codec.encode_datagram(header + data)
        except (ValueError, GssapiError):  # larger than one token can carry, or gss_wrap failed
            a.drop("gssapi")
            return
        a.datagrams_down += 1
        a.bytes_down += len(data)
        a.client_transport.sendto(datagram, a.client_addr)  # type: ignore[union-attr]


class UdpControl(asyncio.Protocol):
    """The TCP control connection of an association: its end is the association's end."""

    def __init__(self, association: UdpAssociation) -> None:
        self.association = association

    def data_received(self, data: bytes) -> None:
        pass  # nothing more is expected from the client; discarded, never buffered

    def eof_received(self) -> bool:
        self.association.close()  # the normal end of an association
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.association.close(None if exc is None else f"control connection lost: {exc}")


class UdpAssociation:
    """The sockets, caches and counters of one UDP ASSOCIATE session (see the module comment)."""

    def __init__(
        self,
        session: CommandSession,
        client: UdpClientFilter,
        terms: RelayTerms,
        codec: GssapiEncapsulation | None = None,
    ) -> None:
        self.session = session
        self.filter = client
        self.client_ip = client.ip
        self.client_port = client.port  # 0 until known: the fast check fails, accept_source runs
        self.client_addr: SockAddr = (client.ip, client.port)
        self.client_transport: asyncio.DatagramTransport | None = None
        self.client_side = ClientSide(self) if codec is None else GssapiClientSide(self, codec)
        self.target_side_class = TargetSide if codec is None else GssapiTargetSide
        self.target_sides: dict[int, TargetSide] = {}
        self.targets: dict[bytes, tuple[TargetSide, SockAddr]] = {}
        self.reply_headers: dict[SockAddr, bytes] = {}
        self.peer_hosts: dict[str, None] = {}  # insertion-ordered set
        self.names: dict[str, tuple[str, float]] = {}  # name -> (IP, expiry)
        self.verdicts: dict[tuple[str | None, str, int], bool] = {}  # access rules, per target
        self.pending: dict[str, list[tuple[bytes, int, int]]] = {}  # name -> [(data, end, port)]
        self.tasks: set[asyncio.Task[None]] = set()
        self.datagrams_up = self.datagrams_down = 0
        self.bytes_up = self.bytes_down = 0
        self.dropped: dict[str, int] = {}
        self.closed = False
        self._idle = terms.idle_timeout
        buckets = terms.buckets
        self.up_bucket: TokenBucket | None = buckets[0] if buckets else None
        self.down_bucket: TokenBucket | None = buckets[1] if buckets else None
        self._idle_sweep: IdleSweep | None = None
        self._control: asyncio.Transport | None = None
        self.activity = ActivityMark(0, 0.0)
        """When the datagram counter last moved, as far as the idle sweep or a query saw."""

    @property
    def up(self) -> int:
        """Bytes (datagram data) relayed from the client so far."""
        return self.bytes_up

    @property
    def down(self) -> int:
        """Bytes (datagram data) relayed to the client so far."""
        return self.bytes_down

    # -- set-up ---------------------------------------------------------------------------------

    async def open(self, local_ip: str, source: SourceAddresses | None = None) -> Address:
        """Create the client side on ``local_ip`` and the target sides (on ``source``'s
        addresses when given); return the bound address."""
        bound = await self.open_client_side(local_ip)
        await self.open_target_sides(source)
        return bound

    async def open_client_side(self, local_ip: str) -> Address:
        """The socket the client sends to, on ``local_ip``; its address."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.client_side, local_addr=(local_ip, 0), family=family
        )
        self.client_transport = transport
        tune_udp_socket(transport)
        host, port = transport.get_extra_info("sockname")[:2]
        return Address.of(host, port)

    async def open_target_sides(self, source: SourceAddresses | None = None) -> None:
        """The sockets datagrams to targets leave from, one per address family (only the
        families ``source`` has an address of, bound there, when given)."""
        loop = asyncio.get_running_loop()
        for fam in (socket.AF_INET, socket.AF_INET6):
            ip = None if source is None else source.for_family(fam)
            if source is not None and ip is None:
                continue  # bind_out/via has no address of this family: its targets drop
            try:
                sock = _target_socket(fam, ip)
            except OSError as e:  # no IPv6 (or no IPv4) on this host: targets of that family drop
                if ip is not None or is_shortage(e):
                    raise  # the bind_out/via address is gone, or no descriptor: the request fails
                continue
            try:
                side_transport, side = await loop.create_datagram_endpoint(
                    functools.partial(self.target_side_class, self, sock), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            tune_udp_socket(side_transport)
            self.target_sides[fam] = side

    def start(self, control: asyncio.Transport, client_eof: bool) -> None:
        """Relay from now on; the association lives as long as ``control`` (and its idle timer)."""
        self._control = control
        control.set_protocol(UdpControl(self))
        if client_eof:
            self.close()
            return
        control.resume_reading()
        self.activity.since = asyncio.get_running_loop().time()
        if self._idle > 0:
            self._idle_sweep = watch_idle(self, self._idle, "UDP association idle", self.activity)

    # -- client -> target -----------------------------------------------------------------------

    def accept_source(self, addr: SockAddr) -> bool:
        """Slow path of the source check: learn the client's port, or drop."""
        if not self.filter.accept(addr[0], addr[1]):
            self.drop("source")
            return False
        self.client_port = self.filter.port
        self.client_addr = addr
        return True

    def destination(self, data: bytes) -> Address | None:
        """The DST.ADDR/DST.PORT of a datagram's header; None (dropped as ``header``) when it is
        malformed."""
        try:
            parsed = parse_address(data, 3)
        except RemoteProtocolError:
            self.drop("header")
            return None
        assert parsed is not None  # udp_header_length checked the length
        return parsed[0]

    def new_target(self, key: bytes, data: bytes, end: int) -> None:
        """First datagram to a target: parse its address, then send it (or resolve the name)."""
        address = self.destination(data)
        if address is None:
            return
        if address.atyp == AddressType.DOMAIN:
            self._to_name(address.host.lower(), address.port, data, end)
            return
        side = self.target_sides.get(
            socket.AF_INET6 if address.atyp == AddressType.IPV6 else socket.AF_INET
        )
        if side is None or side.transport is None:
            self.drop("unresolved")
            return
        if not self.permitted(None, address.host, address.port):
            return
        target = (side, (address.host, address.port))
        if len(self.targets) >= TARGET_CACHE_SIZE:
            self.targets.clear()
        self.targets[key] = target
        self._allow_replies_from(address.host)
        self.send(target, data, end)

    def send(self, target: tuple[TargetSide, SockAddr], data: bytes, end: int) -> None:
        """Send DATA (``data[end:]``, no copy) to the target, unless its socket is congested."""
        side = target[0]
        if side.paused:
            self.drop("congested")
            return
        bucket = self.up_bucket
        if bucket is not None and not bucket.take_whole(len(data) - end, time.monotonic()):
            self.drop("bandwidth")
            return
        self.datagrams_up += 1
        if end == len(data):  # asyncio transports silently skip empty datagrams
            self._send_empty(side, target[1])
            return
        self.bytes_up += len(data) - end
        side.transport.sendto(memoryview(data)[end:], target[1])  # type: ignore[union-attr]

    def _send_empty(self, side: TargetSide, address: SockAddr) -> None:
        try:
            side.sock.sendto(b"", address)  # type: ignore[union-attr]
        except OSError:
            self.drop("send")

    def _allow_replies_from(self, host: str) -> None:
        hosts = self.peer_hosts
        if host not in hosts:
            if len(hosts) >= MAX_PEER_HOSTS:
                del hosts[next(iter(hosts))]
                # the caches may still name the forgotten host: start them afresh (rare)
                self.targets.clear()
                self.reply_headers.clear()
            hosts[host] = None

    def _to_name(self, name: str, port: int, data: bytes, end: int) -> None:
        known = self.names.get(name)
        if known is not None and known[1] > time.monotonic():
            self._send_to_ip(name, known[0], port, data, end)
            return
        queue = self.pending.get(name)
        if queue is not None:
            if len(queue) >= PENDING_PER_NAME:
                self.drop("unresolved")
            else:
                queue.append((data, end, port))
            return
        if len(self.pending) >= MAX_PENDING_NAMES:
            self.drop("unresolved")
            return
        self.pending[name] = [(data, end, port)]
        task = asyncio.get_running_loop().create_task(self._resolve(name, port))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _resolve(self, name: str, port: int) -> None:
        ip: str | None = None
        try:
            metrics = self.session.metrics
            resolving = self.session.resolver.resolve(name, port)
            infos = await (resolving if metrics is None else timed(resolving, metrics.resolved))
            families = [info for info in infos if info[0] in self.target_sides]
            if families:
                ip = str(families[0][4][0])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a failed lookup drops its datagrams; it cannot be answered
            log.debug("UDP target %s does not resolve: %s", name, e)
        queue = self.pending.pop(name, [])
        if self.closed:
            return
        if ip is None:
            self.drop("unresolved", len(queue))
            return
        if len(self.names) >= MAX_NAMES:
            self.names.clear()
        self.names[name] = (ip, time.monotonic() + NAME_TTL)
        for data, end, dport in queue:
            self._send_to_ip(name, ip, dport, data, end)

    def _send_to_ip(self, name: str, ip: str, port: int, data: bytes, end: int) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        side = self.target_sides.get(family)
        if side is None or side.transport is None:
            self.drop("unresolved")
            return
        if not self.permitted(name, ip, port):
            return
        self._allow_replies_from(ip)
        self.send((side, (ip, port)), data, end)

    # -- target -> client -----------------------------------------------------------------------

    def reply_header(self, source: SockAddr) -> bytes | None:
        """The header for datagrams from ``source``, or None (dropped) for a stranger."""
        if source[0] not in self.peer_hosts:
            self.drop("reply_source")
            return None
        header = udp_reply_header(source[0], source[1])
        if len(self.reply_headers) >= REPLY_HEADER_CACHE_SIZE:
            self.reply_headers.clear()
        self.reply_headers[source] = header
        return header

    # -- accounting and end ---------------------------------------------------------------------

    def permitted(self, name: str | None, ip: str, port: int) -> bool:
        """The access rules for one destination of this association (drop ``denied`` if not).

        Each datagram's destination is a request of its own: the rules see command ``udp``, the
        name the client gave (if any) and the address it resolved to, so ``to``/``ports`` rules
        and ``protect_local`` hold for datagrams as they do for CONNECT. Verdicts are cached per
        (name, address, port) until a reload (:meth:`reloaded`).
        """
        key = (name, ip, port)
        verdict = self.verdicts.get(key)
        if verdict is None:
            verdict = self.session.destination_allowed(name, ip, port)
            if len(self.verdicts) >= TARGET_CACHE_SIZE:
                self.verdicts.clear()
            self.verdicts[key] = verdict
        if not verdict:
            self.drop("denied")
        return verdict

    def reloaded(self) -> None:
        """A reload: every destination is checked and resolved afresh, as for a new request.

        The caches of target addresses (whose datagrams skip the rules), rule verdicts and
        resolved names are all derived from the old rules and resolver."""
        self.targets.clear()
        self.verdicts.clear()
        self.names.clear()

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` datagrams dropped for ``reason``."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def stats(self) -> UdpStats:
        return UdpStats(self.datagrams_up, self.datagrams_down, dict(self.dropped))

    def traffic(self) -> int:
        """Datagrams relayed both ways so far: what the idle timeout watches."""
        return self.datagrams_up + self.datagrams_down

    def quiet_for(self, now: float) -> float:
        """Seconds since a datagram last went either way, to within the time since the last
        look (the idle sweep's or a query's); ``now`` is the event loop's time."""
        return self.activity.see(self.traffic(), now)

    def close_sockets(self) -> None:
        """Close every UDP socket now: nothing is relayed after this returns."""
        if self.client_transport is not None:
            self.client_transport.abort()
        for side in self.target_sides.values():
            if side.transport is not None:
                side.transport.abort()
        for task in self.tasks:
            task.cancel()

    def close(self, reason: str | None = None) -> None:
        """End the association: UDP sockets, control connection, access-log line."""
        if self.closed:
            return
        self.closed = True
        self.close_sockets()
        if self._idle_sweep is not None:
            self._idle_sweep.discard(self)
        if self._control is not None:
            self._control.close()
        session = self.session
        session.record.udp = self.stats()
        session.finish(reason, self.bytes_up, self.bytes_down)

    def abort(self, error: str) -> None:
        """End at once (shutdown deadline)."""
        if self._control is not None and not self.closed:
            self._control.abort()
        self.close(error)


async def udp_associate(session: CommandSession, address: Address) -> None:
    """Carry out one UDP ASSOCIATE request."""
    config = session.config
    control = session.client
    local_ip = str(control.get_extra_info("sockname")[0])
    association = UdpAssociation(
        session, UdpClientFilter(session.client_host, address), session.terms(), session.codec
    )
    try:
        bound = await association.open(bind_address(config.advertise, local_ip), session.outgoing)
    except asyncio.CancelledError:
        association.close_sockets()
        raise
    except Exception as e:  # every failure is a reply code, never a crash
        association.close_sockets()
        answer_failure(session, "UDP ASSOCIATE", e, f"UDP ASSOCIATE: {e or type(e).__name__}")
        return
    if session.closed:
        association.close_sockets()
        return
    advertised = Address.of(config.advertise, bound.port) if config.advertise else bound
    session.record.remote = str(bound)
    session.reply(ReplyCode.SUCCEEDED, advertised)
    session.hand_over(association)
    association.start(control, session.client_eof)
