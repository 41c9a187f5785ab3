"""Every message builder and parser against hand-written wire bytes (RFC 1928, 1929, 1961)."""

from typing import Any

import pytest

from socksd.protocol import (
    MAX_HANDSHAKE_MESSAGE,
    Address,
    AddressType,
    AuthMethod,
    Command,
    Greeting,
    GssapiMessage,
    GssapiMessageType,
    MethodSelection,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Request,
    UdpDatagram,
    UserPassReply,
    UserPassRequest,
)

NAME_255 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])
IPV6_FULL = "2001:db8:85a3:8d3:1319:8a2e:370:7348"
IPV6_FULL_PACKED = bytes.fromhex("20010db885a308d313198a2e03707348")
ALL_METHODS = tuple(range(255))  # 0x00..0xFE: 255 methods, the most a greeting can carry
USER_255 = bytes(range(1, 256))
PASS_255 = bytes(range(255))

# (message, wire bytes) for every message type and every corner named by the RFCs.
CASES: list[tuple[Any, bytes]] = [
    # RFC 1928 s. 3: VER NMETHODS METHODS
    (Greeting((0x00,)), b"\x05\x01\x00"),
    (Greeting((0x00, 0x02)), b"\x05\x02\x00\x02"),
    (Greeting((0x02, 0x01, 0x00)), b"\x05\x03\x02\x01\x00"),
    (Greeting((0xFF,)), b"\x05\x01\xff"),
    (Greeting(ALL_METHODS), b"\x05\xff" + bytes(range(255))),
    # RFC 1928 s. 3: VER METHOD
    (MethodSelection(AuthMethod.NO_AUTH), b"\x05\x00"),
    (MethodSelection(AuthMethod.GSSAPI), b"\x05\x01"),
    (MethodSelection(AuthMethod.USERNAME_PASSWORD), b"\x05\x02"),
    (MethodSelection(AuthMethod.NO_ACCEPTABLE), b"\x05\xff"),
    (MethodSelection(0x80), b"\x05\x80"),
    # RFC 1929 s. 2: VER ULEN UNAME PLEN PASSWD
    (UserPassRequest(b"alice", b"secret"), b"\x01\x05alice\x06secret"),
    (UserPassRequest(b"", b""), b"\x01\x00\x00"),
    (UserPassRequest(b"u", b""), b"\x01\x01u\x00"),
    (UserPassRequest(b"", b"p"), b"\x01\x00\x01p"),
    (UserPassRequest(USER_255, PASS_255), b"\x01\xff" + USER_255 + b"\xff" + PASS_255),
    (
        UserPassRequest("j\u00fcrgen".encode(), b"\x00\xff\x01pw\x00"),
        b"\x01\x07j\xc3\xbcrgen\x06\x00\xff\x01pw\x00",
    ),
    # RFC 1929 s. 2: VER STATUS
    (UserPassReply(0), b"\x01\x00"),
    (UserPassReply(1), b"\x01\x01"),
    (UserPassReply(0xFF), b"\x01\xff"),
    # RFC 1961 s. 3: VER MTYP LEN TOKEN; abort is VER MTYP only
    (GssapiMessage(GssapiMessageType.AUTHENTICATION, b"tok"), b"\x01\x01\x00\x03tok"),
    (GssapiMessage(GssapiMessageType.AUTHENTICATION, b""), b"\x01\x01\x00\x00"),
    (GssapiMessage(GssapiMessageType.PROTECTION, b"\x01"), b"\x01\x02\x00\x01\x01"),
    (GssapiMessage(GssapiMessageType.ENCAPSULATION, b"x" * 300), b"\x01\x03\x01\x2c" + b"x" * 300),
    (
        GssapiMessage(GssapiMessageType.AUTHENTICATION, b"\xab" * 0xFFFF),
        b"\x01\x01\xff\xff" + b"\xab" * 0xFFFF,
    ),
    (GssapiMessage(GssapiMessageType.ABORT), b"\x01\xff"),
    # RFC 1928 s. 4: VER CMD RSV ATYP DST.ADDR DST.PORT
    (
        Request(Command.CONNECT, Address.of("127.0.0.1", 80)),
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    ),
    (
        Request(Command.CONNECT, Address.of("::1", 8080)),
        b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x1f\x90",
    ),
    (
        Request(Command.CONNECT, Address.of(IPV6_FULL, 443)),
        b"\x05\x01\x00\x04" + IPV6_FULL_PACKED + b"\x01\xbb",
    ),
    (
        Request(Command.CONNECT, Address.of("example.com", 443)),
        b"\x05\x01\x00\x03\x0bexample.com\x01\xbb",
    ),
    (Request(Command.CONNECT, Address.of("a", 1)), b"\x05\x01\x00\x03\x01a\x00\x01"),
    (
        Request(Command.CONNECT, Address.of(NAME_255, 65535)),
        b"\x05\x01\x00\x03\xff" + NAME_255.encode() + b"\xff\xff",
    ),
    (
        Request(Command.BIND, Address.of("10.0.0.1", 21)),
        b"\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x15",
    ),
    (
        Request(Command.UDP_ASSOCIATE, Address.unspecified()),
        b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
    ),
    # RFC 1928 s. 6: VER REP RSV ATYP BND.ADDR BND.PORT
    (
        Reply(ReplyCode.SUCCEEDED, Address.of("10.0.0.1", 1080)),
        b"\x05\x00\x00\x01\x0a\x00\x00\x01\x04\x38",
    ),
    (
        Reply(ReplyCode.SUCCEEDED, Address.of("::1", 1080)),
        b"\x05\x00\x00\x04" + b"\x00" * 15 + b"\x01\x04\x38",
    ),
    (
        Reply(ReplyCode.SUCCEEDED, Address.of(IPV6_FULL, 0)),
        b"\x05\x00\x00\x04" + IPV6_FULL_PACKED + b"\x00\x00",
    ),
    (
        Reply(ReplyCode.SUCCEEDED, Address.of("proxy.example", 1080)),
        b"\x05\x00\x00\x03\x0dproxy.example\x04\x38",
    ),
    (Reply(ReplyCode.GENERAL_FAILURE), b"\x05\x01\x00\x01\x00\x00\x00\x00\x00\x00"),
    (Reply(ReplyCode.CONNECTION_REFUSED), b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"),
    (Reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED), b"\x05\x08\x00\x01\x00\x00\x00\x00\x00\x00"),
]
IDS = [f"{type(m).__name__}-{i}" for i, (m, _) in enumerate(CASES)]


