"""The client's side of the handshake as a pure driver over :class:`ClientConnection`.

``ClientHandshake`` decides what the client says (the methods it offers, its credentials, its
request); the async and sync wrappers only move bytes: they write ``data_to_send()``, feed what
they read to ``receive_data()`` and stop when ``done``. The replies end up in ``replies``.
"""

from __future__ import annotations

from socksd.client.errors import AuthenticationError, ProxyConnectionError, ReplyError
from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    AuthMethod,
    ClientConnection,
    Command,
    Greeting,
    MethodSelection,
    Reply,
    Request,
    State,
    UserPassReply,
    UserPassRequest,
)
from socksd.protocol.address import Address


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


class ClientHandshake:
    """Greeting, authentication and one request, with the replies it expects."""

    def __init__(
        self,
        command: Command,
        address: Address,
        *,
        username: str | bytes | None = None,
        password: str | bytes | None = None,
    ) -> None:
        self.conn = ClientConnection()
        self.request = Request(command, address)
        self.credentials: UserPassRequest | None = None
        methods: tuple[int, ...] = (AuthMethod.NO_AUTH,)
        if username is not None:
            self.credentials = UserPassRequest(_as_bytes(username), _as_bytes(password or b""))
            methods = (AuthMethod.USERNAME_PASSWORD, AuthMethod.NO_AUTH)
        self.replies: list[Reply] = []
        self._out = bytearray(self.conn.send(Greeting(methods)))
        self._wanted = 2 if command == Command.BIND else 1

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
        while not self.done:
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
            elif isinstance(event, Reply):
                if not event.ok:
                    raise ReplyError(event.reply)
                self.replies.append(event)

    def _selected(self, method: int) -> None:
        if method == AuthMethod.NO_ACCEPTABLE:
            raise AuthenticationError("proxy accepts none of the offered authentication methods")
        if method == AuthMethod.USERNAME_PASSWORD:
            assert self.credentials is not None  # only offered with credentials
            self._out += self.conn.send(self.credentials)
        elif method == AuthMethod.NO_AUTH:
            self._out += self.conn.send(self.request)
        else:  # pragma: no cover - ClientConnection rejects methods not offered
            raise AuthenticationError(f"unsupported method {method:#04x}")

    def trailing_data(self) -> bytes:
        """Bytes that arrived after the last reply (the target's first data)."""
        if self.conn.state in (State.ESTABLISHED, State.BIND_WAIT):
            return self.conn.trailing_data()
        return b""
