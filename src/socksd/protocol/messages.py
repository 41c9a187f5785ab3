"""Every SOCKS5 message as a frozen dataclass, with its parser and its builder.

Parsers take a buffer and an offset and return ``(message, end)`` or ``None`` when the buffer holds
only part of the message, so callers can feed bytes as they arrive: one at a time or several
messages in one read. They raise :class:`RemoteProtocolError` (carrying the reply code to answer)
for bytes no valid message starts with. Builders (``to_bytes``) check their fields and raise
``ValueError`` for values the wire cannot carry.

Sizes: no message is longer than 513 bytes (RFC 1929 request) except RFC 1961 messages (2 + 65535
token bytes) and UDP datagrams, so an incomplete message can never make a parser buffer without bound.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from socksd.protocol.address import Address, parse_address
from socksd.protocol.constants import (
    GSSAPI_VERSION,
    SOCKS_VERSION,
    USERPASS_VERSION,
    AuthMethod,
    Command,
    GssapiMessageType,
    ReplyCode,
)
from socksd.protocol.errors import RemoteProtocolError

Buffer = bytes | bytearray | memoryview
_U16 = struct.Struct("!H")
_COMMANDS = {c.value: c for c in Command}

# The longest message a peer may leave incomplete during the handshake (RFC 1929 request).
MAX_HANDSHAKE_MESSAGE = 513


def _check_version(buf: Buffer, offset: int, version: int, what: str) -> None:
    if buf[offset] != version:
        raise RemoteProtocolError(f"{what}: version {buf[offset]:#04x}, expected {version:#04x}")


@dataclass(frozen=True, slots=True)
class Greeting:
    """Client -> server: VER NMETHODS METHODS (1-255 method bytes)."""

    methods: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.methods) <= 255 or any(not 0 <= m <= 255 for m in self.methods):
            raise ValueError("a greeting offers 1-255 methods, each 0-255")

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, len(self.methods), *self.methods))

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[Greeting, int] | None:
        if len(buf) <= offset:
            return None
        _check_version(buf, offset, SOCKS_VERSION, "greeting")
        if len(buf) < offset + 2:
            return None
        count = buf[offset + 1]
        if count == 0:
            raise RemoteProtocolError("greeting offers no method")
        end = offset + 2 + count
        if len(buf) < end:
            return None
        return Greeting(tuple(buf[offset + 2 : end])), end


@dataclass(frozen=True, slots=True)
class MethodSelection:
    """Server -> client: VER METHOD (0xFF: no acceptable method)."""

    method: int

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.method))

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[MethodSelection, int] | None:
        if len(buf) < offset + 2:
            if len(buf) > offset:
                _check_version(buf, offset, SOCKS_VERSION, "method selection")
            return None
        _check_version(buf, offset, SOCKS_VERSION, "method selection")
        return MethodSelection(buf[offset + 1]), offset + 2


@dataclass(frozen=True, slots=True)
class UserPassRequest:
    """Client -> server (RFC 1929): VER ULEN UNAME PLEN PASSWD; fields are opaque bytes."""

    username: bytes
    password: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.username) > 255 or len(self.password) > 255:
            raise ValueError("RFC 1929 user names and passwords are at most 255 bytes")

    def to_bytes(self) -> bytes:
        u, p = self.username, self.password
        return bytes((USERPASS_VERSION, len(u))) + u + bytes((len(p),)) + p

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[UserPassRequest, int] | None:
        n = len(buf)
        if n <= offset:
            return None
        _check_version(buf, offset, USERPASS_VERSION, "username/password request")
        if n < offset + 2:
            return None
        ulen = buf[offset + 1]
        pos = offset + 2 + ulen
        if n <= pos:
            return None
        plen = buf[pos]
        end = pos + 1 + plen
        if n < end:
            return None
        return UserPassRequest(bytes(buf[offset + 2 : pos]), bytes(buf[pos + 1 : end])), end


@dataclass(frozen=True, slots=True)
class UserPassReply:
    """Server -> client (RFC 1929): VER STATUS; 0 is success."""

    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    def to_bytes(self) -> bytes:
        return bytes((USERPASS_VERSION, self.status))

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[UserPassReply, int] | None:
        if len(buf) <= offset:
            return None
        _check_version(buf, offset, USERPASS_VERSION, "username/password reply")
        if len(buf) < offset + 2:
            return None
        return UserPassReply(buf[offset + 1]), offset + 2


@dataclass(frozen=True, slots=True)
class GssapiMessage:
    """Either direction (RFC 1961): VER(1) MTYP LEN(2) TOKEN."""

    mtyp: GssapiMessageType
    token: bytes = b""

    def __post_init__(self) -> None:
        if len(self.token) > 0xFFFF:
            raise ValueError("an RFC 1961 token is at most 65535 bytes")

    def to_bytes(self) -> bytes:
        if self.mtyp == GssapiMessageType.ABORT:
            return bytes((GSSAPI_VERSION, GssapiMessageType.ABORT))
        return bytes((GSSAPI_VERSION, self.mtyp)) + _U16.pack(len(self.token)) + self.token

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[GssapiMessage, int] | None:
        n = len(buf)
        if n <= offset:
            return None
        _check_version(buf, offset, GSSAPI_VERSION, "GSSAPI message")
        if n < offset + 2:
            return None
        try:
            mtyp = GssapiMessageType(buf[offset + 1])
        except ValueError:
            raise RemoteProtocolError(
                f"unknown GSSAPI message type {buf[offset + 1]:#04x}"
            ) from None
        if mtyp == GssapiMessageType.ABORT:
            return GssapiMessage(mtyp), offset + 2
        if n < offset + 4:
            return None
        end = offset + 4 + ((buf[offset + 2] << 8) | buf[offset + 3])
        if n < end:
            return None
        return GssapiMessage(mtyp, bytes(buf[offset + 4 : end])), end


@dataclass(frozen=True, slots=True)
class Request:
    """Client -> server: VER CMD RSV ATYP DST.ADDR DST.PORT."""

    command: Command
    address: Address

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.command, 0)) + self.address.pack()

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[Request, int] | None:
        n = len(buf)
        if n <= offset:
            return None
        _check_version(buf, offset, SOCKS_VERSION, "request")
        if n < offset + 2:
            return None
        cmd = buf[offset + 1]
        command = _COMMANDS.get(cmd)
        if command is None:
            raise RemoteProtocolError(
                f"unknown command {cmd:#04x}", ReplyCode.COMMAND_NOT_SUPPORTED
            )
        # RSV is ignored as RFC 1928 has no rule for a non-zero value.
        parsed = parse_address(buf, offset + 3)
        if parsed is None:
            return None
        address, end = parsed
        return Request(command, address), end


@dataclass(frozen=True, slots=True)
class Reply:
    """Server -> client: VER REP RSV ATYP BND.ADDR BND.PORT."""

    reply: ReplyCode
    address: Address = field(default_factory=Address.unspecified)

    @property
    def ok(self) -> bool:
        return self.reply == ReplyCode.SUCCEEDED

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.reply, 0)) + self.address.pack()

    @staticmethod
    def parse(buf: Buffer, offset: int = 0) -> tuple[Reply, int] | None:
        n = len(buf)
        if n <= offset:
            return None
        _check_version(buf, offset, SOCKS_VERSION, "reply")
        if n < offset + 2:
            return None
        try:
            rep = ReplyCode(buf[offset + 1])
        except ValueError:
            raise RemoteProtocolError(f"unknown reply code {buf[offset + 1]:#04x}") from None
        parsed = parse_address(buf, offset + 3)
        if parsed is None:
            return None
        address, end = parsed
        return Reply(rep, address), end


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A UDP ASSOCIATE datagram: RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA."""

    address: Address
    data: bytes = field(repr=False)
    frag: int = 0

    def header(self) -> bytes:
        """The SOCKS UDP header alone (prepend it to ``data``)."""
        return bytes((0, 0, self.frag)) + self.address.pack()

    def to_bytes(self) -> bytes:
        return self.header() + self.data

    @staticmethod
    def parse(datagram: Buffer) -> UdpDatagram:
        """Parse one whole datagram; a truncated header raises RemoteProtocolError."""
        if len(datagram) < 4:
            raise RemoteProtocolError("UDP datagram shorter than its header")
        parsed = parse_address(datagram, 3)
        if parsed is None:
            raise RemoteProtocolError("UDP datagram header truncated")
        address, end = parsed
        return UdpDatagram(address, bytes(datagram[end:]), datagram[2])


Message = (
    Greeting | MethodSelection | UserPassRequest | UserPassReply | GssapiMessage | Request | Reply
)

__all__ = [
    "MAX_HANDSHAKE_MESSAGE",
    "AuthMethod",
    "Greeting",
    "GssapiMessage",
    "Message",
    "MethodSelection",
    "Reply",
    "Request",
    "UdpDatagram",
    "UserPassReply",
    "UserPassRequest",
]
