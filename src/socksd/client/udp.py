"""UDP ASSOCIATE through a SOCKS5 proxy: send and receive datagrams relayed by the proxy.

>>> async with socksd.client.udp_associate("127.0.0.1:1080") as assoc:
...     await assoc.sendto(b"query", ("dns.example", 53))
...     data, (host, port) = await assoc.recvfrom()

How it works: a TCP connection to the proxy carries the handshake and then stays open (the
association lives as long as it does). The local UDP socket is bound first, on the address the
TCP connection uses, so its address can be declared in the request (the proxy then accepts
datagrams from that address only); after the reply it is connected to the relay's BND address
(the kernel then drops datagrams from anyone else). Each datagram carries the SOCKS UDP header
(RFC 1928 section 7): host names are sent as names and resolved by the proxy.

Received datagrams wait in a bounded queue (``queue_size``); when it is full, new ones are dropped
and counted in ``dropped``, as a UDP socket's own buffer would. Fragments (FRAG != 0) are dropped.
When the proxy closes the TCP connection the association is over: ``recvfrom`` and ``sendto``
raise :class:`~socksd.client.errors.ProxyConnectionError`. ``create_udp_association`` is the
blocking version.

Authentication is the same as CONNECT's (``client_handshake``, driven by ``async_io`` or
``sync_io``). After GSSAPI (RFC 1961) each datagram, both ways, is one MTYP=3 frame whose payload
is the SOCKS UDP datagram (header and DATA), as socksd's relay expects: ``_pack`` wraps,
``_unpack`` unwraps, and a datagram that fails gss_unwrap (tampered, replayed, or refused by the
mechanism's sequence checks) is dropped and counted like a malformed one. A datagram larger than
one token can carry raises ValueError in ``sendto``. Both association classes hide the framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, cast

from socksd.client import async_io, sync_io
from socksd.client.async_io import Opening
from socksd.client.errors import ProxyConnectionError, ProxyTimeoutError, proxy_errors
from socksd.client.handshake import advertised
from socksd.client.proxy import ProxyLike, as_proxy
from socksd.protocol import (
    Address,
    Command,
    GssapiEncapsulation,
    RemoteProtocolError,
    UdpDatagram,
)

Datagram = tuple[bytes, tuple[str, int]]


def _bind_beside(local_ip: str, family: int, into: list[socket.socket]) -> Address:
    """Bind a UDP socket on the control connection's local address; append it to ``into``."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    into.append(sock)
    sock.bind((local_ip, 0))
    return Address.of(*sock.getsockname()[:2])


def _pack(data: bytes, address: tuple[str, int], codec: GssapiEncapsulation | None) -> bytes:
    """The datagram to send to the relay: SOCKS UDP header and ``data``, one frame after GSSAPI."""
    datagram = UdpDatagram(Address.of(*address), data).to_bytes()
    return datagram if codec is None else codec.encode_datagram(datagram)


def _unpack(data: bytes, codec: GssapiEncapsulation | None) -> Datagram | None:
    """(data, source) of a datagram from the relay; None to drop it."""
    try:
        datagram = UdpDatagram.parse(data if codec is None else codec.decode_datagram(data))
    except RemoteProtocolError:  # GssapiError included
        return None
    if datagram.frag:
        return None
    return datagram.data, (datagram.address.host, datagram.address.port)


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, association: UdpAssociation) -> None:
        self.association = association

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.association._received(data)

    def error_received(self, exc: Exception) -> None:
        self.association.errors += 1


