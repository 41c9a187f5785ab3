"""SOCKS4 and SOCKS4a: messages against wire bytes (hand-written and captured from curl), both
state machines wired to each other, the reply-code table, and property tests."""

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    SOCKS4_REPLY_FOR,
    Address,
    AddressType,
    Command,
    LocalProtocolError,
    RemoteProtocolError,
    ReplyCode,
    Socks4ClientConnection,
    Socks4Error,
    Socks4Reply,
    Socks4ReplyCode,
    Socks4Request,
    Socks4ServerConnection,
    State,
    socks4_reply_code,
)
from socksd.protocol.socks4 import MAX_DOMAIN, MAX_REQUEST, MAX_USERID
from tests.protocol.test_properties import hostnames

PROPS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
NAME_255 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 63])
USER_255 = bytes(range(1, 256))

# What curl 7.88.1 sent to a one-shot recorder on loopback (nothing resolved, nothing forwarded):
CURL_SOCKS4 = b"\x04\x01\x00\t\x7f\x00\x00\x01\x00"
"""curl --socks4 127.0.0.1:PORT http://127.0.0.1:9/"""
CURL_SOCKS4_USER = b"\x04\x01\x1f\x90\x7f\x00\x00\x01alice\x00"
"""curl -x socks4://alice@127.0.0.1:PORT http://127.0.0.1:8080/"""
CURL_SOCKS4A = b"\x04\x01\x00P\x00\x00\x00\x01\x00target.invalid\x00"
"""curl --socks4a 127.0.0.1:PORT http://target.invalid/"""
CURL_SOCKS4A_USER = b"\x04\x01 \xfb\x00\x00\x00\x01bob\x00target.invalid\x00"
"""curl -x socks4a://bob@127.0.0.1:PORT http://target.invalid:8443/"""

CURL_CASES = [
    (CURL_SOCKS4, Socks4Request(Command.CONNECT, Address.of("127.0.0.1", 9))),
    (CURL_SOCKS4_USER, Socks4Request(Command.CONNECT, Address.of("127.0.0.1", 8080), b"alice")),
    (CURL_SOCKS4A, Socks4Request(Command.CONNECT, Address.of("target.invalid", 80))),
    (CURL_SOCKS4A_USER, Socks4Request(Command.CONNECT, Address.of("target.invalid", 8443), b"bob")),
]

# (message, wire bytes) for every message and the corners of each field.
CASES: list[tuple[Any, bytes]] = [
    (
        Socks4Request(Command.CONNECT, Address.of("10.1.2.3", 443)),
        b"\x04\x01\x01\xbb\x0a\x01\x02\x03\x00",
    ),
    (
        Socks4Request(Command.BIND, Address.of("192.0.2.7", 21), b"ftp"),
        b"\x04\x02\x00\x15\xc0\x00\x02\x07ftp\x00",
    ),
    (
        Socks4Request(Command.BIND, Address.of("0.0.0.0", 0)),
        b"\x04\x02\x00\x00\x00\x00\x00\x00\x00",
    ),
    (
        Socks4Request(Command.CONNECT, Address.of("255.255.255.255", 65535), USER_255),
        b"\x04\x01\xff\xff\xff\xff\xff\xff" + USER_255 + b"\x00",
    ),
    (
        Socks4Request(Command.CONNECT, Address.of("example.com", 80), b"u"),
        b"\x04\x01\x00\x50\x00\x00\x00\x01u\x00example.com\x00",
    ),
    (
        Socks4Request(Command.BIND, Address.of("example.com", 1)),
        b"\x04\x02\x00\x01\x00\x00\x00\x01\x00example.com\x00",
    ),
    (
        Socks4Request(Command.CONNECT, Address.of(NAME_255, 80), USER_255),
        b"\x04\x01\x00\x50\x00\x00\x00\x01" + USER_255 + b"\x00" + NAME_255.encode() + b"\x00",
    ),
    # a 4a name that is an IP literal stays a name (resolved by socksd), as in SOCKS5
    (
        Socks4Request(Command.CONNECT, Address(AddressType.DOMAIN, "127.0.0.1", 80)),
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00127.0.0.1\x00",
    ),
    (Socks4Reply(Socks4ReplyCode.GRANTED), b"\x00\x5a\x00\x00\x00\x00\x00\x00"),
    (Socks4Reply(Socks4ReplyCode.REJECTED), b"\x00\x5b\x00\x00\x00\x00\x00\x00"),
    (Socks4Reply(Socks4ReplyCode.IDENTD_UNREACHABLE), b"\x00\x5c\x00\x00\x00\x00\x00\x00"),
    (Socks4Reply(Socks4ReplyCode.IDENTD_MISMATCH), b"\x00\x5d\x00\x00\x00\x00\x00\x00"),
    (
        Socks4Reply(Socks4ReplyCode.GRANTED, Address.of("203.0.113.9", 40000)),
        b"\x00\x5a\x9c\x40\xcb\x00\x71\x09",
    ),
]


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def feed(conn: Any, data: bytes, bytewise: bool) -> list[Any]:
    """Feed ``data`` at once or byte by byte; collect what the connection yields."""
    events: list[Any] = []
    for chunk in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if event is CONNECTION_CLOSED:
                return events
    return events