@pytest.mark.parametrize(("message", "wire"), CASES, ids=IDS)
def test_to_bytes(message: Any, wire: bytes) -> None:
    assert message.to_bytes() == wire


@pytest.mark.parametrize(("message", "wire"), CASES, ids=IDS)
def test_parse(message: Any, wire: bytes) -> None:
    parse = type(message).parse
    assert parse(wire) == (message, len(wire))
    assert parse(wire, 0) == (message, len(wire))
    for kind in (bytearray, memoryview):
        assert parse(kind(wire)) == (message, len(wire))


@pytest.mark.parametrize(("message", "wire"), CASES, ids=IDS)
def test_parse_at_offset_with_trailing_bytes(message: Any, wire: bytes) -> None:
    buf = b"\x00\xff\x05" + wire + b"\x05\x01\x00next"
    assert type(message).parse(buf, 3) == (message, 3 + len(wire))


@pytest.mark.parametrize(("message", "wire"), CASES, ids=IDS)
def test_parse_incomplete_returns_none(message: Any, wire: bytes) -> None:
    parse = type(message).parse
    for cut in range(min(len(wire), 600)):
        assert parse(wire[:cut]) is None
        assert parse(b"zz" + wire[:cut], 2) is None
    assert parse(wire[:-1]) is None


def test_parsed_enums() -> None:
    request, _ = Request.parse(b"\x05\x02\x00\x01\x01\x02\x03\x04\x00\x01")  # type: ignore[misc]
    assert request.command is Command.BIND
    reply, _ = Reply.parse(b"\x05\x04\x00\x01\x01\x02\x03\x04\x00\x01")  # type: ignore[misc]
    assert reply.reply is ReplyCode.HOST_UNREACHABLE
    assert not reply.ok
    gss, _ = GssapiMessage.parse(b"\x01\x02\x00\x00")  # type: ignore[misc]
    assert gss.mtyp is GssapiMessageType.PROTECTION


def test_ok_properties() -> None:
    assert UserPassReply(0).ok
    assert not UserPassReply(1).ok
    assert not UserPassReply(0x02).ok  # any non-zero STATUS is a failure
    assert Reply(ReplyCode.SUCCEEDED).ok
    assert not Reply(ReplyCode.GENERAL_FAILURE).ok


def test_reply_default_address() -> None:
    assert Reply(ReplyCode.NOT_ALLOWED).address == Address(AddressType.IPV4, "0.0.0.0", 0)


def test_request_ignores_nonzero_rsv() -> None:
    wire = b"\x05\x01\x7f\x01\x7f\x00\x00\x01\x00\x50"
    assert Request.parse(wire) == (Request(Command.CONNECT, Address.of("127.0.0.1", 80)), 10)


