"""The state machines: ServerConnection and ClientConnection wired to each other."""

from typing import Any

import pytest

from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Address,
    AuthMethod,
    ClientConnection,
    Command,
    Greeting,
    GssapiMessage,
    GssapiMessageType,
    LocalProtocolError,
    MethodSelection,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Request,
    ServerConnection,
    State,
    UserPassReply,
    UserPassRequest,
)

AUTH = GssapiMessageType.AUTHENTICATION
TARGET = Address.of("example.com", 80)
BOUND = Address.of("10.0.0.1", 40000)
PEER = Address.of("::1", 5555)
FAIL_REPLY = b"\x05%c\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def deliver(conn: Any, data: bytes, bytewise: bool) -> list[Any]:
    """Feed ``data`` to ``conn`` (at once or byte by byte) and collect the messages it yields.

    Byte by byte, every byte but the last must leave the connection at NEED_DATA when ``data`` is
    a single message; in general no message may appear before the bytes that complete it.
    """
    events: list[Any] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            assert event is not CONNECTION_CLOSED
            events.append(event)
    return events


def transfer(sender: Any, receiver: Any, message: Any, bytewise: bool) -> Any:
    """``sender.send(message)`` into ``receiver``; returns the single message it yields."""
    events = deliver(receiver, sender.send(message), bytewise)
    assert events == [message]
    return events[0]


def handshake_to_request(method: int = AuthMethod.NO_AUTH) -> tuple[ClientConnection, Any]:
    client, server = ClientConnection(), ServerConnection()
    transfer(client, server, Greeting((method,)), False)
    transfer(server, client, MethodSelection(method), False)
    if method == AuthMethod.USERNAME_PASSWORD:
        transfer(client, server, UserPassRequest(b"u", b"p"), False)
        transfer(server, client, UserPassReply(0), False)
    assert client.state is server.state is State.REQUEST
    return client, server


# --- whole sessions -------------------------------------------------------------------------------


def test_no_auth_session(bytewise: bool) -> None:
    client, server = ClientConnection(), ServerConnection()
    assert client.state is server.state is State.GREETING
    assert client.next_event() is NEED_DATA  # the client speaks first
    assert server.next_event() is NEED_DATA

    wire = client.send(Greeting((AuthMethod.NO_AUTH,)))
    assert wire == b"\x05\x01\x00"
    assert client.state is State.METHOD
    assert deliver(server, wire, bytewise) == [Greeting((0,))]
    assert server.state is State.METHOD
    assert server.offered == (0,)
    assert server.next_event() is NEED_DATA  # the server must answer first

    selection = server.choose_method((AuthMethod.USERNAME_PASSWORD, AuthMethod.NO_AUTH))
    assert selection == MethodSelection(AuthMethod.NO_AUTH)
    wire = server.send(selection)
    assert wire == b"\x05\x00"
    assert server.state is State.REQUEST
    assert server.method == AuthMethod.NO_AUTH
    assert deliver(client, wire, bytewise) == [selection]
    assert client.state is State.REQUEST
    assert client.method == AuthMethod.NO_AUTH

    request = Request(Command.CONNECT, TARGET)
    wire = client.send(request)
    assert wire == b"\x05\x01\x00\x03\x0bexample.com\x00\x50"
    assert client.state is State.REPLY
    assert deliver(server, wire, bytewise) == [request]
    assert server.state is State.REPLY
    assert server.command is Command.CONNECT

    reply = Reply(ReplyCode.SUCCEEDED, BOUND)
    wire = server.send(reply)
    assert wire == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x9c\x40"
    assert server.state is State.ESTABLISHED
    assert deliver(client, wire + b"HTTP/1.1 200 OK\r\n", bytewise) == [reply]
    assert client.state is State.ESTABLISHED
    assert client.next_event() is NEED_DATA
    assert client.buffered == 17
    assert client.trailing_data() == b"HTTP/1.1 200 OK\r\n"
    assert client.trailing_data() == b""
    assert client.buffered == 0

    deliver(server, b"GET / HTTP/1.1\r\n", bytewise)
    assert server.trailing_data() == b"GET / HTTP/1.1\r\n"


