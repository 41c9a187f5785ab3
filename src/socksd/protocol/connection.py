"""The SOCKS5 state machines of both roles: pure code, no sockets, no event loop.

Theory of operation (after h11): a connection object is fed the bytes read from the peer with
``receive_data()``; ``next_event()`` returns the next whole message the peer sent, or ``NEED_DATA``
when more bytes are needed or this side must speak first; ``send(message)`` checks that the message
is allowed now, moves the state on and returns the bytes to write. Everything that affects the
state lives in the tables below the ``State`` enum, one pair per role:

* ``_SERVER_RECEIVES`` / ``_CLIENT_RECEIVES``: in which state the peer may send which message, and
  the state that message leads to. In a state that is not listed the peer's bytes are kept,
  unparsed, until this side has spoken; that is how a pipelined handshake (greeting + auth +
  request + first payload in one write) is handled.
* ``_SERVER_SENDS`` / ``_CLIENT_SENDS``: which message this side may send in which state (and when
  it may call ``authentication_done()``), and the state that leads to (the method chosen, the auth
  status, the reply code and the command decide it).

The connection classes only look transitions up and apply them; besides the tables, a single rule
moves the state: a protocol error, the end of the stream or a refusal closes (``CLOSED``).

A method's sub-negotiation may take several round trips (GSSAPI): in ``AUTH_GSSAPI`` both sides
exchange RFC 1961 messages until the authentication code calls ``authentication_done()``. Given an
encapsulation (``socksd.protocol.gssapi``), that call puts the codec between the wire and the
parser: received bytes are unwrapped before they are parsed (those already buffered too), sent
messages are wrapped, so the request and reply go through the same parsers as without GSSAPI.

Once the request has been answered with success the connection is ``ESTABLISHED``;
``trailing_data()`` hands over whatever the peer sent after its last handshake message, so no byte
is lost. For BIND the server sends two replies: the first one leads to ``BIND_WAIT``, the second to
``ESTABLISHED``.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto
from typing import Any, Final

from socksd.protocol.constants import AuthMethod, Command, GssapiMessageType, ReplyCode
from socksd.protocol.errors import GssapiError, LocalProtocolError, RemoteProtocolError
from socksd.protocol.gssapi import ABORT, GssapiEncapsulation
from socksd.protocol.messages import (
    Greeting,
    GssapiMessage,
    Message,
    MethodSelection,
    Reply,
    Request,
    UserPassReply,
    UserPassRequest,
)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class _Closed:
    __slots__ = ()

    def __repr__(self) -> str:
        return "CONNECTION_CLOSED"


NEED_DATA: Final = _NeedData()
"""``next_event()``: no whole message yet (or this side must speak first)."""

CONNECTION_CLOSED: Final = _Closed()
"""``next_event()``: the peer closed the stream cleanly between two messages."""

Event = Message | _NeedData | _Closed


class State(Enum):
    """States of both roles; each role uses the ones its tables name."""

    GREETING = auto()  # server: waits for the greeting; client: must send it
    METHOD = auto()  # server: must select a method; client: waits for the selection
    AUTH_USERPASS = auto()  # server: waits for RFC 1929 request; client: must send it
    AUTH_USERPASS_REPLY = auto()  # server: must answer it; client: waits for the answer
    AUTH_GSSAPI = auto()  # both: RFC 1961 messages until authentication_done()
    REQUEST = auto()  # server: waits for the request; client: must send it
    REPLY = auto()  # server: must reply; client: waits for the reply
    BIND_WAIT = auto()  # BIND after the first reply: the second reply is due
    ESTABLISHED = auto()  # the handshake is over; bytes belong to the relay
    CLOSED = auto()  # the handshake failed or was refused; close the connection


# -- the state machine: everything that moves the state is below --------------------------------
#
# One dict look-up per event: ``_X_RECEIVES[state] -> (parser, transition)`` for the peer's
# messages, ``_X_SENDS[(state, message type)] -> transition`` for this side's (the pseudo-message
# ``_AuthenticationDone`` stands for ``authentication_done()``). A transition is a function of
# (connection, message) giving the next state; it may check the message against what the
# handshake agreed so far, raising before anything changes, and record what later transitions
# depend on: the methods offered, the method chosen, the command.

_FAILED: Final = State.CLOSED
"""Where any state goes when the peer breaks the protocol, closes the stream, or is refused."""

_Parser = Callable[[Any, int], "tuple[Any, int] | None"]
_Transition = Callable[["_Connection", Any], State]


class _AuthenticationDone:
    """The local action ``authentication_done()`` as a key of the ``_X_SENDS`` tables."""

    __slots__ = ()


def _to(state: State) -> _Transition:
    return lambda conn, message: state


def _greeting(conn: _Connection, message: Greeting) -> State:
    conn.offered = message.methods
    return State.METHOD


def _selected(conn: _Connection, method: int) -> State:
    conn.method = method
    if method == AuthMethod.NO_AUTH:
        return State.REQUEST
    if method == AuthMethod.USERNAME_PASSWORD:
        return State.AUTH_USERPASS
    if method == AuthMethod.GSSAPI:
        return State.AUTH_GSSAPI
    return State.CLOSED


def _offered(conn: _Connection, method: int) -> bool:
    return method == AuthMethod.NO_ACCEPTABLE or method in conn.offered


def _server_selects(conn: _Connection, message: MethodSelection) -> State:
    if not _offered(conn, message.method):
        raise LocalProtocolError(f"method {message.method:#04x} was not offered by the client")
    return _selected(conn, message.method)


def _client_got_selection(conn: _Connection, message: MethodSelection) -> State:
    if not _offered(conn, message.method):
        raise RemoteProtocolError(f"server selected method {message.method:#04x}, not offered")
    return _selected(conn, message.method)


def _after_userpass(conn: _Connection, message: UserPassReply) -> State:
    return State.REQUEST if message.ok else State.CLOSED


def _after_gssapi(conn: _Connection, message: GssapiMessage) -> State:
    return State.CLOSED if message.mtyp == GssapiMessageType.ABORT else State.AUTH_GSSAPI


def _request(conn: _Connection, message: Request) -> State:
    conn.command = message.command
    return State.REPLY


def _after_reply(conn: _Connection, reply: Reply) -> State:
    if not reply.ok:
        return State.CLOSED
    if conn.command == Command.BIND and conn.state is State.REPLY:
        return State.BIND_WAIT
    return State.ESTABLISHED


_SERVER_RECEIVES: dict[State, tuple[_Parser, _Transition]] = {
    State.GREETING: (Greeting.parse, _greeting),
    State.AUTH_USERPASS: (UserPassRequest.parse, _to(State.AUTH_USERPASS_REPLY)),
    State.AUTH_GSSAPI: (GssapiMessage.parse, _to(State.AUTH_GSSAPI)),
    State.REQUEST: (Request.parse, _request),
}
_SERVER_SENDS: dict[tuple[State, type], _Transition] = {
    (State.METHOD, MethodSelection): _server_selects,
    (State.AUTH_USERPASS_REPLY, UserPassReply): _after_userpass,
    (State.AUTH_GSSAPI, GssapiMessage): _after_gssapi,
    (State.AUTH_GSSAPI, _AuthenticationDone): _to(State.REQUEST),
    (State.REPLY, Reply): _after_reply,
    (State.BIND_WAIT, Reply): _after_reply,
}

_CLIENT_RECEIVES: dict[State, tuple[_Parser, _Transition]] = {
    State.METHOD: (MethodSelection.parse, _client_got_selection),
    State.AUTH_USERPASS_REPLY: (UserPassReply.parse, _after_userpass),
    State.AUTH_GSSAPI: (GssapiMessage.parse, _to(State.AUTH_GSSAPI)),
    State.REPLY: (Reply.parse, _after_reply),
    State.BIND_WAIT: (Reply.parse, _after_reply),
}
_CLIENT_SENDS: dict[tuple[State, type], _Transition] = {
    (State.GREETING, Greeting): _greeting,
    (State.AUTH_USERPASS, UserPassRequest): _to(State.AUTH_USERPASS_REPLY),
    (State.AUTH_GSSAPI, GssapiMessage): _after_gssapi,
    (State.AUTH_GSSAPI, _AuthenticationDone): _to(State.REQUEST),
    (State.REQUEST, Request): _request,
}

_AUTHENTICATION_DONE: Final = _AuthenticationDone()


class _Connection:
    """Buffering and table dispatch shared by both roles."""

    __slots__ = (
        "_buf",
        "_eof",
        "_failed_state",
        "command",
        "encapsulation",
        "method",
        "offered",
        "state",
    )

    _receives: dict[State, tuple[_Parser, _Transition]]
    _sends: dict[tuple[State, type], _Transition]

    def __init__(self, initial: State) -> None:
        self.state = initial
        self.command: Command | None = None
        self.offered: tuple[int, ...] = ()
        self.method: int | None = None
        self._failed_state: State | None = None
        self._buf = bytearray()
        self._eof = False
        self.encapsulation: GssapiEncapsulation | None = None
        """The RFC 1961 codec all bytes go through after the sub-negotiation (None: plain)."""

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""
        if data:
            if self._eof:
                raise LocalProtocolError("data received after end of stream")
            if self.encapsulation is not None:
                self.encapsulation.receive_data(data)
            else:
                self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        """The next whole message from the peer, ``NEED_DATA`` or ``CONNECTION_CLOSED``.

        Raises RemoteProtocolError (carrying the reply code to answer) for invalid bytes.
        """
        expected = self._receives.get(self.state)
        if expected is None:
            return NEED_DATA
        parser, transition = expected
        try:
            if self.encapsulation is not None and self.encapsulation.buffered:
                self._buf += self.encapsulation.read()
            parsed = parser(self._buf, 0)
            if parsed is not None:
                message, end = parsed
                del self._buf[:end]
                self.state = transition(self, message)
                return message  # type: ignore[no-any-return]
        except RemoteProtocolError:
            self._failed_state = self.state
            self.state = _FAILED
            raise
        if self._eof:
            self.state = _FAILED
            if self.buffered:
                raise RemoteProtocolError("connection closed in the middle of a message")
            return CONNECTION_CLOSED
        return NEED_DATA

    def send(self, message: Message) -> bytes:
        """Check that ``message`` may be sent now, move the state on, return its bytes."""
        transition = self._sends.get((self.state, type(message)))
        if transition is None:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__} in state {self.state.name}"
            )
        self.state = transition(self, message)
        if self.encapsulation is not None:
            return self.encapsulation.encode(message.to_bytes())
        return message.to_bytes()

    def trailing_data(self) -> bytes:
        """Bytes the peer sent after the handshake; only once ESTABLISHED. Empties the buffer.

        With an encapsulation these are the plain bytes decoded so far; undecoded frames stay in
        the codec, which the relay goes on with.
        """
        if self.state is not State.ESTABLISHED and self.state is not State.BIND_WAIT:
            raise LocalProtocolError(f"no trailing data in state {self.state.name}")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    @property
    def buffered(self) -> int:
        """How many received bytes are not consumed yet (encoded ones included)."""
        codec = self.encapsulation
        return len(self._buf) + (codec.buffered if codec is not None else 0)

    def authentication_done(self, encapsulation: GssapiEncapsulation | None = None) -> None:
        """End a multi-round-trip sub-negotiation (GSSAPI): the request comes next.

        With ``encapsulation`` every later byte goes through it (RFC 1961 s. 5), starting with the
        bytes already received and not parsed.
        """
        transition = self._sends.get((self.state, _AuthenticationDone))
        if transition is None:
            raise LocalProtocolError(f"no sub-negotiation in progress (state {self.state.name})")
        self.state = transition(self, _AUTHENTICATION_DONE)
        if encapsulation is not None:
            self.encapsulation = encapsulation
            if self._buf:
                encapsulation.receive_data(bytes(self._buf))
                self._buf.clear()


class ServerConnection(_Connection):
    """The server role: greeting -> method selection -> sub-negotiation -> request -> reply(s)."""

    __slots__ = ("refused_reply",)

    _receives = _SERVER_RECEIVES
    _sends = _SERVER_SENDS

    def __init__(self) -> None:
        super().__init__(State.GREETING)
        self.refused_reply: ReplyCode | None = None
        """The REP code ``refusal()`` answered with, if its answer was a SOCKS reply."""

    def choose_method(self, preference: tuple[int, ...]) -> MethodSelection:
        """The first method of ``preference`` the client offered, else NO_ACCEPTABLE."""
        for method in preference:
            if method in self.offered:
                return MethodSelection(method)
        return MethodSelection(AuthMethod.NO_ACCEPTABLE)

    def refusal(self, error: RemoteProtocolError) -> bytes:
        """The bytes to answer a RemoteProtocolError with, for the phase it happened in.

        A bad greeting gets ``05 FF``, a bad RFC 1929 request a failure status, a bad request a
        reply carrying the error's code (0x01 when it has none; encapsulated after GSSAPI), a
        GSSAPI failure the RFC 1961 abort message. The state becomes CLOSED; ``refused_reply``
        says which REP code was sent, for the access log.
        """
        failed = self._failed_state
        self.state = _FAILED
        if isinstance(error, GssapiError) or failed is State.AUTH_GSSAPI:
            return ABORT
        if failed is State.GREETING:
            return MethodSelection(AuthMethod.NO_ACCEPTABLE).to_bytes()
        if failed is State.AUTH_USERPASS:
            return UserPassReply(1).to_bytes()
        if failed is State.REQUEST:
            code = error.reply if error.reply is not None else ReplyCode.GENERAL_FAILURE
            self.refused_reply = code
            reply = Reply(code).to_bytes()
            return self.encapsulation.encode(reply) if self.encapsulation is not None else reply
        return b""


class ClientConnection(_Connection):
    """The client role: greeting -> selection -> sub-negotiation -> request -> reply(s)."""

    __slots__ = ()

    _receives = _CLIENT_RECEIVES
    _sends = _CLIENT_SENDS

    def __init__(self) -> None:
        super().__init__(State.GREETING)