def test_gssapi_abort_is_two_bytes_only() -> None:
    # RFC 1961 s. 3: the abort message has no LEN and no TOKEN; what follows is not part of it.
    assert GssapiMessage.parse(b"\x01\xff") == (GssapiMessage(GssapiMessageType.ABORT), 2)
    assert GssapiMessage.parse(b"\x01\xff\x00\x05hello") == (
        GssapiMessage(GssapiMessageType.ABORT),
        2,
    )
    assert GssapiMessage.parse(b"\x01") is None


def test_max_handshake_message() -> None:
    assert MAX_HANDSHAKE_MESSAGE == len(UserPassRequest(USER_255, PASS_255).to_bytes()) == 513


# --- UDP ASSOCIATE datagrams (RFC 1928 s. 7) ------------------------------------------------------

UDP_CASES = [
    (
        UdpDatagram(Address.of("8.8.8.8", 53), b"query"),
        b"\x00\x00\x00\x01\x08\x08\x08\x08\x00\x35query",
    ),
    (
        UdpDatagram(Address.of("::1", 53), b"q"),
        b"\x00\x00\x00\x04" + b"\x00" * 15 + b"\x01\x00\x35q",
    ),
    (
        UdpDatagram(Address.of(IPV6_FULL, 5353), b""),
        b"\x00\x00\x00\x04" + IPV6_FULL_PACKED + b"\x14\xe9",
    ),
    (
        UdpDatagram(Address.of("dns.example", 53), b"\x00\x01"),
        b"\x00\x00\x00\x03\x0bdns.example\x00\x35\x00\x01",
    ),
    (
        UdpDatagram(Address.of("1.2.3.4", 9), b"part", frag=1),
        b"\x00\x00\x01\x01\x01\x02\x03\x04\x00\x09part",
    ),
    (
        UdpDatagram(Address.of("1.2.3.4", 9), b"last", frag=0x82),
        b"\x00\x00\x82\x01\x01\x02\x03\x04\x00\x09last",
    ),
]


@pytest.mark.parametrize(("datagram", "wire"), UDP_CASES)
def test_udp_to_bytes(datagram: UdpDatagram, wire: bytes) -> None:
    assert datagram.to_bytes() == wire
    assert datagram.header() + datagram.data == wire


@pytest.mark.parametrize(("datagram", "wire"), UDP_CASES)
def test_udp_parse(datagram: UdpDatagram, wire: bytes) -> None:
    for kind in (bytes, bytearray, memoryview):
        parsed = UdpDatagram.parse(kind(wire))
        assert parsed == datagram
        assert parsed.frag == datagram.frag
        assert type(parsed.data) is bytes


def test_udp_parse_ignores_rsv() -> None:
    parsed = UdpDatagram.parse(b"\xff\xff\x00\x01\x01\x02\x03\x04\x00\x09x")
    assert parsed == UdpDatagram(Address.of("1.2.3.4", 9), b"x")


@pytest.mark.parametrize(("datagram", "wire"), UDP_CASES)
def test_udp_truncated_header(datagram: UdpDatagram, wire: bytes) -> None:
    header_len = len(datagram.header())
    for cut in range(header_len):
        with pytest.raises(RemoteProtocolError):
            UdpDatagram.parse(wire[:cut])


def test_udp_bad_address() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        UdpDatagram.parse(b"\x00\x00\x00\x02" + b"\x00" * 10)
    assert info.value.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    with pytest.raises(RemoteProtocolError) as info:
        UdpDatagram.parse(b"\x00\x00\x00\x03\x04a b\x00\x00\x35data")
    assert info.value.reply is ReplyCode.HOST_UNREACHABLE


# --- errors on the wire ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parse", "wire"),
    [
        (Greeting.parse, b"\x04\x01\x00"),  # SOCKS4
        (Greeting.parse, b"\x00"),
        (Greeting.parse, b"\x01\x01\x00"),
        (Greeting.parse, b"\x16\x03\x01"),  # a TLS ClientHello
        (Greeting.parse, b"GET / HTTP/1.1\r\n"),
        (MethodSelection.parse, b"\x04"),
        (MethodSelection.parse, b"\x04\x00"),
        (MethodSelection.parse, b"\x01\x00"),
        (UserPassRequest.parse, b"\x05"),
        (UserPassRequest.parse, b"\x05\x01a\x01b"),
        (UserPassRequest.parse, b"\x00\x00\x00"),
        (UserPassReply.parse, b"\x05"),
        (UserPassReply.parse, b"\x05\x00"),
        (GssapiMessage.parse, b"\x05"),
        (GssapiMessage.parse, b"\x02\x01\x00\x00"),
        (Request.parse, b"\x04"),
        (Request.parse, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"),  # SOCKS4 CONNECT
        (Reply.parse, b"\x00"),
        (Reply.parse, b"\x00\x5a\x00\x50\x7f\x00\x00\x01"),  # SOCKS4 reply
    ],
)
def test_wrong_version(parse: Any, wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="version") as info:
        parse(wire)
    assert info.value.reply is None