def test_userpass_session(bytewise: bool) -> None:
    client, server = ClientConnection(), ServerConnection()
    greeting = Greeting((AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD))
    assert client.send(greeting) == b"\x05\x02\x00\x02"
    deliver(server, greeting.to_bytes(), bytewise)
    assert server.offered == (0, 2)

    selection = server.choose_method((AuthMethod.USERNAME_PASSWORD, AuthMethod.NO_AUTH))
    assert selection.method == AuthMethod.USERNAME_PASSWORD
    transfer(server, client, selection, bytewise)
    assert server.state is State.AUTH_USERPASS
    assert client.state is State.AUTH_USERPASS
    assert client.next_event() is NEED_DATA  # the client must send its credentials

    credentials = UserPassRequest(b"alice", b"\x00s\xc3\xa9cret")
    wire = client.send(credentials)
    assert wire == b"\x01\x05alice\x08\x00s\xc3\xa9cret"
    assert client.state is State.AUTH_USERPASS_REPLY
    assert deliver(server, wire, bytewise) == [credentials]
    assert server.state is State.AUTH_USERPASS_REPLY
    assert server.next_event() is NEED_DATA

    wire = server.send(UserPassReply(0))
    assert wire == b"\x01\x00"
    assert server.state is State.REQUEST
    assert deliver(client, wire, bytewise) == [UserPassReply(0)]
    assert client.state is State.REQUEST

    transfer(client, server, Request(Command.CONNECT, Address.of("2001:db8::1", 443)), bytewise)
    transfer(server, client, Reply(ReplyCode.SUCCEEDED, PEER), bytewise)
    assert client.state is server.state is State.ESTABLISHED
    assert client.method == server.method == AuthMethod.USERNAME_PASSWORD


def test_udp_associate_session(bytewise: bool) -> None:
    client, server = handshake_to_request()
    transfer(client, server, Request(Command.UDP_ASSOCIATE, Address.unspecified()), bytewise)
    assert server.command is Command.UDP_ASSOCIATE
    transfer(server, client, Reply(ReplyCode.SUCCEEDED, BOUND), bytewise)
    assert client.state is server.state is State.ESTABLISHED


def test_pipelined_client_handshake(bytewise: bool) -> None:
    """Greeting + RFC 1929 request + request + first payload bytes in one write."""
    greeting = Greeting((AuthMethod.USERNAME_PASSWORD,))
    credentials = UserPassRequest(b"bob", b"pw")
    request = Request(Command.CONNECT, TARGET)
    payload = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    wire = greeting.to_bytes() + credentials.to_bytes() + request.to_bytes() + payload

    server = ServerConnection()
    if bytewise:
        for i in range(len(wire)):
            server.receive_data(wire[i : i + 1])
    else:
        server.receive_data(wire)
    assert server.buffered == len(wire)

    assert server.next_event() == greeting
    assert server.next_event() is NEED_DATA  # the rest waits for the selection
    assert server.buffered == len(wire) - 3
    server.send(MethodSelection(AuthMethod.USERNAME_PASSWORD))
    assert server.next_event() == credentials
    assert server.next_event() is NEED_DATA
    server.send(UserPassReply(0))
    assert server.next_event() == request
    assert server.next_event() is NEED_DATA
    assert server.buffered == len(payload)
    server.send(Reply(ReplyCode.SUCCEEDED, BOUND))
    assert server.state is State.ESTABLISHED
    assert server.next_event() is NEED_DATA
    assert server.trailing_data() == payload
    assert server.buffered == 0


