"""One listener for SOCKS5, SOCKS4/4a and HTTP CONNECT: the first byte decides (``protocols``).

A :class:`~socksd.server.handshake.session.Session` reads SOCKS5 itself. When a connection's
first byte (after the PROXY header of a trusted load balancer) is not SOCKS5's ``0x05``, the
session calls :func:`take_over`, which sniffs the protocol (``socksd.protocol.sniff``) and

- for a protocol in ``protocols``, gives the connection to its handshake: a :class:`Handshake`
  subclass (``handshake.socks4``, ``handshake.http``) that becomes the transport's protocol until
  the request is read, then hands the request to the session (``Session._request``), so
  admission, rules, limits, commands, relay, access log, metrics and ``socksd sessions`` are the
  SOCKS5 ones;
- for a protocol not in ``protocols``, closes the connection without an answer; its access-log
  line says which protocol was refused;
- for a first byte of no known protocol, does nothing: the SOCKS5 parser refuses it as before.

The handshake also replaces the session's sans-I/O connection (``Session.conn``) by its
:class:`RequestCodec`: commands write their replies through ``Session.reply``, which asks the
codec for the bytes of a SOCKS5-terms outcome, so the reply encoding of each protocol lives in its
codec and no command knows which protocol its client speaks. The codec keeps what the client
sends after its request for the relay (``trailing_data``), as the SOCKS5 connection does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

import socksd.server.handshake.session as session_module
from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    GssapiEncapsulation,
    RemoteProtocolError,
    Reply,
    ServerConnection,
    State,
)
from socksd.protocol.sniff import WireProtocol, sniff

if TYPE_CHECKING:
    from socksd.server.handshake.session import Session

log = logging.getLogger("socksd.session")


class RequestCodec(Protocol):
    """What a session and its command use of the sans-I/O connection once the request is in."""

    @property
    def state(self) -> State:
        """REPLY while the command runs, BIND_WAIT between BIND's replies, then ESTABLISHED."""

    @property
    def encapsulation(self) -> GssapiEncapsulation | None:
        """None: only SOCKS5 has GSSAPI encapsulation."""

    @property
    def buffered(self) -> int:
        """Bytes the client sent after its request, kept for the relay."""

    def receive_data(self, data: bytes) -> None:
        """Keep bytes the client sends after its request."""

    def send(self, reply: Reply) -> bytes:
        """The bytes that tell this protocol's client the outcome ``reply`` (SOCKS5 terms)."""

    def trailing_data(self) -> bytes:
        """The kept bytes, once: the relay sends them on first."""


class RequestParser(Protocol):
    """What :meth:`Handshake.feed` needs of a protocol's sans-I/O request reader."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> object: ...


class Handshake(asyncio.Protocol):
    """The client's connection from its first byte to its request, for SOCKS4 or HTTP.

    :meth:`feed` reads the request with the subclass's :meth:`parser` (``b""``: the client
    closed) and gives it to :meth:`request` once it is whole, or a refused one to
    :meth:`malformed`; after that, bytes are kept in the codec for the relay (reading
    pauses past ``PENDING_LIMIT``), and an EOF is kept for the relay too."""

    protocol: WireProtocol

    def __init__(self, session: Session, codec: RequestCodec) -> None:
        self.session = session
        self.codec = codec
        self.requested = False

    def start(self, data: bytes) -> None:
        """Take the session's connection over, with its first bytes."""
        session = self.session
        session.record.protocol = self.protocol.value
        # From here on the session uses only the RequestCodec part of its connection object.
        session.conn = cast(ServerConnection, self.codec)
        session.transport.set_protocol(self)
        self.data_received(data)

    def feed(self, data: bytes) -> None:
        """The client's bytes before its request is whole; ``b""`` is its EOF."""
        parser = self.parser()
        parser.receive_data(data)
        try:
            event = parser.next_event()
        except RemoteProtocolError as e:
            self.malformed(e)
            return
        if event is NEED_DATA:
            return
        if event is CONNECTION_CLOSED:
            self.session.close("client closed during handshake")
            return
        self.requested = True
        self.request(event)

    def parser(self) -> RequestParser:
        """The sans-I/O reader of this protocol's request."""
        raise NotImplementedError

    def malformed(self, error: RemoteProtocolError) -> None:
        """Answer a request the parser refused (its protocol's error reply), and close."""
        raise NotImplementedError

    def request(self, event: object) -> None:
        """Act on the whole request the parser read."""
        raise NotImplementedError

    def timed_out(self, timeout: float) -> None:
        """The handshake timeout ended the session: say so if the protocol can (closed next)."""

    def data_received(self, data: bytes) -> None:
        if not self.requested:
            self.feed(data)
            return
        codec = self.codec
        codec.receive_data(data)  # the command runs: kept for the target
        if codec.buffered > session_module.PENDING_LIMIT:
            self.session.transport.pause_reading()

    def eof_received(self) -> bool:
        self.session.client_eof = True
        if not self.requested:
            self.feed(b"")
        return True  # keep the write side for the reply and the relay

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)


def take_over(session: Session, data: bytes) -> bool:
    """Give a connection whose first bytes are ``data`` (not SOCKS5) to its protocol's handshake,
    or close it when that protocol is not enabled; False: no known protocol (left to SOCKS5)."""
    protocol = sniff(data)
    if protocol is WireProtocol.UNKNOWN or protocol is WireProtocol.SOCKS5:
        return False
    if protocol.value not in session.ctx.config.protocols:
        log.debug("closing %s: it speaks %s, not enabled", session.record.client, protocol.value)
        session.record.protocol = protocol.value
        session.close(f"{protocol.value} is not enabled (protocols)")
        return True
    if protocol is WireProtocol.SOCKS4:
        from socksd.server.handshake.socks4 import Socks4Handshake

        Socks4Handshake(session).start(data)
    else:
        from socksd.server.handshake.http import HttpHandshake

        HttpHandshake(session).start(data)
    return True