# --- messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "wire"), CASES + [(m, w) for w, m in CURL_CASES])
def test_message_bytes(message: Any, wire: bytes) -> None:
    assert message.to_bytes() == wire
    parse = type(message).parse
    for kind in (bytes, bytearray, memoryview):
        assert parse(kind(wire)) == (message, len(wire))
    assert parse(b"junk" + wire + b"more", 4) == (message, 4 + len(wire))
    for cut in range(len(wire)):
        assert parse(wire[:cut]) is None


def test_max_request_is_the_longest() -> None:
    longest = Socks4Request(Command.CONNECT, Address.of(NAME_255, 80), USER_255).to_bytes()
    assert len(longest) == MAX_REQUEST == 520


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"\x05\x01\x00\x50\x7f\x00\x00\x01\x00", None),  # a SOCKS5 version byte
        (b"\x00", None),
        (b"\x04\x03", ReplyCode.COMMAND_NOT_SUPPORTED),  # UDP ASSOCIATE: SOCKS5 only
        (b"\x04\x00", ReplyCode.COMMAND_NOT_SUPPORTED),
        (b"\x04\xff", ReplyCode.COMMAND_NOT_SUPPORTED),
        # USERID without its NUL within 255 bytes: refused at byte 264, not waited on
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 256, None),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"a" * 256, None),  # 4a name over 255
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00", ReplyCode.HOST_UNREACHABLE),  # empty name
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00bad name\x00", ReplyCode.HOST_UNREACHABLE),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a\xffb\x00", ReplyCode.HOST_UNREACHABLE),
        (b"\x04\x01\x00\x50\x00\x00\x00\xff\x00-lead\x00", ReplyCode.HOST_UNREACHABLE),
    ],
)
def test_bad_requests(wire: bytes, reply: ReplyCode | None) -> None:
    with pytest.raises(Socks4Error) as info:
        Socks4Request.parse(wire)
    assert info.value.reply == reply
    assert isinstance(info.value, RemoteProtocolError)  # the servers' existing handlers catch it


def test_longest_fields_wait_and_one_more_byte_refuses() -> None:
    head = b"\x04\x01\x00\x50\x00\x00\x00\x01"
    assert Socks4Request.parse(head + b"u" * MAX_USERID) is None
    with pytest.raises(Socks4Error, match="USERID longer than 255"):
        Socks4Request.parse(head + b"u" * (MAX_USERID + 1))
    assert Socks4Request.parse(head + b"\x00" + b"a" * MAX_DOMAIN) is None
    with pytest.raises(Socks4Error, match="name longer than 255"):
        Socks4Request.parse(head + b"\x00" + b"a" * (MAX_DOMAIN + 1))