def test_pipelined_server_answers(bytewise: bool) -> None:
    """Selection + RFC 1929 status in one read: the client takes one message at a time."""
    client = ClientConnection()
    client.send(Greeting((AuthMethod.USERNAME_PASSWORD,)))
    wire = MethodSelection(AuthMethod.USERNAME_PASSWORD).to_bytes() + UserPassReply(0).to_bytes()
    events = []
    for chunk in [wire[i : i + 1] for i in range(len(wire))] if bytewise else [wire]:
        client.receive_data(chunk)
        while (event := client.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [MethodSelection(AuthMethod.USERNAME_PASSWORD)]
    assert client.state is State.AUTH_USERPASS
    client.send(UserPassRequest(b"u", b"p"))
    assert client.next_event() == UserPassReply(0)
    assert client.state is State.REQUEST


def test_eof_after_trailing_data() -> None:
    _, server = handshake_to_request()
    server.receive_data(Request(Command.CONNECT, TARGET).to_bytes() + b"data")
    server.receive_data(b"")
    assert server.next_event() == Request(Command.CONNECT, TARGET)
    server.send(Reply(ReplyCode.SUCCEEDED, BOUND))
    assert server.trailing_data() == b"data"


# --- BIND -----------------------------------------------------------------------------------------


def test_bind_two_replies(bytewise: bool) -> None:
    client, server = handshake_to_request()
    transfer(client, server, Request(Command.BIND, Address.of("203.0.113.5", 20)), bytewise)
    assert server.command is Command.BIND

    transfer(server, client, Reply(ReplyCode.SUCCEEDED, BOUND), bytewise)
    assert server.state is State.BIND_WAIT
    assert client.state is State.BIND_WAIT

    transfer(server, client, Reply(ReplyCode.SUCCEEDED, Address.of("203.0.113.5", 33000)), bytewise)
    assert server.state is State.ESTABLISHED
    assert client.state is State.ESTABLISHED
    with pytest.raises(LocalProtocolError):
        server.send(Reply(ReplyCode.SUCCEEDED, BOUND))


def test_bind_both_replies_in_one_read() -> None:
    client, _ = handshake_to_request()
    client.send(Request(Command.BIND, TARGET))
    first, second = Reply(ReplyCode.SUCCEEDED, BOUND), Reply(ReplyCode.SUCCEEDED, PEER)
    client.receive_data(first.to_bytes() + second.to_bytes() + b"payload")
    assert client.next_event() == first
    assert client.state is State.BIND_WAIT
    assert client.next_event() == second
    assert client.state is State.ESTABLISHED
    assert client.trailing_data() == b"payload"


@pytest.mark.parametrize("which", ["first", "second"])
def test_bind_failure(which: str, bytewise: bool) -> None:
    client, server = handshake_to_request()
    transfer(client, server, Request(Command.BIND, TARGET), bytewise)
    if which == "second":
        transfer(server, client, Reply(ReplyCode.SUCCEEDED, BOUND), bytewise)
    transfer(server, client, Reply(ReplyCode.TTL_EXPIRED), bytewise)
    assert server.state is State.CLOSED
    assert client.state is State.CLOSED


def test_connect_has_one_reply() -> None:
    client, server = handshake_to_request()
    transfer(client, server, Request(Command.CONNECT, TARGET), False)
    transfer(server, client, Reply(ReplyCode.SUCCEEDED, BOUND), False)
    assert server.state is State.ESTABLISHED
    with pytest.raises(LocalProtocolError):
        server.send(Reply(ReplyCode.SUCCEEDED, BOUND))
    # a second reply is payload for the client
    client.receive_data(Reply(ReplyCode.SUCCEEDED, BOUND).to_bytes())
    assert client.next_event() is NEED_DATA
    assert client.trailing_data() == Reply(ReplyCode.SUCCEEDED, BOUND).to_bytes()


# --- failures end in CLOSED -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [c for c in ReplyCode if c is not ReplyCode.SUCCEEDED])
def test_failure_reply_closes(code: ReplyCode, bytewise: bool) -> None:
    client, server = handshake_to_request()
    transfer(client, server, Request(Command.CONNECT, TARGET), bytewise)
    assert server.send(Reply(code)) == FAIL_REPLY % code
    assert server.state is State.CLOSED
    assert deliver(client, FAIL_REPLY % code, bytewise) == [Reply(code)]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.trailing_data()
    with pytest.raises(LocalProtocolError):
        server.trailing_data()


def test_no_acceptable_method_closes(bytewise: bool) -> None:
    client, server = ClientConnection(), ServerConnection()
    transfer(client, server, Greeting((AuthMethod.GSSAPI,)), bytewise)
    selection = server.choose_method((AuthMethod.USERNAME_PASSWORD,))
    assert selection == MethodSelection(AuthMethod.NO_ACCEPTABLE)
    assert server.send(selection) == b"\x05\xff"
    assert server.state is State.CLOSED
    assert deliver(client, b"\x05\xff", bytewise) == [selection]
    assert client.state is State.CLOSED
    assert client.method == AuthMethod.NO_ACCEPTABLE
    with pytest.raises(LocalProtocolError):
        client.send(Request(Command.CONNECT, TARGET))
    with pytest.raises(LocalProtocolError):
        server.send(Reply(ReplyCode.SUCCEEDED))


@pytest.mark.parametrize("status", [1, 2, 0xFF])
def test_auth_failure_closes(status: int, bytewise: bool) -> None:
    client, server = ClientConnection(), ServerConnection()
    transfer(client, server, Greeting((AuthMethod.USERNAME_PASSWORD,)), bytewise)
    transfer(server, client, MethodSelection(AuthMethod.USERNAME_PASSWORD), bytewise)
    transfer(client, server, UserPassRequest(b"alice", b"wrong"), bytewise)
    transfer(server, client, UserPassReply(status), bytewise)
    assert server.state is State.CLOSED
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Request(Command.CONNECT, TARGET))


