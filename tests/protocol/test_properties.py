"""Property tests: round trips, split points and garbage input for parsers and state machines."""

import ipaddress
import itertools
from typing import Any

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Address,
    AddressType,
    AuthMethod,
    ClientConnection,
    Command,
    Greeting,
    GssapiMessage,
    GssapiMessageType,
    MethodSelection,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Request,
    ServerConnection,
    State,
    UdpDatagram,
    UserPassReply,
    UserPassRequest,
    is_valid_hostname,
    parse_address,
)

FAST = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SLOW = settings(FAST, max_examples=60)
GARBAGE = settings(FAST, max_examples=150)

# --- strategies -----------------------------------------------------------------------------------

ports = st.integers(0, 0xFFFF)
octets = st.integers(0, 0xFF)
_EDGE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
labels = st.one_of(
    st.text(_EDGE, min_size=1, max_size=1),
    st.builds(
        lambda first, middle, last: first + middle + last,
        st.sampled_from(_EDGE),
        st.text(_EDGE + "-", max_size=61),
        st.sampled_from(_EDGE),
    ),
)
hostnames = st.builds(
    lambda parts, dot: ".".join(parts) + dot,
    st.lists(labels, min_size=1, max_size=6),
    st.sampled_from(["", "."]),
).filter(lambda name: len(name) <= 255)

addresses = st.one_of(
    st.builds(Address.of, st.ip_addresses(v=4), ports),
    st.builds(Address.of, st.ip_addresses(v=6), ports),
    st.builds(lambda name, port: Address(AddressType.DOMAIN, name, port), hostnames, ports),
    # an IP literal carried in domain form stays a domain
    st.builds(
        lambda ip, port: Address(AddressType.DOMAIN, str(ip), port), st.ip_addresses(), ports
    ),
)

greetings = st.builds(Greeting, st.lists(octets, min_size=1, max_size=255).map(tuple))
selections = st.builds(MethodSelection, octets)
userpass_requests = st.builds(UserPassRequest, st.binary(max_size=255), st.binary(max_size=255))
userpass_replies = st.builds(UserPassReply, octets)
gssapi_messages = st.one_of(
    st.builds(
        GssapiMessage,
        st.sampled_from(
            [
                GssapiMessageType.AUTHENTICATION,
                GssapiMessageType.PROTECTION,
                GssapiMessageType.ENCAPSULATION,
            ]
        ),
        st.binary(max_size=600),
    ),
    st.just(GssapiMessage(GssapiMessageType.ABORT)),
)
requests = st.builds(Request, st.sampled_from(Command), addresses)
replies = st.builds(Reply, st.sampled_from(ReplyCode), addresses)
messages = st.one_of(
    greetings,
    selections,
    userpass_requests,
    userpass_replies,
    gssapi_messages,
    requests,
    replies,
)
datagrams = st.builds(UdpDatagram, addresses, st.binary(max_size=200), octets)

PARSERS = [
    Greeting.parse,
    MethodSelection.parse,
    UserPassRequest.parse,
    UserPassReply.parse,
    GssapiMessage.parse,
    Request.parse,
    Reply.parse,
]

# --- round trips ----------------------------------------------------------------------------------


@FAST
@given(addresses)
@example(Address.of(ipaddress.IPv6Address("::ffff:1.2.3.4"), 80))
@example(Address.of(ipaddress.IPv6Address("::0.2.0.3"), 80))
def test_address_round_trip(address: Address) -> None:
    wire = address.pack()
    assert parse_address(wire, 0) == (address, len(wire))
    if address.atyp is not AddressType.DOMAIN:  # text and ipaddress forms give the same value
        assert Address.of(address.host, address.port) == address
        assert Address.of(f"[{address.host}]", address.port) == address
        assert Address.of(address.ip, address.port) == address  # type: ignore[arg-type]


@FAST
@given(hostnames)
def test_generated_hostnames_are_valid(name: str) -> None:
    assert is_valid_hostname(name.encode())


@FAST
@given(messages)
def test_message_round_trip(message: Any) -> None:
    wire = message.to_bytes()
    parse = type(message).parse
    for kind in (bytes, bytearray, memoryview):
        assert parse(kind(wire)) == (message, len(wire))
    assert parse(wire)[0].to_bytes() == wire


@FAST
@given(messages, st.binary(max_size=40), st.binary(max_size=40))
def test_message_parse_at_offset(message: Any, prefix: bytes, suffix: bytes) -> None:
    wire = message.to_bytes()
    buf = prefix + wire + suffix
    assert type(message).parse(buf, len(prefix)) == (message, len(prefix) + len(wire))