@pytest.mark.parametrize(
    "wire",
    [
        b"\x04\x5a\x00\x00\x00\x00\x00\x00",  # VN 4: replies have VN 0
        b"\x00\x00",
        b"\x00\x59",
        b"\x00\x5e",
        b"\x05\x00",
    ],
)
def test_bad_replies(wire: bytes) -> None:
    with pytest.raises(Socks4Error):
        Socks4Reply.parse(wire)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Socks4Request(Command.UDP_ASSOCIATE, Address.of("1.2.3.4", 1)), "UDP_ASSOCIATE"),
        (lambda: Socks4Request(Command.CONNECT, Address.of("::1", 1)), "IPv6"),
        (lambda: Socks4Request(Command.CONNECT, Address.of("0.0.0.1", 1)), "marker"),
        (lambda: Socks4Request(Command.CONNECT, Address.of("0.0.0.255", 1)), "marker"),
        (lambda: Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 1), b"a\0b"), "USERID"),
        (lambda: Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 1), b"u" * 256), "USERID"),
        (lambda: Socks4Reply(Socks4ReplyCode.GRANTED, Address.of("::1", 1)), "IPv4"),
        (lambda: Socks4Reply(Socks4ReplyCode.GRANTED, Address.of("example.com", 1)), "IPv4"),
    ],
)
def test_builders_refuse_what_the_wire_cannot_carry(build: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("x", [1, 2, 0x7F, 0xFF])
def test_any_4a_marker(x: int) -> None:
    wire = b"\x04\x01\x00\x50\x00\x00\x00" + bytes((x,)) + b"id\x00example.com\x00"
    expected = Socks4Request(Command.CONNECT, Address.of("example.com", 80), b"id")
    assert Socks4Request.parse(wire) == (expected, len(wire))
    assert expected.to_bytes() == wire[:7] + b"\x01" + wire[8:]  # built with 0.0.0.1, as curl


def test_socks4a_flag() -> None:
    assert Socks4Request(Command.CONNECT, Address.of("example.com", 80)).socks4a
    assert not Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 80)).socks4a


# --- the reply-code table -------------------------------------------------------------------------


def test_every_outcome_has_a_socks4_code() -> None:
    assert set(SOCKS4_REPLY_FOR) == set(ReplyCode)
    assert socks4_reply_code(ReplyCode.SUCCEEDED) is Socks4ReplyCode.GRANTED
    for code in ReplyCode:
        if code is not ReplyCode.SUCCEEDED:
            assert socks4_reply_code(code) is Socks4ReplyCode.REJECTED


@pytest.mark.parametrize(
    ("address", "wire_address"),
    [
        (None, b"\x00\x00\x00\x00\x00\x00"),
        (Address.of("10.0.0.1", 40000), b"\x9c\x40\x0a\x00\x00\x01"),
        (Address.of("::ffff:10.0.0.1", 40000), b"\x9c\x40\x0a\x00\x00\x01"),  # unmapped
        (Address.of("2001:db8::1", 40000), b"\x9c\x40\x00\x00\x00\x00"),  # port kept, 0.0.0.0
        (Address.of("example.com", 80), b"\x00\x50\x00\x00\x00\x00"),
    ],
)
@pytest.mark.parametrize("outcome", list(ReplyCode))
def test_reply_of_an_outcome(
    outcome: ReplyCode, address: Address | None, wire_address: bytes
) -> None:
    cd = 90 if outcome is ReplyCode.SUCCEEDED else 91
    assert Socks4Reply.of(outcome, address).to_bytes() == bytes((0, cd)) + wire_address


# --- the state machines ---------------------------------------------------------------------------


def test_connect_session(bytewise: bool) -> None:
    client, server = Socks4ClientConnection(), Socks4ServerConnection()
    request = Socks4Request(Command.CONNECT, Address.of("example.com", 443), b"me")
    assert client.state is server.state is State.REQUEST
    assert feed(server, client.send(request) + b"\x16\x03\x01 hello", bytewise) == [request]
    assert server.state is State.REPLY
    assert server.command is Command.CONNECT
    reply = server.reply(ReplyCode.SUCCEEDED, Address.of("10.0.0.1", 5000))
    assert reply == b"\x00\x5a\x13\x88\x0a\x00\x00\x01"
    assert server.state is State.ESTABLISHED
    assert server.trailing_data() == b"\x16\x03\x01 hello"  # pipelined: kept for the relay
    assert server.trailing_data() == b""
    assert feed(client, reply + b"HTTP/1.1 200 OK", bytewise) == [
        Socks4Reply(Socks4ReplyCode.GRANTED, Address.of("10.0.0.1", 5000))
    ]
    assert client.state is State.ESTABLISHED
    assert client.trailing_data() == b"HTTP/1.1 200 OK"


