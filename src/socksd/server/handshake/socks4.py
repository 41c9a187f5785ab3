"""The SOCKS4 and SOCKS4a handshake of a session (``protocols`` has ``socks4``).

The request (``socksd.protocol.socks4``) is read, then handed to the session as a SOCKS5 request
of the same command and address, so the rules, ``protect_local``, limits, the resolver (4a names)
and the commands (CONNECT, BIND) are SOCKS5's. USERID is logged (the access log's ``userid``),
never taken for a login: SOCKS4 has no password, so when the server requires a login (a user file
or GSSAPI, and no ``none`` in ``methods``) a SOCKS4 request is refused (91) unless an allow rule
with ``socks4 = true`` holds the client's address (``RuleSet.socks4_rule``).

Replies (:class:`Socks4Codec`): the outcome in SOCKS5 terms becomes 90 or 91
(``socks4_reply_code``). A BIND's first reply must carry the IPv4 address the server listens on;
when that is an IPv6 address (a listener on IPv6), the BIND is refused with 91 and the log says
why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from socksd.accesslog import user_name
from socksd.protocol import (
    Address,
    AddressType,
    Command,
    GssapiEncapsulation,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Request,
    State,
)
from socksd.protocol.sniff import WireProtocol
from socksd.protocol.socks4 import Socks4Error, Socks4Request, Socks4ServerConnection
from socksd.server.handshake.mixed import Handshake

if TYPE_CHECKING:
    from socksd.server.handshake.session import Session

log = logging.getLogger("socksd.session")


def _carries_ipv4(address: Address) -> bool:
    """A SOCKS4 reply can carry ``address``: IPv4, or IPv6 mapping an IPv4 address."""
    if address.atyp is AddressType.IPV4:
        return True
    return getattr(address.ip, "ipv4_mapped", None) is not None


class Socks4Codec:
    """A SOCKS4 session's connection once the request is in: replies in SOCKS4's terms."""

    __slots__ = ("conn", "session")

    encapsulation: GssapiEncapsulation | None = None

    def __init__(self, session: Session) -> None:
        self.session = session
        self.conn = Socks4ServerConnection()

    @property
    def state(self) -> State:
        return self.conn.state

    @property
    def buffered(self) -> int:
        return self.conn.buffered

    def receive_data(self, data: bytes) -> None:
        self.conn.receive_data(data)

    def trailing_data(self) -> bytes:
        return self.conn.trailing_data()

    def send(self, reply: Reply) -> bytes:
        conn = self.conn
        if not reply.ok:
            return conn.reply(reply.reply)
        first_bind = conn.state is State.REPLY and conn.command is Command.BIND
        if first_bind and not _carries_ipv4(reply.address):
            why = (
                f"SOCKS4 BIND: the listening address {reply.address} is not IPv4, which a "
                "SOCKS4 reply cannot carry"
            )
            log.warning("refusing the BIND of %s: %s", self.session.record.client, why)
            asyncio.get_running_loop().call_soon(self._refuse_bind, why)
            return conn.reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
        return conn.reply(reply.reply, reply.address)

    def _refuse_bind(self, why: str) -> None:
        """After a refused BIND's 91 is written: end the session (its listener with it)."""
        self.session.record.reply = ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        self.session.abandon(why)


class Socks4Handshake(Handshake):
    """Reads one SOCKS4/4a request and hands it to the session."""

    protocol = WireProtocol.SOCKS4
    codec: Socks4Codec

    def __init__(self, session: Session) -> None:
        super().__init__(session, Socks4Codec(session))

    def parser(self) -> Socks4ServerConnection:
        return self.codec.conn

    def malformed(self, error: RemoteProtocolError) -> None:
        session, conn = self.session, self.codec.conn
        assert isinstance(error, Socks4Error)
        session.transport.write(conn.refusal(error))
        session.record.reply = conn.refused_reply
        session.close(f"protocol error: {error}")

    def request(self, event: object) -> None:
        session = self.session
        assert isinstance(event, Socks4Request)
        record = session.record
        record.userid = user_name(event.userid)
        ctx = session.ctx
        if ctx.config.requires_auth and ctx.rules.socks4_rule(session.admission.ip) is None:
            session.cancel_handshake_timer()
            record.command, record.target = event.command.name, str(event.address)
            session.fail(
                ReplyCode.NOT_ALLOWED,
                "SOCKS4 has no login and no rule with socks4 = true holds the client's address",
            )
            return
        session._request(Request(event.command, event.address))