class UdpAssociation:
    """An open UDP association: ``sendto`` / ``recvfrom`` through the proxy's relay."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        relay: tuple[str, int],
        queue_size: int,
        codec: GssapiEncapsulation | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._codec = codec
        self.relay = relay
        """The relay's address (BND.ADDR/BND.PORT of the reply)."""
        self.dropped = 0
        """Datagrams dropped on arrival: queue full, malformed, a fragment or failing GSSAPI."""
        self.errors = 0
        self._queue: asyncio.Queue[Datagram | None] = asyncio.Queue(queue_size)
        self._transport: asyncio.DatagramTransport | None = None
        self._closed: str | None = None
        self._watch: asyncio.Task[None] | None = None

    async def _start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.connect(self.relay)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Receiver(self), sock=sock)
        self._transport = transport
        self._watch = loop.create_task(self._watch_control())

    async def _watch_control(self) -> None:
        try:
            while await self._reader.read(4096):
                pass  # the proxy has nothing to say on it; its end is the association's end
            reason = "the proxy closed the association"
        except OSError as e:
            reason = f"the association's control connection failed: {e}"
        self._end(reason)

    def _end(self, reason: str) -> None:
        if self._closed is not None:
            return
        self._closed = reason
        if self._transport is not None:
            self._transport.close()
        self._writer.close()
        queue = self._queue
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(None)  # wakes a waiting recvfrom

    def _received(self, data: bytes) -> None:
        parsed = _unpack(data, self._codec)
        if parsed is None or self._queue.full():
            self.dropped += 1
            return
        self._queue.put_nowait(parsed)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def local_address(self) -> tuple[str, int]:
        """The local UDP socket's address (declared to the proxy)."""
        assert self._transport is not None
        return cast(tuple[str, int], self._transport.get_extra_info("sockname")[:2])

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        """Send ``data`` to ``address`` (host name or IP literal, port) through the relay."""
        if self._closed is not None or self._transport is None:
            raise ProxyConnectionError(f"UDP association closed: {self._closed}")
        self._transport.sendto(_pack(data, address, self._codec))

    async def recvfrom(self, timeout: float | None = None) -> Datagram:
        """The next datagram and the (host, port) it came from; ProxyTimeoutError on timeout."""
        try:
            async with asyncio.timeout(timeout):
                item = await self._queue.get()
        except TimeoutError:
            raise ProxyTimeoutError("no datagram in time") from None
        if item is None:
            self._queue.put_nowait(None)  # every later call fails the same way
            raise ProxyConnectionError(f"UDP association closed: {self._closed}")
        return item

    async def aclose(self) -> None:
        """End the association (closes the TCP connection, which ends it on the proxy too)."""
        self._end("closed by the client")
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def _open_udp(proxy: ProxyLike, timeout: float, queue_size: int) -> UdpAssociation:
    p = as_proxy(proxy)
    udp: list[socket.socket] = []

    def declare(writer: asyncio.StreamWriter) -> Address:
        local = writer.get_extra_info("sockname")[0]
        return _bind_beside(local, writer.get_extra_info("socket").family, udp)

    try:
        reader, writer, hs, _ = await async_io.open_session(
            p, Command.UDP_ASSOCIATE, declare, timeout
        )
        relay = advertised(hs.replies[0], p.host)
        association = UdpAssociation(reader, writer, relay, queue_size, hs.encapsulation)
        try:
            with proxy_errors(f"UDP relay {relay} of {p.where}"):
                await association._start(udp[0])
        except BaseException:
            writer.close()
            raise
    except BaseException:
        for sock in udp:
            sock.close()
        raise
    return association


def udp_associate(
    proxy: ProxyLike, *, timeout: float = 10.0, queue_size: int = 1024
) -> Opening[UdpAssociation]:
    """Open a UDP association through ``proxy``; ``timeout`` bounds the handshake.

    ``await`` it for a :class:`UdpAssociation`, or use ``async with`` to close it at the end.
    """
    return Opening(_open_udp(proxy, timeout, queue_size))


class BlockingUdpAssociation:
    """The blocking UDP association: ``sendto`` / ``recvfrom`` on plain sockets.

    ``sock`` is the UDP socket connected to the relay (after GSSAPI it carries RFC 1961 frames:
    use ``sendto``/``recvfrom``, which wrap and unwrap); ``control`` the TCP connection whose end
    ends the association.
    """

    def __init__(
        self,
        control: socket.socket,
        sock: socket.socket,
        relay: tuple[str, int],
        codec: GssapiEncapsulation | None = None,
    ) -> None:
        self.control = control
        self.sock = sock
        self.relay = relay
        self.dropped = 0
        """Datagrams skipped by ``recvfrom``: malformed, a fragment or failing GSSAPI."""
        self._codec = codec

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        """Send ``data`` to ``address`` (host name or IP literal, port) through the relay."""
        self.sock.send(_pack(data, address, self._codec))

    def recvfrom(self, timeout: float | None = None) -> Datagram:
        """The next well-formed datagram; TimeoutError (ProxyTimeoutError) after ``timeout``."""
        self.sock.settimeout(timeout)
        while True:
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                raise ProxyTimeoutError("no datagram in time") from None
            parsed = _unpack(data, self._codec)
            if parsed is not None:
                return parsed
            self.dropped += 1

    def close(self) -> None:
        self.sock.close()
        self.control.close()

    def __enter__(self) -> BlockingUdpAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def create_udp_association(proxy: ProxyLike, *, timeout: float = 10.0) -> BlockingUdpAssociation:
    """Blocking UDP ASSOCIATE through ``proxy`` (GSSAPI included: the framing stays inside)."""
    p = as_proxy(proxy)
    udp: list[socket.socket] = []

    def declare(control: socket.socket) -> Address:
        return _bind_beside(control.getsockname()[0], control.family, udp)

    try:
        control, hs, _ = sync_io.open_session(p, Command.UDP_ASSOCIATE, declare, timeout)
        relay = advertised(hs.replies[0], p.host)
        try:
            with proxy_errors(f"UDP relay {relay} of {p.where}"):
                udp[0].connect(relay)
        except BaseException:
            control.close()
            raise
    except BaseException:
        for sock in udp:
            sock.close()
        raise
    return BlockingUdpAssociation(control, udp[0], relay, hs.encapsulation)
