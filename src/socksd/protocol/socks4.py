"""SOCKS4 and SOCKS4a, sans I/O: the two messages, their codec and the state machines of both roles.

Wire form (SOCKS4: "SOCKS: A protocol for TCP proxy across firewalls"; SOCKS4a: its extension):

* request, client -> server: ``VN=4 CD DSTPORT(2) DSTIP(4) USERID NUL``; CD 1 is CONNECT, 2 BIND.
  SOCKS4a: a DSTIP of ``0.0.0.x`` with ``x != 0`` says the destination is a name, sent after the
  USERID's NUL: ``... USERID NUL DOMAIN NUL``. The client does not resolve it; the server does.
* reply, server -> client: ``VN=0 CD DSTPORT(2) DSTIP(4)``; CD 90 granted, 91 rejected or failed,
  92 and 93 the identd outcomes. CONNECT has one reply (its address is ignored by clients); BIND
  two: the first gives the address the server listens on (``0.0.0.0`` tells the client to use the
  server's own address), the second the address of the host that connected, once one has.

BIND's DSTIP (and DSTPORT) name the host expected to connect to the listening port: the server
checks the host that connects against it and says 91 in the second reply on a mismatch (the
shell's job, as for SOCKS5's BIND). 4a names BIND's expected host too.

The destination is the :class:`~socksd.protocol.address.Address` SOCKS5 uses: IPv4 for SOCKS4, a
domain for SOCKS4a, so names go through the same resolver, rules and checks; a 4a name that is an
IP literal stays a domain, as in SOCKS5. The command is SOCKS5's :class:`Command` (CONNECT and BIND
have the same codes). USERID is opaque bytes (it is no password: SOCKS4 has none); log it escaped.

Bounds: USERID and the 4a name are at most :data:`MAX_USERID` and :data:`MAX_DOMAIN` (255) bytes,
so a request is at most :data:`MAX_REQUEST` bytes and an incomplete one never makes a parser buffer
more than that: a missing NUL within the bound is an error at once, not a wait. Every violation is
a :class:`Socks4Error`; parsing never raises anything else, whatever the bytes.

Reply codes: socksd decides an outcome in SOCKS5's terms (:class:`ReplyCode`, the one vocabulary of
the access log and metrics) and answers a SOCKS4 client with :func:`socks4_reply_code`:

=========================================================  ======  ========
outcome (SOCKS5 REP)                                       REP     SOCKS4 CD
=========================================================  ======  ========
succeeded                                                  0x00    90
general failure                                            0x01    91
not allowed by the rules                                   0x02    91
network unreachable                                        0x03    91
host unreachable (also: the name does not resolve)         0x04    91
connection refused                                         0x05    91
TTL expired (socksd: connect or BIND timeout)              0x06    91
command not supported                                      0x07    91
address type not supported                                0x08    91
=========================================================  ======  ========

SOCKS4 has a single failure code for everything but identd: 92 ("cannot connect to identd on the
client") and 93 ("the client program and identd report different user-ids") are about RFC 1413
checks, which socksd does not make, so it never sends them (the client role parses them).

State machines (after h11, like ``socksd.protocol.connection``, whose :class:`State` values they
use): :class:`Socks4ServerConnection` is fed the client's bytes (``receive_data``; ``b""`` is the
end of the stream), ``next_event()`` gives the :class:`Socks4Request`, ``NEED_DATA`` or
``CONNECTION_CLOSED``, ``send(reply)`` the bytes to write; ``trailing_data()`` the bytes the client
sent after its request, which belong to the relay. :class:`Socks4ClientConnection` is the other
side. Every transition is in the tables below; a protocol error, the end of the stream or a failure
reply closes (``CLOSED``)::

    server: REQUEST --request--> REPLY --reply 90--> ESTABLISHED        (CONNECT)
                                 REPLY --reply 90--> BIND_WAIT --reply 90--> ESTABLISHED  (BIND)
                                 REPLY / BIND_WAIT --reply 91-93--> CLOSED

Unlike SOCKS5's connection classes these have no method negotiation or GSSAPI encapsulation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from socket import AF_INET, inet_ntop, inet_pton
from typing import Any, Final

from socksd.protocol.address import Address, is_valid_hostname
from socksd.protocol.connection import CONNECTION_CLOSED, NEED_DATA, State, _Closed, _NeedData
from socksd.protocol.constants import AddressType, Command, ReplyCode
from socksd.protocol.errors import LocalProtocolError, RemoteProtocolError

Buffer = bytes | bytearray | memoryview

SOCKS4_VERSION: Final = 0x04
"""VN of a request."""
SOCKS4_REPLY_VERSION: Final = 0x00
"""VN of a reply (the reply's version is 0, not 4)."""
MAX_USERID: Final = 255
"""The longest USERID accepted or built, in bytes (the NUL not counted)."""
MAX_DOMAIN: Final = 255
"""The longest SOCKS4a name accepted or built, in bytes (the NUL not counted); DNS's own bound."""
MAX_REQUEST: Final = 8 + MAX_USERID + 1 + MAX_DOMAIN + 1
"""The longest request: 520 bytes."""

_HEAD = struct.Struct("!BBH4s")
_COMMANDS: Final = {Command.CONNECT.value: Command.CONNECT, Command.BIND.value: Command.BIND}


class Socks4ReplyCode(IntEnum):
    """CD values of a reply."""

    GRANTED = 90
    REJECTED = 91  # rejected or failed
    IDENTD_UNREACHABLE = 92  # the server could not reach identd on the client (socksd: never)
    IDENTD_MISMATCH = 93  # identd's user-id is not USERID (socksd: never)


SOCKS4_REPLY_FOR: Final[dict[ReplyCode, Socks4ReplyCode]] = {
    code: Socks4ReplyCode.GRANTED if code is ReplyCode.SUCCEEDED else Socks4ReplyCode.REJECTED
    for code in ReplyCode
}
"""SOCKS5 outcome -> SOCKS4 CD (the table in the module docstring)."""


def socks4_reply_code(code: ReplyCode) -> Socks4ReplyCode:
    """The CD that tells a SOCKS4 client the outcome SOCKS5 would answer with ``code``."""
    return SOCKS4_REPLY_FOR[code]


class Socks4Error(RemoteProtocolError):
    """The peer's bytes are no valid SOCKS4/4a message.

    ``reply`` is the outcome in SOCKS5 terms (0x07 for an unknown command, 0x04 for a name no
    host can have, None otherwise); the server answers every request error with CD 91.
    """


def _is_4a_marker(ip: bytes) -> bool:
    return ip[:3] == b"\0\0\0" and ip[3] != 0


def _until_nul(buf: Buffer, start: int, limit: int, what: str) -> int | None:
    """The offset of the NUL ending a field at ``start``, None if not there yet; bounded."""
    chunk = bytes(buf[start : start + limit + 1])
    nul = chunk.find(0)
    if nul == -1:
        if len(chunk) > limit:
            raise Socks4Error(f"SOCKS4 {what} longer than {limit} bytes (no NUL)")
        return None
    return start + nul


@dataclass(frozen=True, slots=True)
class Socks4Request:
    """Client -> server: CONNECT or BIND to an IPv4 address (SOCKS4) or a name (SOCKS4a)."""

    command: Command
    address: Address
    userid: bytes = b""

    def __post_init__(self) -> None:
        if self.command not in (Command.CONNECT, Command.BIND):
            raise ValueError(f"SOCKS4 has no {self.command.name} command")
        if self.address.atyp is AddressType.IPV6:
            raise ValueError("SOCKS4 cannot carry an IPv6 destination")
        if self.address.atyp is AddressType.IPV4 and _is_4a_marker(
            inet_pton(AF_INET, self.address.host)
        ):
            raise ValueError(f"{self.address.host} is SOCKS4a's marker, not a destination")
        if len(self.userid) > MAX_USERID or b"\0" in self.userid:
            raise ValueError(f"a USERID is at most {MAX_USERID} bytes, without NUL")

    @property
    def socks4a(self) -> bool:
        """True when the destination is a name (SOCKS4a)."""
        return self.address.atyp is AddressType.DOMAIN

    def to_bytes(self) -> bytes:
        address = self.address
        if address.atyp is AddressType.DOMAIN:
            name = address.host.encode("ascii") + b"\0"
            ip = b"\0\0\0\x01"
        else:
            name = b""
            ip = inet_pton(AF_INET, address.host)
        head = _HEAD.pack(SOCKS4_VERSION, self.command, address.port, ip)
        return head + self.userid + b"\0" + name

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[Socks4Request, int] | None:
        n = len(buf)
        if n <= offset:
            return None
        if buf[offset] != SOCKS4_VERSION:
            raise Socks4Error(f"SOCKS4 request: version {buf[offset]:#04x}, expected 0x04")
        if n < offset + 2:
            return None
        command = _COMMANDS.get(buf[offset + 1])
        if command is None:
            raise Socks4Error(
                f"SOCKS4 request: unknown command {buf[offset + 1]:#04x}",
                ReplyCode.COMMAND_NOT_SUPPORTED,
            )
        if n < offset + _HEAD.size:
            return None
        _, _, port, ip = _HEAD.unpack_from(buf, offset)
        user_start = offset + _HEAD.size
        user_end = _until_nul(buf, user_start, MAX_USERID, "USERID")
        if user_end is None:
            return None
        userid = bytes(buf[user_start:user_end])
        if not _is_4a_marker(ip):
            return Socks4Request(
                command, Address(AddressType.IPV4, inet_ntop(AF_INET, ip), port), userid
            ), user_end + 1
        name_end = _until_nul(buf, user_end + 1, MAX_DOMAIN, "SOCKS4a name")
        if name_end is None:
            return None
        name = bytes(buf[user_end + 1 : name_end])
        if not is_valid_hostname(name):
            raise Socks4Error(f"SOCKS4a request: invalid name {name!r}", ReplyCode.HOST_UNREACHABLE)
        address = Address(AddressType.DOMAIN, name.decode("ascii"), port)
        return Socks4Request(command, address, userid), name_end + 1


@dataclass(frozen=True, slots=True)
class Socks4Reply:
    """Server -> client: CD and an IPv4 address with a port (``0.0.0.0:0`` when it says nothing)."""

    code: Socks4ReplyCode
    address: Address = field(default_factory=Address.unspecified)

    def __post_init__(self) -> None:
        if self.address.atyp is not AddressType.IPV4:
            raise ValueError("a SOCKS4 reply carries an IPv4 address only")

    @property
    def ok(self) -> bool:
        return self.code is Socks4ReplyCode.GRANTED

    @classmethod
    def of(cls, outcome: ReplyCode, address: Address | None = None) -> Socks4Reply:
        """The reply for a SOCKS5 outcome (see the table above) and a bound or peer address.

        SOCKS4 carries IPv4 only: an IPv4-mapped IPv6 address is unmapped; any other non-IPv4
        address becomes ``0.0.0.0`` with its port (for BIND's first reply that tells the client
        to use the server's address; CONNECT's reply address is ignored by clients).
        """
        if address is None:
            return cls(socks4_reply_code(outcome))
        if address.atyp is not AddressType.IPV4:
            ip = address.ip
            mapped = getattr(ip, "ipv4_mapped", None)
            address = (
                Address.of(mapped, address.port)
                if mapped is not None
                else Address.unspecified(address.port)
            )
        return cls(socks4_reply_code(outcome), address)

    def to_bytes(self) -> bytes:
        ip = inet_pton(AF_INET, self.address.host)
        return _HEAD.pack(SOCKS4_REPLY_VERSION, self.code, self.address.port, ip)

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[Socks4Reply, int] | None:
        n = len(buf)
        if n <= offset:
            return None
        if buf[offset] != SOCKS4_REPLY_VERSION:
            raise Socks4Error(f"SOCKS4 reply: version {buf[offset]:#04x}, expected 0x00")
        if n < offset + 2:
            return None
        try:
            code = Socks4ReplyCode(buf[offset + 1])
        except ValueError:
            raise Socks4Error(f"SOCKS4 reply: unknown code {buf[offset + 1]}") from None
        if n < offset + _HEAD.size:
            return None
        _, _, port, ip = _HEAD.unpack_from(buf, offset)
        address = Address(AddressType.IPV4, inet_ntop(AF_INET, ip), port)
        return Socks4Reply(code, address), offset + _HEAD.size


Socks4Message = Socks4Request | Socks4Reply
Socks4Event = Socks4Message | _NeedData | _Closed

# -- the state machine: everything that moves the state is below --------------------------------
#
# ``_X_RECEIVES[state] -> (parser, transition)`` for the peer's message, ``_X_SENDS[(state, type)]
# -> transition`` for this side's; a transition gives the next state from (connection, message).

_Parser = Callable[[Any, int], "tuple[Any, int] | None"]
_Transition = Callable[["_Socks4Connection", Any], State]


def _request(conn: _Socks4Connection, message: Socks4Request) -> State:
    conn.command = message.command
    return State.REPLY


def _after_reply(conn: _Socks4Connection, reply: Socks4Reply) -> State:
    if not reply.ok:
        return State.CLOSED
    if conn.command is Command.BIND and conn.state is State.REPLY:
        return State.BIND_WAIT
    return State.ESTABLISHED


_SERVER_RECEIVES: dict[State, tuple[_Parser, _Transition]] = {
    State.REQUEST: (Socks4Request.parse, _request),
}
_SERVER_SENDS: dict[tuple[State, type], _Transition] = {
    (State.REPLY, Socks4Reply): _after_reply,
    (State.BIND_WAIT, Socks4Reply): _after_reply,
}
_CLIENT_RECEIVES: dict[State, tuple[_Parser, _Transition]] = {
    State.REPLY: (Socks4Reply.parse, _after_reply),
    State.BIND_WAIT: (Socks4Reply.parse, _after_reply),
}
_CLIENT_SENDS: dict[tuple[State, type], _Transition] = {
    (State.REQUEST, Socks4Request): _request,
}


class _Socks4Connection:
    """Buffering and table dispatch shared by both roles."""

    __slots__ = ("_buf", "_eof", "_failed_state", "command", "state")

    _receives: dict[State, tuple[_Parser, _Transition]]
    _sends: dict[tuple[State, type], _Transition]

    def __init__(self) -> None:
        self.state = State.REQUEST
        self.command: Command | None = None
        self._failed_state: State | None = None
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed its side."""
        if data:
            if self._eof:
                raise LocalProtocolError("data received after end of stream")
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Socks4Event:
        """The peer's next whole message, ``NEED_DATA`` or ``CONNECTION_CLOSED``.

        Raises :class:`Socks4Error` for invalid bytes (the state becomes CLOSED).
        """
        expected = self._receives.get(self.state)
        if expected is None:
            return NEED_DATA
        parser, transition = expected
        try:
            parsed = parser(self._buf, 0)
        except Socks4Error:
            self._failed_state = self.state
            self.state = State.CLOSED
            raise
        if parsed is not None:
            message, end = parsed
            del self._buf[:end]
            self.state = transition(self, message)
            return message  # type: ignore[no-any-return]
        if self._eof:
            self.state = State.CLOSED
            if self._buf:
                raise Socks4Error("connection closed in the middle of a SOCKS4 message")
            return CONNECTION_CLOSED
        return NEED_DATA

    def send(self, message: Socks4Message) -> bytes:
        """Check that ``message`` may be sent now, move the state on, return its bytes."""
        transition = self._sends.get((self.state, type(message)))
        if transition is None:
            raise LocalProtocolError(
                f"cannot send {type(message).__name__} in state {self.state.name}"
            )
        self.state = transition(self, message)
        return message.to_bytes()

    def trailing_data(self) -> bytes:
        """Bytes the peer sent after the handshake; only once ESTABLISHED (or in BIND_WAIT).

        Empties the buffer: the relay owns these bytes and must send them on first.
        """
        if self.state is not State.ESTABLISHED and self.state is not State.BIND_WAIT:
            raise LocalProtocolError(f"no trailing data in state {self.state.name}")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    @property
    def buffered(self) -> int:
        """How many received bytes are not consumed yet."""
        return len(self._buf)


class Socks4ServerConnection(_Socks4Connection):
    """The server role: request -> reply (CONNECT), or request -> reply -> reply (BIND)."""

    __slots__ = ("refused_reply",)

    _receives = _SERVER_RECEIVES
    _sends = _SERVER_SENDS

    def __init__(self) -> None:
        super().__init__()
        self.refused_reply: ReplyCode | None = None
        """The outcome ``refusal()`` answered (in SOCKS5 terms, for the access log), if any."""

    def reply(self, outcome: ReplyCode, address: Address | None = None) -> bytes:
        """``send(Socks4Reply.of(outcome, address))``: the reply for a SOCKS5 outcome."""
        return self.send(Socks4Reply.of(outcome, address))

    def refusal(self, error: RemoteProtocolError) -> bytes:
        """The bytes to answer a request error with: CD 91, or nothing after the request.

        The state becomes CLOSED; ``refused_reply`` is the error's outcome (0x01 when it has
        none), what the SOCKS5 side would have logged.
        """
        failed = self._failed_state
        self.state = State.CLOSED
        if failed is not State.REQUEST:
            return b""
        code = error.reply if error.reply is not None else ReplyCode.GENERAL_FAILURE
        self.refused_reply = code
        return Socks4Reply(socks4_reply_code(code)).to_bytes()


class Socks4ClientConnection(_Socks4Connection):
    """The client role: send the request, then read one reply (CONNECT) or two (BIND)."""

    __slots__ = ()

    _receives = _CLIENT_RECEIVES
    _sends = _CLIENT_SENDS


__all__ = [
    "MAX_DOMAIN",
    "MAX_REQUEST",
    "MAX_USERID",
    "SOCKS4_REPLY_FOR",
    "SOCKS4_REPLY_VERSION",
    "SOCKS4_VERSION",
    "Socks4ClientConnection",
    "Socks4Error",
    "Socks4Event",
    "Socks4Message",
    "Socks4Reply",
    "Socks4ReplyCode",
    "Socks4Request",
    "Socks4ServerConnection",
    "socks4_reply_code",
]