def test_closed_connection_ignores_bytes() -> None:
    client, server = ClientConnection(), ServerConnection()
    transfer(client, server, Greeting((0,)), False)
    server.send(MethodSelection(AuthMethod.NO_ACCEPTABLE))
    server.receive_data(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    assert server.next_event() is NEED_DATA
    assert server.state is State.CLOSED


# --- API misuse and peer misbehaviour -------------------------------------------------------------


def test_server_selects_method_not_offered() -> None:
    server = ServerConnection()
    server.receive_data(b"\x05\x01\x00")
    server.next_event()
    with pytest.raises(LocalProtocolError, match="not offered"):
        server.send(MethodSelection(AuthMethod.USERNAME_PASSWORD))
    assert server.state is State.METHOD  # nothing changed; a valid choice still works
    assert server.send(MethodSelection(AuthMethod.NO_AUTH)) == b"\x05\x00"
    assert server.state is State.REQUEST


def test_server_may_refuse_all_methods() -> None:
    server = ServerConnection()
    server.receive_data(b"\x05\x01\x00")
    server.next_event()
    assert server.send(MethodSelection(AuthMethod.NO_ACCEPTABLE)) == b"\x05\xff"
    assert server.state is State.CLOSED


def test_server_selects_unknown_offered_method_closes() -> None:
    # A private method (0x80-0xFE) this core has no sub-negotiation for ends the handshake.
    server = ServerConnection()
    server.receive_data(b"\x05\x01\x80")
    server.next_event()
    assert server.send(MethodSelection(0x80)) == b"\x05\x80"
    assert server.state is State.CLOSED


@pytest.mark.parametrize("method", [AuthMethod.USERNAME_PASSWORD, AuthMethod.GSSAPI, 0x03, 0x80])
def test_client_receives_method_not_offered(method: int, bytewise: bool) -> None:
    client = ClientConnection()
    client.send(Greeting((AuthMethod.NO_AUTH,)))
    with pytest.raises(RemoteProtocolError, match="not offered"):
        deliver(client, bytes((5, method)), bytewise)
    assert client.state is State.CLOSED


def test_client_receives_bad_selection_version() -> None:
    client = ClientConnection()
    client.send(Greeting((AuthMethod.NO_AUTH,)))
    client.receive_data(b"\x04")
    with pytest.raises(RemoteProtocolError, match="version"):
        client.next_event()
    assert client.state is State.CLOSED


@pytest.mark.parametrize(
    ("make", "steps", "message"),
    [
        # server
        ("server", 0, MethodSelection(0)),
        ("server", 0, Reply(ReplyCode.SUCCEEDED)),
        ("server", 0, Greeting((0,))),
        ("server", 1, UserPassReply(0)),  # no-auth was chosen... before selection
        ("server", 1, Reply(ReplyCode.SUCCEEDED)),
        ("server", 1, GssapiMessage(GssapiMessageType.AUTHENTICATION, b"t")),
        ("server", 2, MethodSelection(0)),
        ("server", 2, UserPassReply(0)),
        ("server", 2, Reply(ReplyCode.SUCCEEDED)),  # before the request arrived
        ("server", 2, Request(Command.CONNECT, TARGET)),
        # client
        ("client", 0, Request(Command.CONNECT, TARGET)),
        ("client", 0, UserPassRequest(b"u", b"p")),
        ("client", 0, MethodSelection(0)),
        ("client", 1, Greeting((0,))),
        ("client", 1, Request(Command.CONNECT, TARGET)),
        ("client", 1, UserPassRequest(b"u", b"p")),
        ("client", 2, Greeting((0,))),
        ("client", 2, UserPassRequest(b"u", b"p")),
        ("client", 2, Reply(ReplyCode.SUCCEEDED)),
        ("client", 3, Request(Command.CONNECT, TARGET)),
    ],
)
def test_send_out_of_order(make: str, steps: int, message: Any) -> None:
    """steps: server 0=GREETING, 1=METHOD, 2=REQUEST; client 0=GREETING, 1=METHOD, 2=REQUEST,
    3=REPLY."""
    client, server = ClientConnection(), ServerConnection()
    if steps >= 1:
        transfer(client, server, Greeting((AuthMethod.NO_AUTH,)), False)
    if steps >= 2:
        transfer(server, client, MethodSelection(AuthMethod.NO_AUTH), False)
    if steps >= 3:
        client.send(Request(Command.CONNECT, TARGET))
    conn = server if make == "server" else client
    before = (conn.state, conn.offered, conn.command, conn.method, conn.buffered)
    with pytest.raises(LocalProtocolError, match="cannot send"):
        conn.send(message)
    assert (conn.state, conn.offered, conn.command, conn.method, conn.buffered) == before


def test_failed_client_send_changes_nothing() -> None:
    """A refused send must not alter what later messages are checked against."""
    client = ClientConnection()
    client.send(Greeting((AuthMethod.NO_AUTH,)))
    with pytest.raises(LocalProtocolError):
        client.send(Greeting((AuthMethod.USERNAME_PASSWORD,)))
    client.receive_data(b"\x05\x02")  # 0x02 was offered only by the refused greeting
    with pytest.raises(RemoteProtocolError, match="not offered"):
        client.next_event()

    client = ClientConnection()
    client.send(Greeting((AuthMethod.NO_AUTH,)))
    client.receive_data(b"\x05\x00")
    client.next_event()
    client.send(Request(Command.CONNECT, TARGET))
    with pytest.raises(LocalProtocolError):
        client.send(Request(Command.BIND, TARGET))
    assert client.command is Command.CONNECT
    client.receive_data(Reply(ReplyCode.SUCCEEDED, BOUND).to_bytes())
    client.next_event()
    assert client.state is State.ESTABLISHED  # a CONNECT, not a BIND: one reply


def test_trailing_data_before_established() -> None:
    server = ServerConnection()
    server.receive_data(b"\x05\x01\x00")
    with pytest.raises(LocalProtocolError, match="trailing"):
        server.trailing_data()
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="trailing"):
        client.trailing_data()