@FAST
@given(messages)
def test_message_prefixes_are_incomplete(message: Any) -> None:
    wire = message.to_bytes()
    parse = type(message).parse
    for cut in range(len(wire)):
        assert parse(wire[:cut]) is None
    assert parse(wire) == (message, len(wire))


@FAST
@given(datagrams)
def test_udp_round_trip(datagram: UdpDatagram) -> None:
    wire = datagram.to_bytes()
    assert UdpDatagram.parse(wire) == datagram
    assert UdpDatagram.parse(memoryview(wire)) == datagram
    assert wire == datagram.header() + datagram.data


# --- split points through the state machines ------------------------------------------------------


def _expecting(message: Any) -> Any:
    """A connection in the state where ``message`` is the next thing its peer may send."""
    if isinstance(message, Greeting):
        return ServerConnection()
    if isinstance(message, (UserPassRequest, GssapiMessage, Request)):
        method = {
            UserPassRequest: AuthMethod.USERNAME_PASSWORD,
            GssapiMessage: AuthMethod.GSSAPI,
            Request: AuthMethod.NO_AUTH,
        }[type(message)]
        server = ServerConnection()
        server.receive_data(bytes((5, 1, method)))
        server.next_event()
        server.send(MethodSelection(method))
        return server
    client = ClientConnection()
    if isinstance(message, MethodSelection):
        client.send(Greeting((message.method,)))
        return client
    method = (
        AuthMethod.USERNAME_PASSWORD if isinstance(message, UserPassReply) else AuthMethod.NO_AUTH
    )
    client.send(Greeting((method,)))
    client.receive_data(bytes((5, method)))
    client.next_event()
    if isinstance(message, UserPassReply):
        client.send(UserPassRequest(b"user", b"pass"))
    if isinstance(message, Reply):
        client.send(Request(Command.CONNECT, Address.of("example.com", 80)))
    return client


@SLOW
@given(st.data(), st.one_of(greetings, selections, userpass_requests, userpass_replies,
                            gssapi_messages, requests, replies))  # fmt: skip
def test_connection_split_anywhere(data: st.DataObject, message: Any) -> None:
    wire = message.to_bytes()
    cut = data.draw(st.integers(0, len(wire)))
    conn = _expecting(message)
    if cut:  # (b"" would be end of stream)
        conn.receive_data(wire[:cut])
    if cut < len(wire):
        assert conn.next_event() is NEED_DATA
        assert conn.buffered == cut
    conn.receive_data(wire[cut:] + b"\x05")
    assert conn.next_event() == message
    assert conn.buffered == 1


# --- garbage into parsers -------------------------------------------------------------------------

PLAUSIBLE = [b"", b"\x05", b"\x05\x01", b"\x05\x01\x00", b"\x05\x00\x00", b"\x01", b"\x01\x01"]
noise = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda head, tail: head + tail, st.sampled_from(PLAUSIBLE), st.binary(max_size=80)),
    st.builds(
        lambda head, atyp, tail: head + bytes((atyp,)) + tail,
        st.sampled_from(PLAUSIBLE),
        st.sampled_from([1, 3, 4]),
        st.binary(max_size=40),
    ),
)


@FAST
@given(noise, st.integers(0, 90), st.sampled_from(PARSERS))
def test_parsers_on_garbage(buf: bytes, offset: int, parse: Any) -> None:
    try:
        result = parse(buf, offset)
    except RemoteProtocolError:
        return
    if result is None:
        return
    message, end = result
    assert offset < end <= len(buf)
    # a parsed message is exactly as long as its bytes, and re-parses to itself
    assert len(message.to_bytes()) == end - offset
    assert parse(message.to_bytes()) == (message, end - offset)


@FAST
@given(noise, st.integers(0, 90))
def test_parse_address_on_garbage(buf: bytes, offset: int) -> None:
    try:
        result = parse_address(buf, offset)
    except RemoteProtocolError as error:
        reply = error.reply
        assert reply in (ReplyCode.HOST_UNREACHABLE, ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)
        return
    if result is not None:
        address, end = result
        assert address.pack() == buf[offset:end]


@FAST
@given(st.one_of(noise, st.builds(lambda b: b"\x00\x00" + b, noise)))
def test_udp_parse_on_garbage(buf: bytes) -> None:
    try:
        datagram = UdpDatagram.parse(buf)
    except RemoteProtocolError:
        return
    assert datagram.to_bytes()[2:] == buf[2:]


