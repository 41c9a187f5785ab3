"""The HTTP CONNECT handshake of a session (``protocols`` has ``http``).

The request head is read with h11 (``socksd.protocol.http_connect``: CONNECT only, bounded head
size and field count; the session's handshake timeout bounds the time), then the login, then the
request goes to the session as a SOCKS5 CONNECT, so rules, limits, the resolver, the CONNECT
command, relay, access log and metrics are SOCKS5's.

Login: ``Proxy-Authorization: Basic`` is checked like an RFC 1929 login
(``socksd.server.handshake.login``: same user file, cache, checkpoint and throttle, failures
delayed the same). None, or a wrong one, is answered 407 with ``Proxy-Authenticate`` when the
server requires a login (``none`` not in its methods); a login refused by the throttle's
checkpoint is answered 503. Without a user file, credentials are ignored.

Replies (:class:`HttpCodec`): 200 ``Connection established`` for success; failures by
``http_connect.HTTP_STATUS_FOR``; a session limit (``max_sessions_per_user``) 503. Bytes the
client sent after the blank line are relayed first.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from socksd.accesslog import user_name
from socksd.protocol import (
    AuthMethod,
    Command,
    GssapiEncapsulation,
    RemoteProtocolError,
    Reply,
    Request,
    State,
    http_connect,
)
from socksd.protocol.http_connect import ConnectRequest, HttpConnectError, HttpConnectReader
from socksd.protocol.sniff import WireProtocol
from socksd.server.handshake.admission import LoginRefusal
from socksd.server.handshake.login import check_login
from socksd.server.handshake.mixed import Handshake

if TYPE_CHECKING:
    from socksd.server.handshake.session import Session


class HttpCodec:
    """An HTTP session's connection: the request reader, then what follows the request head."""

    __slots__ = ("_after", "reader", "session", "state")

    encapsulation: GssapiEncapsulation | None = None

    def __init__(self, session: Session) -> None:
        self.session = session
        self.reader = HttpConnectReader()
        self.state = State.REQUEST
        self._after = bytearray()
        """Bytes received after the request was read (the reader keeps those read with it)."""

    @property
    def buffered(self) -> int:
        return len(self._after)

    def receive_data(self, data: bytes) -> None:
        self._after += data

    def trailing_data(self) -> bytes:
        data = self.reader.trailing_data() + bytes(self._after)
        self._after.clear()
        return data

    def send(self, reply: Reply) -> bytes:
        if reply.ok:
            self.state = State.ESTABLISHED
            return http_connect.established()
        self.state = State.CLOSED
        refusal = self.session.refused_by
        if refusal is not None and refusal.limit is not None:
            return http_connect.error_response(http_connect.LIMIT_STATUS)
        return http_connect.response_for_reply(reply.reply)


class HttpHandshake(Handshake):
    """Reads one CONNECT request, checks its login, hands it to the session."""

    protocol = WireProtocol.HTTP
    codec: HttpCodec

    def __init__(self, session: Session) -> None:
        super().__init__(session, HttpCodec(session))

    def parser(self) -> HttpConnectReader:
        return self.codec.reader

    def malformed(self, error: RemoteProtocolError) -> None:
        assert isinstance(error, HttpConnectError)
        self._refuse(self.codec.reader.refusal(error), f"HTTP {error.status}: {error}")

    def request(self, event: object) -> None:
        session = self.session
        assert isinstance(event, ConnectRequest)
        self.codec.state = State.REPLY
        session.record.target = str(event.address)
        ctx = session.ctx
        if AuthMethod.NO_AUTH in ctx.methods and (
            event.credentials is None or ctx.authenticator is None
        ):
            session._request(Request(Command.CONNECT, event.address))  # no login to check
            return
        session.transport.pause_reading()
        session.task = asyncio.get_running_loop().create_task(self._login(event))

    def timed_out(self, timeout: float) -> None:
        """408 while the head is not whole (RFC 9110 15.5.9); later the login or the request
        is under way, with its own answer."""
        if not self.requested:
            self.codec.state = State.CLOSED
            detail = f"no complete request head within {timeout:g}s"
            self.session.transport.write(http_connect.error_response(408, detail))

    def _refuse(self, response: bytes, error: str) -> None:
        self.codec.state = State.CLOSED
        self.session.transport.write(response)
        self.session.close(error)

    async def _login(self, request: ConnectRequest) -> None:
        """The login the server requires, if any; then the request."""
        session = self.session
        ctx = session.ctx
        creds = request.credentials
        if creds is not None and ctx.authenticator is not None:
            session.record.user = user = user_name(creds.username)
            ok = await check_login(session, creds.username, creds.password, user)
            if isinstance(ok, LoginRefusal):
                response = http_connect.error_response(http_connect.LIMIT_STATUS, str(ok))
                self._refuse(response, f"login refused: {ok}")
                return
            if not ok:
                self._refuse(http_connect.proxy_auth_required(), "authentication failed")
                return
        elif AuthMethod.NO_AUTH not in ctx.methods:
            self._refuse(http_connect.proxy_auth_required(), "no Proxy-Authorization login")
            return
        if session.closed:
            return
        session.transport.resume_reading()
        session._request(Request(Command.CONNECT, request.address))