def test_bind_session(bytewise: bool) -> None:
    client, server = Socks4ClientConnection(), Socks4ServerConnection()
    request = Socks4Request(Command.BIND, Address.of("192.0.2.7", 20))
    assert feed(server, client.send(request), bytewise) == [request]
    first = server.reply(ReplyCode.SUCCEEDED, Address.of("0.0.0.0", 41000))
    assert server.state is State.BIND_WAIT
    assert feed(client, first, bytewise)[0].address == Address.of("0.0.0.0", 41000)
    assert client.state is State.BIND_WAIT
    second = server.reply(ReplyCode.SUCCEEDED, Address.of("192.0.2.7", 20))
    assert server.state is State.ESTABLISHED
    assert client.state is State.BIND_WAIT
    assert feed(client, second, bytewise)[0].address == Address.of("192.0.2.7", 20)
    assert server.state is client.state is State.ESTABLISHED


def test_bind_second_reply_rejected() -> None:
    server = Socks4ServerConnection()
    server.receive_data(Socks4Request(Command.BIND, Address.of("192.0.2.7", 20)).to_bytes())
    server.next_event()
    server.send(Socks4Reply(Socks4ReplyCode.GRANTED))
    # the peer that connected is not DSTIP: the second reply says 91, and that ends it
    assert server.reply(ReplyCode.NOT_ALLOWED) == b"\x00\x5b" + bytes(6)
    assert server.state is State.CLOSED


@pytest.mark.parametrize("outcome", [c for c in ReplyCode if c is not ReplyCode.SUCCEEDED])
def test_failure_reply_closes(outcome: ReplyCode) -> None:
    client, server = Socks4ClientConnection(), Socks4ServerConnection()
    server.receive_data(client.send(Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 80))))
    server.next_event()
    client.receive_data(server.reply(outcome))
    assert client.next_event() == Socks4Reply(Socks4ReplyCode.REJECTED)
    assert server.state is client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.trailing_data()


@pytest.mark.parametrize(("wire", "request_"), CURL_CASES)
def test_curl_requests(wire: bytes, request_: Socks4Request, bytewise: bool) -> None:
    server = Socks4ServerConnection()
    assert feed(server, wire, bytewise) == [request_]
    assert server.state is State.REPLY


def test_out_of_order_sends() -> None:
    server, client = Socks4ServerConnection(), Socks4ClientConnection()
    with pytest.raises(LocalProtocolError):
        server.send(Socks4Reply(Socks4ReplyCode.GRANTED))  # nothing was asked yet
    with pytest.raises(LocalProtocolError):
        server.send(Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 1)))  # wrong role
    with pytest.raises(LocalProtocolError):
        client.send(Socks4Reply(Socks4ReplyCode.GRANTED))
    request = Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 1))
    client.send(request)
    with pytest.raises(LocalProtocolError):
        client.send(request)
    with pytest.raises(LocalProtocolError):
        client.trailing_data()


def test_server_waits_while_it_must_answer() -> None:
    server = Socks4ServerConnection()
    server.receive_data(Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 1)).to_bytes() * 2)
    assert isinstance(server.next_event(), Socks4Request)
    assert server.next_event() is NEED_DATA  # the rest is payload, not a second request
    assert server.buffered == 9


@pytest.mark.parametrize(
    ("wire", "answer", "logged"),
    [
        (b"\x04\x03\x00\x50", b"\x00\x5b" + bytes(6), ReplyCode.COMMAND_NOT_SUPPORTED),
        (b"\x04\x01\x00\x50\x00\x00\x00\x01\x00x..y\x00", b"\x00\x5b" + bytes(6),
         ReplyCode.HOST_UNREACHABLE),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 300, b"\x00\x5b" + bytes(6),
         ReplyCode.GENERAL_FAILURE),
    ],
)  # fmt: skip
def test_refusal(wire: bytes, answer: bytes, logged: ReplyCode, bytewise: bool) -> None:
    server = Socks4ServerConnection()
    with pytest.raises(Socks4Error) as info:
        feed(server, wire, bytewise)
    assert server.state is State.CLOSED
    assert server.refusal(info.value) == answer
    assert server.refused_reply is logged
    assert server.next_event() is NEED_DATA  # closed: nothing more is parsed