def test_data_after_eof_is_local_error() -> None:
    server = ServerConnection()
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"\x05")


# --- end of stream --------------------------------------------------------------------------------


def test_eof_before_greeting() -> None:
    server = ServerConnection()
    server.receive_data(b"")
    assert server.next_event() is CONNECTION_CLOSED
    assert server.state is State.CLOSED


@pytest.mark.parametrize("method", [AuthMethod.NO_AUTH, AuthMethod.USERNAME_PASSWORD])
def test_eof_between_messages(method: int) -> None:
    client, server = handshake_to_request(method)
    server.receive_data(b"")
    assert server.next_event() is CONNECTION_CLOSED
    assert server.state is State.CLOSED
    client.send(Request(Command.CONNECT, TARGET))
    client.receive_data(b"")
    assert client.next_event() is CONNECTION_CLOSED
    assert client.state is State.CLOSED


def test_eof_while_this_side_must_speak() -> None:
    # The server must select a method: the EOF is reported once the peer is expected to speak.
    server = ServerConnection()
    server.receive_data(b"\x05\x01\x00")
    server.receive_data(b"")
    assert server.next_event() == Greeting((0,))
    assert server.next_event() is NEED_DATA
    server.send(MethodSelection(0))
    assert server.next_event() is CONNECTION_CLOSED


