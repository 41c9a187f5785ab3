"""The client's side of the handshake as a pure driver over :class:`ClientConnection`.

``ClientHandshake`` decides what the client says (the methods it offers, its credentials, its
request); the async and sync wrappers only move bytes: they write ``data_to_send()``, feed what
they read to ``receive_data()`` and stop when ``done``. The replies end up in ``replies``.

GSSAPI (RFC 1961): the sub-negotiation is ``GssapiClientNegotiation``; the mechanism's steps
(gss_init_sec_context, which may ask the KDC for a ticket) are the one blocking thing, so the
handshake does not run them itself: while ``step_pending`` the wrapper calls ``run_step()``
(the asyncio one on a thread). Once the level is agreed the request and reply are encapsulated and
``encapsulation`` is the codec the caller's streams go on with.

:func:`client_handshake` is the one place that builds it from a :class:`~socksd.client.proxy.Proxy`
for every command (CONNECT, BIND, UDP ASSOCIATE): the methods offered depend on the proxy only,
never on the command. ``ClientHandshake`` raises the client's errors for what the proxy answers
(a refused method or login, a failure reply); a proxy breaking the protocol raises
``RemoteProtocolError`` (``GssapiError`` for a bad RFC 1961 frame), which the I/O drivers turn into
the client's errors with ``socksd.client.errors.proxy_errors``.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from socksd.client.errors import AuthenticationError, ProxyConnectionError, ReplyError
from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    AuthMethod,
    ClientConnection,
    Command,
    Greeting,
    GssapiClientNegotiation,
    GssapiEncapsulation,
    GssapiError,
    GssapiMessage,
    GssapiMessageType,
    LevelAgreed,
    MechanismStep,
    MethodSelection,
    ProtectionLevel,
    Reply,
    Request,
    State,
    UserPassReply,
    UserPassRequest,
)
from socksd.protocol.address import Address
from socksd.protocol.udp import is_unspecified

if TYPE_CHECKING:
    from socksd.auth.gssapi import InitiatorContext
    from socksd.client.gssapi import GssapiOptions
    from socksd.client.proxy import Proxy


def service_hostname(host: str) -> str:
    """The host part of the proxy's service name: ``host``, or for an IP literal its DNS name
    (as Dante's client does), else the literal itself."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return host
    try:
        return socket.getnameinfo((host, 0), socket.NI_NAMEREQD)[0]
    except OSError:
        return host


def advertised(reply: Reply, proxy_host: str) -> tuple[str, int]:
    """(host, port) of a reply's BND, with an unspecified address replaced by the proxy's."""
    if is_unspecified(reply.address):
        return proxy_host, reply.address.port
    return reply.address.host, reply.address.port


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def client_handshake(proxy: Proxy, command: Command, address: Address) -> ClientHandshake:
    """The handshake of ``command`` to ``address`` through ``proxy``, for every command and driver.

    Methods: GSSAPI when ``proxy.gssapi`` is set (plus username/password with credentials, never
    "no authentication"); else username/password and no authentication, or no authentication
    only. A BIND stops after its first reply (``expect_second_reply`` waits for the peer).
    """
    hs = ClientHandshake(
        command,
        address,
        username=proxy.username,
        password=proxy.password,
        gssapi=proxy.gssapi,
        proxy_host=proxy.host,
    )
    if command == Command.BIND:
        hs.first_reply_only()
    return hs


class ClientHandshake:
    """Greeting, authentication and one request, with the replies it expects."""

    def __init__(
        self,
        command: Command,
        address: Address,
        *,
        username: str | bytes | None = None,
        password: str | bytes | None = None,
        gssapi: GssapiOptions | None = None,
        proxy_host: str = "localhost",
    ) -> None:
        """``gssapi``: offer GSSAPI (and no longer "no authentication"); ``proxy_host`` is the
        default host part of its service name."""
        self.conn = ClientConnection()
        self.request = Request(command, address)
        self.credentials: UserPassRequest | None = None
        methods: tuple[int, ...] = (AuthMethod.NO_AUTH,)
        if username is not None:
            self.credentials = UserPassRequest(_as_bytes(username), _as_bytes(password or b""))
            methods = (AuthMethod.USERNAME_PASSWORD, AuthMethod.NO_AUTH)
        self.gssapi: InitiatorContext | None = None
        self.negotiation: GssapiClientNegotiation | None = None
        self._step: bytes | None = None
        if gssapi is not None:
            self._setup_gssapi(gssapi, proxy_host)
            methods = (AuthMethod.GSSAPI,)
            if self.credentials is not None:
                methods += (AuthMethod.USERNAME_PASSWORD,)
        self.replies: list[Reply] = []
        self._out = bytearray(self.conn.send(Greeting(methods)))
        self._wanted = 2 if command == Command.BIND else 1

    def _setup_gssapi(self, options: GssapiOptions, proxy_host: str) -> None:
        try:
            import socksd.auth.gssapi  # noqa: F401 (fail early, not in the middle of a handshake)
        except ImportError as e:
            raise AuthenticationError(
                f"GSSAPI needs the Python package 'gssapi' ({e}): pip install 'socksd[gssapi]'"
            ) from None
        self._gssapi_options = options
        self._gssapi_host = options.hostname or proxy_host
        accepted = None
        if options.accept_levels is not None:
            accepted = [ProtectionLevel(level) for level in options.accept_levels]
        self.negotiation = GssapiClientNegotiation(
            self._wrap, self._unwrap, ProtectionLevel(options.level), accepted
        )

    def _wrap(self, data: bytes, confidential: bool) -> bytes:
        assert self.gssapi is not None
        return self.gssapi.wrap(data, confidential)

    def _unwrap(self, token: bytes) -> tuple[bytes, bool]:
        assert self.gssapi is not None
        return self.gssapi.unwrap(token)

    @property
    def step_pending(self) -> bool:
        """A GSS-API mechanism step is due: call ``run_step()`` (it may block) before reading."""
        return self._step is not None

    def run_step(self) -> None:
        """Run the pending gss_init_sec_context step and queue its message.

        On failure the RFC 1961 abort message is queued (send it if you can) and
        AuthenticationError is raised.
        """
        token, self._step = self._step, None
        assert token is not None and self.negotiation is not None
        try:
            if self.gssapi is None:  # here, not earlier: naming the proxy may ask the DNS
                from socksd.auth.gssapi import InitiatorContext

                options = self._gssapi_options
                host = service_hostname(self._gssapi_host)
                self.gssapi = InitiatorContext(options.service, host, options.credentials)
            output, complete = self.gssapi.step(token)
            message = self.negotiation.context_step(output, complete)
        except GssapiError as e:
            self._out += self.conn.send(self.negotiation.abort())
            raise AuthenticationError(f"GSSAPI: {e}") from None
        self._out += self.conn.send(message)

    @property
    def encapsulation(self) -> GssapiEncapsulation | None:
        """The RFC 1961 codec the connection goes on with after a GSSAPI handshake."""
        return self.conn.encapsulation

    @property
    def done(self) -> bool:
        """True once the reply (both replies for BIND, see ``wait_second``) has arrived."""
        return len(self.replies) >= self._wanted

    def data_to_send(self) -> bytes:
        """Bytes to write to the proxy now (possibly empty)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def first_reply_only(self) -> None:
        """For BIND: stop after the first reply (the second one is awaited separately)."""
        self._wanted = 1

    def expect_second_reply(self) -> None:
        """For BIND: wait for the second reply next (it may already be buffered: see ``done``)."""
        self._wanted = 2
        self._advance(eof=False)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the proxy (``b""`` at end of stream) and advance."""
        self.conn.receive_data(data)
        self._advance(eof=data == b"")

    def _advance(self, *, eof: bool) -> None:
        conn = self.conn
        while not self.done and not self.step_pending:
            event = conn.next_event()
            if event is NEED_DATA:
                if eof:
                    raise ProxyConnectionError("proxy closed the connection during the handshake")
                return
            if event is CONNECTION_CLOSED:
                raise ProxyConnectionError("proxy closed the connection during the handshake")
            if isinstance(event, MethodSelection):
                self._selected(event.method)
            elif isinstance(event, UserPassReply):
                if not event.ok:
                    raise AuthenticationError("proxy rejected the username/password")
                self._out += conn.send(self.request)
            elif isinstance(event, GssapiMessage):
                self._gssapi_message(event)
            elif isinstance(event, Reply):
                if not event.ok:
                    raise ReplyError(event.reply)
                self.replies.append(event)

    def _gssapi_message(self, message: GssapiMessage) -> None:
        negotiation = self.negotiation
        assert negotiation is not None and self.gssapi is not None
        try:
            answer = negotiation.receive(message)
            if isinstance(answer, MechanismStep):
                self._step = answer.token
            elif isinstance(answer, LevelAgreed):
                max_payload = self.gssapi.max_payload(answer.level)
                self.conn.authentication_done(negotiation.encapsulation(max_payload))
                self._out += self.conn.send(self.request)
            else:
                self._out += self.conn.send(answer)
        except GssapiError as e:
            if message.mtyp == GssapiMessageType.ABORT:
                raise AuthenticationError("proxy refused the GSSAPI authentication") from None
            raise AuthenticationError(f"GSSAPI: {e}") from None

    def _selected(self, method: int) -> None:
        if method == AuthMethod.NO_ACCEPTABLE:
            raise AuthenticationError("proxy accepts none of the offered authentication methods")
        if method == AuthMethod.USERNAME_PASSWORD:
            assert self.credentials is not None  # only offered with credentials
            self._out += self.conn.send(self.credentials)
        elif method == AuthMethod.NO_AUTH:
            self._out += self.conn.send(self.request)
        elif method == AuthMethod.GSSAPI:
            self._step = b""  # the client's first context token comes first
        else:  # pragma: no cover - ClientConnection rejects methods not offered
            raise AuthenticationError(f"unsupported method {method:#04x}")

    def trailing_data(self) -> bytes:
        """Bytes that arrived after the last reply (the target's first data)."""
        if self.conn.state in (State.ESTABLISHED, State.BIND_WAIT):
            return self.conn.trailing_data()
        return b""