def test_end_of_stream() -> None:
    server = Socks4ServerConnection()
    server.receive_data(b"")
    assert server.next_event() is CONNECTION_CLOSED
    assert server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")

    server = Socks4ServerConnection()
    server.receive_data(b"\x04\x01\x00")
    server.receive_data(b"")
    with pytest.raises(Socks4Error, match="middle"):
        server.next_event()
    assert server.refusal(Socks4Error("x")) == b""  # the client is gone: nothing to answer


# --- properties -----------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).filter(lambda ip: not (ip.packed[:3] == bytes(3) and ip.packed[3]))
destinations = st.one_of(
    st.builds(Address.of, ipv4, st.integers(0, 0xFFFF)),
    st.builds(lambda n, p: Address(AddressType.DOMAIN, n, p), hostnames, st.integers(0, 0xFFFF)),
)
requests = st.builds(
    Socks4Request,
    st.sampled_from([Command.CONNECT, Command.BIND]),
    destinations,
    st.binary(max_size=MAX_USERID).map(lambda b: b.replace(b"\0", b"x")),
)
replies = st.builds(
    Socks4Reply,
    st.sampled_from(Socks4ReplyCode),
    st.builds(Address.of, ipv4, st.integers(0, 0xFFFF)),
)


@PROPS
@given(st.one_of(requests, replies), st.data())
def test_round_trip_split_anywhere(message: Any, data: st.DataObject) -> None:
    wire = message.to_bytes()
    assert type(message).parse(wire) == (message, len(wire))
    cut = data.draw(st.integers(1, len(wire)))
    conn: Any = Socks4ServerConnection()
    if isinstance(message, Socks4Reply):
        conn = Socks4ClientConnection()
        conn.send(Socks4Request(Command.CONNECT, Address.of("1.2.3.4", 80)))
    conn.receive_data(wire[:cut])
    if cut < len(wire):
        assert conn.next_event() is NEED_DATA
        conn.receive_data(wire[cut:])
    assert conn.next_event() == message


PLAUSIBLE = [
    b"",
    b"\x04",
    b"\x04\x01",
    b"\x04\x02",
    b"\x04\x01\x00\x50\x00\x00\x00\x01",
    b"\x00\x5a",
]
garbage = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda h, t: h + t, st.sampled_from(PLAUSIBLE), st.binary(max_size=300)),
    st.builds(
        lambda m, i, b: m[:i] + bytes((b,)) + m[i + 1 :],
        requests.map(lambda r: r.to_bytes()),
        st.integers(0, 40),
        st.integers(0, 255),
    ),
)


@PROPS
@given(garbage, st.booleans())
def test_garbage_raises_only_socks4_errors(buf: bytes, eof: bool) -> None:
    for parse in (Socks4Request.parse, Socks4Reply.parse):
        try:
            result = parse(buf)
        except Socks4Error:
            continue
        if result is not None:  # whatever parses is exactly its bytes (any 4a marker: 0.0.0.1)
            message, end = result
            wire = buf[:end]
            if isinstance(message, Socks4Request) and message.socks4a:
                wire = wire[:7] + b"\x01" + wire[8:]
            assert message.to_bytes() == wire
    for conn in (Socks4ServerConnection(), Socks4ClientConnection()):
        if isinstance(conn, Socks4ClientConnection):
            conn.send(Socks4Request(Command.BIND, Address.of("1.2.3.4", 80)))
        refusal: Socks4Error | None = None
        try:
            for i in range(0, len(buf), 7):
                conn.receive_data(buf[i : i + 7])
                while conn.next_event() not in (NEED_DATA, CONNECTION_CLOSED):
                    pass
            if eof:
                conn.receive_data(b"")
                conn.next_event()
        except Socks4Error as error:
            refusal = error
        if refusal is not None:
            assert conn.state is State.CLOSED
            if isinstance(conn, Socks4ServerConnection):
                assert conn.refusal(refusal) in (b"", b"\x00\x5b" + bytes(6))
        assert conn.buffered <= len(buf)