def test_eof_client_before_selection() -> None:
    client = ClientConnection()
    client.send(Greeting((0,)))
    client.receive_data(b"")
    assert client.next_event() is CONNECTION_CLOSED
    assert client.state is State.CLOSED


@pytest.mark.parametrize(
    "partial",
    [b"\x05", b"\x05\x02\x00", b"\x05\x01\x00\x05\x01", b"\x05\x01\x00\x05\x01\x00\x03\x0bexam"],
)
def test_eof_mid_message_server(partial: bytes) -> None:
    server = ServerConnection()
    server.receive_data(partial)
    server.receive_data(b"")
    if len(partial) > 3:
        assert server.next_event() == Greeting((0,))
        server.send(MethodSelection(0))
    with pytest.raises(RemoteProtocolError, match="closed") as info:
        server.next_event()
    assert info.value.reply is None
    assert server.state is State.CLOSED
    assert server.refusal(info.value) == b""  # nobody is left to answer


@pytest.mark.parametrize(
    ("in_reply", "partial"),
    [(False, b"\x05"), (True, b"\x05"), (True, b"\x05\x00\x00\x01\x7f\x00")],
)
def test_eof_mid_message_client(in_reply: bool, partial: bytes) -> None:
    client = ClientConnection()
    client.send(Greeting((0,)))
    if in_reply:
        client.receive_data(b"\x05\x00")
        client.next_event()
        client.send(Request(Command.CONNECT, TARGET))
    client.receive_data(partial)
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        client.next_event()
    assert client.state is State.CLOSED


# --- refusal(): what a server answers a bad message with ------------------------------------------


def _server_at(state: State) -> ServerConnection:
    server = ServerConnection()
    if state is State.GREETING:
        return server
    method = AuthMethod.USERNAME_PASSWORD if state is State.AUTH_USERPASS else AuthMethod.NO_AUTH
    server.receive_data(bytes((5, 1, method)))
    server.next_event()
    server.send(MethodSelection(method))
    assert server.state is state
    return server