def test_greeting_without_methods() -> None:
    with pytest.raises(RemoteProtocolError, match="no method") as info:
        Greeting.parse(b"\x05\x00")
    assert info.value.reply is None


@pytest.mark.parametrize("cmd", [0x00, 0x04, 0x05, 0x80, 0xFF])
def test_unknown_command(cmd: int) -> None:
    for wire in (bytes((5, cmd)), bytes((5, cmd, 0, 1, 127, 0, 0, 1, 0, 80))):
        with pytest.raises(RemoteProtocolError) as info:
            Request.parse(wire)
        assert info.value.reply is ReplyCode.COMMAND_NOT_SUPPORTED
        assert info.value.reply == 0x07


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
@pytest.mark.parametrize("parse", [Request.parse, Reply.parse])
def test_unknown_address_type(parse: Any, atyp: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse(bytes((5, 1, 0, atyp)) + b"\x00" * 20)
    assert info.value.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    assert info.value.reply == 0x08


@pytest.mark.parametrize(
    "name", [b"localhost\x00junk", b"local host", b"ex\xc3\xa4mple.com", b"", b"a" * 64]
)
def test_request_bad_domain(name: bytes) -> None:
    wire = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    with pytest.raises(RemoteProtocolError) as info:
        Request.parse(wire)
    assert info.value.reply is ReplyCode.HOST_UNREACHABLE
    assert info.value.reply == 0x04


@pytest.mark.parametrize("name", [b"::1", b"2001:db8::1", b"10.0.0.1"])
def test_request_ip_literal_in_domain_form(name: bytes) -> None:
    wire = b"\x05\x01\x00\x03" + bytes((len(name),)) + name + b"\x00\x50"
    request, end = Request.parse(wire)  # type: ignore[misc]
    assert end == len(wire)
    assert request.address == Address(AddressType.DOMAIN, name.decode(), 80)
    assert request.to_bytes() == wire


@pytest.mark.parametrize("rep", [0x09, 0x0A, 0x80, 0xFF])
def test_unknown_reply_code(rep: int) -> None:
    with pytest.raises(RemoteProtocolError, match="reply code"):
        Reply.parse(bytes((5, rep, 0, 1, 0, 0, 0, 0, 0, 0)))


@pytest.mark.parametrize("mtyp", [0x00, 0x04, 0x10, 0xFE])
def test_unknown_gssapi_type(mtyp: int) -> None:
    with pytest.raises(RemoteProtocolError, match="GSSAPI"):
        GssapiMessage.parse(bytes((1, mtyp, 0, 0)))


# --- builders refuse what the wire cannot carry ---------------------------------------------------


def test_greeting_builder_limits() -> None:
    with pytest.raises(ValueError, match="1-255"):
        Greeting(())
    with pytest.raises(ValueError, match="1-255"):
        Greeting(tuple([0] * 256))
    with pytest.raises(ValueError, match="1-255"):
        Greeting((256,))
    with pytest.raises(ValueError, match="1-255"):
        Greeting((-1,))
    assert len(Greeting(tuple([0] * 255)).to_bytes()) == 257


def test_userpass_builder_limits() -> None:
    with pytest.raises(ValueError, match="255"):
        UserPassRequest(b"u" * 256, b"")
    with pytest.raises(ValueError, match="255"):
        UserPassRequest(b"", b"p" * 256)


def test_gssapi_builder_limits() -> None:
    with pytest.raises(ValueError, match="65535"):
        GssapiMessage(GssapiMessageType.AUTHENTICATION, b"x" * 0x10000)


@pytest.mark.parametrize(
    "build",
    [
        lambda: MethodSelection(256).to_bytes(),
        lambda: UserPassReply(-1).to_bytes(),
        lambda: UdpDatagram(Address.of("1.2.3.4", 1), b"", frag=256).to_bytes(),
    ],
)
def test_single_byte_fields_out_of_range(build: Any) -> None:
    with pytest.raises(ValueError, match="range"):
        build()


def test_userpass_password_not_in_repr() -> None:
    assert "hunter2" not in repr(UserPassRequest(b"alice", b"hunter2"))