# --- garbage into the state machines --------------------------------------------------------------


@st.composite
def mutated(draw: Any, parts: Any) -> bytes:
    """Valid message bytes with a few bytes overwritten, cut short and/or followed by noise."""
    wire = bytearray(b"".join(m.to_bytes() for m in draw(parts)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        if wire:
            wire[draw(st.integers(0, len(wire) - 1))] = draw(octets)
    cut = draw(st.integers(0, len(wire)))
    if draw(st.booleans()):
        cut = len(wire)
    return bytes(wire[:cut]) + draw(st.binary(max_size=10))


_AUTH_FROM_CLIENT = {
    AuthMethod.NO_AUTH: st.just([]),
    AuthMethod.GSSAPI: st.lists(gssapi_messages, min_size=1, max_size=3),
    AuthMethod.USERNAME_PASSWORD: st.lists(userpass_requests, min_size=1, max_size=1),
}
_AUTH_FROM_SERVER = {
    AuthMethod.NO_AUTH: st.just([]),
    AuthMethod.GSSAPI: st.lists(gssapi_messages, min_size=1, max_size=3),
    AuthMethod.USERNAME_PASSWORD: st.lists(userpass_replies, min_size=1, max_size=1),
    AuthMethod.NO_ACCEPTABLE: st.just([]),
}
# Coherent handshakes (the method the server will choose is the one the auth bytes are for), so
# that mutations are met in every state, not only at the first byte.
mostly_ok_replies = st.builds(
    Reply, st.sampled_from([ReplyCode.SUCCEEDED] * 4 + list(ReplyCode)), addresses
)
client_streams = st.sampled_from(list(_AUTH_FROM_CLIENT)).flatmap(
    lambda method: st.builds(
        lambda others, auth, request: [Greeting((*others, method)), *auth, request],
        st.lists(st.integers(3, 0xFE), max_size=4),
        _AUTH_FROM_CLIENT[method],
        requests,
    )
)
server_streams = st.sampled_from(list(_AUTH_FROM_SERVER)).flatmap(
    lambda method: st.builds(
        lambda auth, answers: [MethodSelection(method), *auth, *answers],
        _AUTH_FROM_SERVER[method],
        st.lists(mostly_ok_replies, min_size=1, max_size=2),
    )
)
to_server = st.one_of(noise, mutated(client_streams), mutated(client_streams))
to_client = st.one_of(noise, mutated(server_streams), mutated(server_streams))


def _chunks(data: st.DataObject, buf: bytes) -> list[bytes]:
    if data.draw(st.booleans(), label="all at once"):
        return [buf] if buf else []
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(buf) - 1)), max_size=8)))
    bounds = [0, *[c for c in cuts if c < len(buf)], len(buf)]
    return [buf[a:b] for a, b in itertools.pairwise(bounds) if b > a]


REFUSALS = {b"", b"\x05\xff", b"\x01\x01", b"\x01\xff"} | {
    Reply(code).to_bytes() for code in ReplyCode if code is not ReplyCode.SUCCEEDED
}


class _Driver:
    """Plays a well-behaved local side for whatever the peer's (garbage) bytes allow."""

    def __init__(self, conn: Any, data: st.DataObject) -> None:
        self.conn = conn
        self.data = data
        self.fed = 0
        self.consumed = 0
        self.last_state = conn.state

    def feed_all(self, chunks: list[bytes], eof: bool) -> None:
        for chunk in chunks:
            self.feed(chunk)
        if eof:
            self.feed(b"")

    def feed(self, chunk: bytes) -> None:
        self.conn.receive_data(chunk)
        self.fed += len(chunk)
        self.pump()

    def check(self) -> None:
        assert 0 <= self.conn.buffered <= self.fed
        assert self.consumed + self.conn.buffered == self.fed

    def pump(self) -> None:
        conn = self.conn
        while True:
            self.last_state = conn.state
            received = conn.next_event()
            if received is CONNECTION_CLOSED:
                assert conn.state is State.CLOSED
                return
            if received is NEED_DATA:
                if conn.state is State.ESTABLISHED:
                    self.consumed += len(conn.trailing_data())
                if not self.speak():
                    self.check()
                    return
                continue
            self.consumed += len(received.to_bytes())
            self.check()
            # a token to answer, or GSSAPI just selected (the client starts)
            if isinstance(received, GssapiMessage) or conn.state is State.AUTH_GSSAPI:
                self.gssapi_turn()

    def gssapi_turn(self) -> None:
        choice = self.data.draw(st.sampled_from(["token", "done", "wait"]))
        if choice == "token":
            self.conn.send(GssapiMessage(GssapiMessageType.AUTHENTICATION, b"tok"))
        elif choice == "done":
            self.conn.authentication_done()

    def speak(self) -> bool:
        raise NotImplementedError