@pytest.mark.parametrize(
    ("state", "wire", "reply", "answer"),
    [
        (State.GREETING, b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", None, b"\x05\xff"),
        (State.GREETING, b"\x05\x00", None, b"\x05\xff"),
        (State.GREETING, b"GET / HTTP/1.1\r\n", None, b"\x05\xff"),
        (State.AUTH_USERPASS, b"\x05\x01\x00", None, b"\x01\x01"),
        (State.AUTH_USERPASS, b"\x02", None, b"\x01\x01"),
        (State.REQUEST, b"\x05\x04\x00\x01", 0x07, FAIL_REPLY % 0x07),
        (State.REQUEST, b"\x05\x00", 0x07, FAIL_REPLY % 0x07),
        (State.REQUEST, b"\x05\x01\x00\x02", 0x08, FAIL_REPLY % 0x08),
        (State.REQUEST, b"\x05\x01\x00\x05\x00", 0x08, FAIL_REPLY % 0x08),
        (State.REQUEST, b"\x05\x01\x00\x03\x0elocalhost\x00junk\x00\x50", 0x04, FAIL_REPLY % 0x04),
        (State.REQUEST, b"\x05\x01\x00\x03\x03a b\x00\x50", 0x04, FAIL_REPLY % 0x04),
        (State.REQUEST, b"\x05\x01\x00\x03\x02\xc3\xa4\x00\x50", 0x04, FAIL_REPLY % 0x04),
        (State.REQUEST, b"\x05\x01\x00\x03\x00\x00\x50", 0x04, FAIL_REPLY % 0x04),
        (State.REQUEST, b"\x04\x01\x00\x50", None, FAIL_REPLY % 0x01),
    ],
)
def test_refusal(
    state: State, wire: bytes, reply: int | None, answer: bytes, bytewise: bool
) -> None:
    server = _server_at(state)
    with pytest.raises(RemoteProtocolError) as info:
        deliver(server, wire, bytewise)
    assert info.value.reply == reply
    assert server.state is State.CLOSED
    assert server.refusal(info.value) == answer
    assert server.state is State.CLOSED


def test_refusal_bytes_parse_as_the_expected_answers() -> None:
    assert MethodSelection.parse(b"\x05\xff") == (MethodSelection(AuthMethod.NO_ACCEPTABLE), 2)
    assert UserPassReply.parse(b"\x01\x01") == (UserPassReply(1), 2)
    assert Reply.parse(FAIL_REPLY % 0x07) == (Reply(ReplyCode.COMMAND_NOT_SUPPORTED), 10)


def test_refusal_in_gssapi_is_the_abort_message() -> None:
    """RFC 1961 s. 3.8: a server refusing the client for any reason answers 01 FF."""
    server = ServerConnection()
    server.receive_data(b"\x05\x01\x01")
    server.next_event()
    server.send(MethodSelection(AuthMethod.GSSAPI))
    server.receive_data(b"\x01\x07\x00\x00")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert server.refusal(info.value) == b"\x01\xff"
    assert server.state is State.CLOSED


# --- GSSAPI: a sub-negotiation of several round trips (RFC 1961) ---------------------------------


def test_gssapi_session(bytewise: bool) -> None:
    client, server = ClientConnection(), ServerConnection()
    transfer(client, server, Greeting((AuthMethod.GSSAPI, AuthMethod.NO_AUTH)), bytewise)
    selection = server.choose_method((AuthMethod.GSSAPI, AuthMethod.NO_AUTH))
    assert selection.method == AuthMethod.GSSAPI
    assert server.send(selection) == b"\x05\x01"
    assert server.state is State.AUTH_GSSAPI
    assert deliver(client, b"\x05\x01", bytewise) == [selection]
    assert client.state is State.AUTH_GSSAPI

    # security context establishment: several tokens each way
    for i in range(3):
        token = bytes([i]) * (10 + i * 100)
        message = GssapiMessage(AUTH, token)
        wire = client.send(message)
        assert wire == b"\x01\x01" + len(token).to_bytes(2, "big") + token
        assert deliver(server, wire, bytewise) == [message]
        assert server.state is State.AUTH_GSSAPI
        transfer(server, client, GssapiMessage(AUTH, b"server-" + token), bytewise)
        assert client.state is State.AUTH_GSSAPI
    # protection-level negotiation (RFC 1961 s. 4)
    transfer(client, server, GssapiMessage(GssapiMessageType.PROTECTION, b"\x01"), bytewise)
    transfer(server, client, GssapiMessage(GssapiMessageType.PROTECTION, b"\x01"), bytewise)

    server.authentication_done()
    client.authentication_done()
    assert server.state is State.REQUEST
    assert client.state is State.REQUEST
    transfer(client, server, Request(Command.CONNECT, TARGET), bytewise)
    transfer(server, client, Reply(ReplyCode.SUCCEEDED, BOUND), bytewise)
    assert client.state is server.state is State.ESTABLISHED
    assert client.method == server.method == AuthMethod.GSSAPI


def test_gssapi_pipelined_token_and_abort() -> None:
    server = ServerConnection()
    token = GssapiMessage(AUTH, b"initial")
    abort = GssapiMessage(GssapiMessageType.ABORT)
    server.receive_data(b"\x05\x01\x01" + token.to_bytes() + abort.to_bytes())
    assert server.next_event() == Greeting((AuthMethod.GSSAPI,))
    assert server.next_event() is NEED_DATA
    server.send(MethodSelection(AuthMethod.GSSAPI))
    assert server.next_event() == token
    assert server.next_event() == abort
    assert server.next_event() is NEED_DATA
    assert server.buffered == 0


def test_authentication_done_outside_gssapi() -> None:
    for conn in (ServerConnection(), ClientConnection()):
        with pytest.raises(LocalProtocolError, match="sub-negotiation"):
            conn.authentication_done()
    client, server = handshake_to_request(AuthMethod.USERNAME_PASSWORD)
    with pytest.raises(LocalProtocolError):
        server.authentication_done()
    with pytest.raises(LocalProtocolError):
        client.authentication_done()


def test_gssapi_message_outside_gssapi() -> None:
    client, server = handshake_to_request()
    with pytest.raises(LocalProtocolError):
        client.send(GssapiMessage(AUTH, b"t"))
    with pytest.raises(LocalProtocolError):
        server.send(GssapiMessage(AUTH, b"t"))