class _ServerDriver(_Driver):
    def speak(self) -> bool:
        conn, draw = self.conn, self.data.draw
        if conn.state is State.METHOD:
            preference = draw(st.permutations([0, 1, 2]))
            conn.send(conn.choose_method(tuple(preference)))
        elif conn.state is State.AUTH_USERPASS_REPLY:
            conn.send(UserPassReply(draw(st.sampled_from([0, 0, 1]))))
        elif conn.state in (State.REPLY, State.BIND_WAIT):
            code = draw(st.sampled_from([ReplyCode.SUCCEEDED, ReplyCode.SUCCEEDED, *ReplyCode]))
            conn.send(Reply(code, Address.of("10.0.0.1", 1080)))
        else:
            return False
        return True


class _ClientDriver(_Driver):
    def speak(self) -> bool:
        conn, draw = self.conn, self.data.draw
        if conn.state is State.AUTH_USERPASS:
            conn.send(UserPassRequest(b"user", b"pass"))
        elif conn.state is State.REQUEST:
            conn.send(Request(draw(st.sampled_from(Command)), Address.of("example.com", 80)))
        else:
            return False
        return True


def _run(driver: _Driver, chunks: list[bytes], eof: bool) -> RemoteProtocolError | None:
    try:
        driver.feed_all(chunks, eof)
    except RemoteProtocolError as error:
        event(f"{type(driver.conn).__name__}: error in {driver.last_state.name}")
        assert driver.conn.state is State.CLOSED
        assert driver.conn.buffered <= driver.fed
        return error
    event(f"{type(driver.conn).__name__}: ended in {driver.conn.state.name}")
    driver.check()
    return None


@GARBAGE
@given(st.data(), to_server, st.booleans())
def test_server_on_garbage(data: st.DataObject, buf: bytes, eof: bool) -> None:
    server = ServerConnection()
    error = _run(_ServerDriver(server, data), _chunks(data, buf), eof)
    if error is not None:
        assert server.refusal(error) in REFUSALS
        assert server.state is State.CLOSED


@GARBAGE
@given(st.data(), to_client, st.booleans())
def test_client_on_garbage(data: st.DataObject, buf: bytes, eof: bool) -> None:
    client = ClientConnection()
    offered = data.draw(st.sampled_from([(0, 1, 2), (2, 1, 0), (0,), (2,), (1,)]))
    client.send(Greeting(offered))
    _run(_ClientDriver(client, data), _chunks(data, buf), eof)


@SLOW
@given(
    st.data(),
    st.sampled_from([AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD]),
    greetings,
    userpass_requests,
    requests,
    st.binary(max_size=50),
)
def test_server_on_valid_pipelined_stream(
    data: st.DataObject,
    method: int,
    greeting: Greeting,
    credentials: UserPassRequest,
    request: Request,
    payload: bytes,
) -> None:
    """A whole valid handshake in random chunks: same events and same payload at any split."""
    greeting = Greeting((*greeting.methods[:254], method))
    stream: list[Any] = [greeting, request]
    if method == AuthMethod.USERNAME_PASSWORD:
        stream.insert(1, credentials)
    buf = b"".join(m.to_bytes() for m in stream) + payload
    server = ServerConnection()
    events: list[Any] = []
    answers = {
        State.METHOD: MethodSelection(method),
        State.AUTH_USERPASS_REPLY: UserPassReply(0),
        State.REPLY: Reply(ReplyCode.SUCCEEDED, Address.of("10.0.0.1", 1080)),
        State.BIND_WAIT: Reply(ReplyCode.SUCCEEDED, Address.of("192.0.2.1", 2000)),
    }
    for chunk in _chunks(data, buf):
        server.receive_data(chunk)
        while True:
            received = server.next_event()
            if received is not NEED_DATA:
                events.append(received)
            elif server.state in answers:  # this side's turn to speak
                server.send(answers[server.state])
            else:
                break
    assert events == stream
    assert server.state is State.ESTABLISHED
    assert server.trailing_data() == payload
