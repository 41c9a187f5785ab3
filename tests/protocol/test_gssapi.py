"""RFC 1961 without Kerberos: the encapsulation codec and both sub-negotiations, byte-exact.

``ToyContext`` stands in for a GSS-API security context: its tokens carry a sequence number and an
HMAC, and "encryption" is an XOR keystream, so tampering, replay, reordering and an unencrypted
message at level 2 are all detectable as with Kerberos. The real mechanism is tested end to end in
tests/e2e/test_gssapi.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.protocol import (
    Address,
    AuthMethod,
    ClientConnection,
    Command,
    Greeting,
    GssapiClientNegotiation,
    GssapiEncapsulation,
    GssapiError,
    GssapiMessage,
    GssapiMessageType,
    GssapiOutOfSequence,
    GssapiServerNegotiation,
    LevelAgreed,
    LocalProtocolError,
    MechanismStep,
    ProtectionLevel,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Request,
    ServerConnection,
    State,
)
from socksd.protocol.gssapi import (
    ABORT,
    MAX_TOKEN,
    NegotiationState,
    choose_level,
    levels_at_least,
    parse_levels,
)

I, C, S = ProtectionLevel.INTEGRITY, ProtectionLevel.CONFIDENTIALITY, ProtectionLevel.SELECTIVE  # noqa: E741
AUTH = GssapiMessageType.AUTHENTICATION
PROT = GssapiMessageType.PROTECTION
TARGET = Address.of("example.com", 443)


class ToyContext:
    """One end of a toy security context: ``wrap``/``unwrap`` with the GSS-API's checks."""

    def __init__(self, key: bytes, send_label: bytes, receive_label: bytes) -> None:
        self.key = key
        self.send_label, self.receive_label = send_label, receive_label
        self.sent = 0
        self.expected = 0

    def _stream(self, seq: int, n: int) -> bytes:
        out = b""
        block = 0
        while len(out) < n:
            out += hashlib.sha256(self.key + struct.pack("!QQ", seq, block)).digest()
            block += 1
        return out[:n]

    def wrap(self, data: bytes, conf: bool) -> bytes:
        seq = self.sent
        self.sent += 1
        body = (
            bytes(a ^ b for a, b in zip(data, self._stream(seq, len(data)), strict=True))
            if conf
            else data
        )
        head = self.send_label + struct.pack("!QB", seq, conf)
        mac = hmac.new(self.key, head + body, hashlib.sha256).digest()[:12]
        return head + body + mac

    def unwrap(self, token: bytes) -> tuple[bytes, bool]:
        n = len(self.receive_label)
        if len(token) < n + 9 + 12 or token[:n] != self.receive_label:
            raise GssapiError("malformed token")
        head, body, mac = token[: n + 9], token[n + 9 : -12], token[-12:]
        if not hmac.compare_digest(
            mac, hmac.new(self.key, head + body, hashlib.sha256).digest()[:12]
        ):
            raise GssapiError("bad MIC")
        seq, conf = struct.unpack("!QB", head[n:])
        if seq < self.expected:
            raise GssapiError("duplicate or old token")
        if seq > self.expected:
            raise GssapiError("token out of sequence (gap)")
        self.expected += 1
        data = (
            bytes(a ^ b for a, b in zip(body, self._stream(seq, len(body)), strict=True))
            if conf
            else body
        )
        return data, bool(conf)


def toy_pair(key: bytes = b"k" * 16) -> tuple[ToyContext, ToyContext]:
    """(initiator, acceptor) ends of one context."""
    return ToyContext(key, b"I", b"A"), ToyContext(key, b"A", b"I")


def plain_wrap(data: bytes, conf: bool) -> bytes:
    """A transparent "mechanism" for byte-exact framing tests: C/I marker + data."""
    return (b"C" if conf else b"I") + data


def plain_unwrap(token: bytes) -> tuple[bytes, bool]:
    if not token or token[:1] not in b"CI":
        raise GssapiError("bad token")
    return token[1:], token[:1] == b"C"


def codec(level: ProtectionLevel = I, max_payload: int = 1000) -> GssapiEncapsulation:
    return GssapiEncapsulation(level, plain_wrap, plain_unwrap, max_payload)


def feed(c: GssapiEncapsulation, data: bytes, bytewise: bool) -> bytes:
    out = b""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        c.receive_data(chunk)
        out += c.read()
    return out


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


# -- the encapsulation codec ---------------------------------------------------------------------


def test_encode_is_rfc1961_framing() -> None:
    assert codec(I).encode(b"abc") == b"\x01\x03\x00\x04Iabc"
    assert codec(C).encode(b"abc") == b"\x01\x03\x00\x04Cabc"
    assert codec(S).encode(b"abc") == b"\x01\x03\x00\x04Cabc"  # socksd encrypts at level 3
    assert codec(S).encode(b"abc", confidential=False) == b"\x01\x03\x00\x04Iabc"
    assert codec(I).encode(b"") == b""


def test_encode_chunks_to_max_payload() -> None:
    assert codec(I, max_payload=3).encode(b"abcdefg") == (
        b"\x01\x03\x00\x04Iabc" + b"\x01\x03\x00\x04Idef" + b"\x01\x03\x00\x02Ig"
    )


def test_encode_token_length_is_big_endian() -> None:
    data = bytes(range(256)) * 2
    frame = codec(I).encode(data)
    assert frame[:4] == b"\x01\x03\x02\x01"
    assert frame[4:] == b"I" + data


def test_conf_flag_is_fixed_at_levels_1_and_2() -> None:
    with pytest.raises(LocalProtocolError, match="level 1"):
        codec(I).encode(b"x", confidential=True)
    with pytest.raises(LocalProtocolError, match="level 2"):
        codec(C).encode(b"x", confidential=False)


def test_oversized_token_is_refused() -> None:
    big = GssapiEncapsulation(I, lambda d, c: d + b"x" * 100, plain_unwrap, MAX_TOKEN)
    with pytest.raises(LocalProtocolError, match="lower max_payload"):
        big.encode(b"a" * MAX_TOKEN)


def test_max_payload_bounds() -> None:
    with pytest.raises(ValueError, match="max_payload"):
        GssapiEncapsulation(I, plain_wrap, plain_unwrap, 0)
    with pytest.raises(ValueError, match="max_payload"):
        GssapiEncapsulation(I, plain_wrap, plain_unwrap, MAX_TOKEN + 1)


def test_read_frames(bytewise: bool) -> None:
    c = codec(I)
    wire = b"\x01\x03\x00\x03Iab" + b"\x01\x03\x00\x01I" + b"\x01\x03\x00\x04Ixyz"
    assert feed(c, wire, bytewise) == b"abxyz"
    assert c.buffered == 0


def test_read_keeps_a_partial_frame() -> None:
    c = codec(I)
    c.receive_data(b"\x01\x03\x00\x04Ia")
    assert c.read() == b""
    assert c.buffered == 6
    c.receive_data(b"bc\x01")
    assert c.read() == b"abc"
    assert c.buffered == 1


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x05\x03\x00\x01I", "version 0x05"),
        (b"\x01\xff", "aborted"),
        (b"\x01\x01\x00\x01I", "type 0x01"),
        (b"\x01\x02\x00\x01I", "type 0x02"),
        (b"\x01\x03\x00\x01X", "bad token"),
        (b"\x01\x03\x00\x00", "bad token"),
    ],
)
def test_read_rejects(wire: bytes, match: str) -> None:
    c = codec(I)
    c.receive_data(wire)
    with pytest.raises(GssapiError, match=match):
        c.read()
    with pytest.raises(GssapiError, match=match):  # and stays failed
        c.read()


def test_good_frames_before_a_bad_one_are_delivered_first() -> None:
    c = codec(I)
    c.receive_data(b"\x01\x03\x00\x03Iok" + b"\x01\x03\x00\x02Xx")
    assert c.read() == b"ok"
    assert c.buffered > 0
    with pytest.raises(GssapiError):
        c.read()


def test_level_2_refuses_unencrypted_messages() -> None:
    c = codec(C)
    c.receive_data(b"\x01\x03\x00\x02Ca" + b"\x01\x03\x00\x02Ib")
    assert c.read() == b"a"
    with pytest.raises(GssapiError, match="unencrypted"):
        c.read()


def test_levels_1_and_3_take_either_kind() -> None:
    for level in (I, S):
        c = codec(level)
        c.receive_data(b"\x01\x03\x00\x02Ca" + b"\x01\x03\x00\x02Ib")
        assert c.read() == b"ab"


def test_datagrams() -> None:
    c = codec(C, max_payload=10)
    assert c.encode_datagram(b"hello") == b"\x01\x03\x00\x06Chello"
    assert c.decode_datagram(b"\x01\x03\x00\x06Chello") == b"hello"
    with pytest.raises(ValueError, match="does not fit"):
        c.encode_datagram(b"x" * 11)
    for bad, match in [
        (b"\x01\x03\x00", "shorter"),
        (b"\x01\x03\x00\x07Chello", "header says 7"),
        (b"\x01\x03\x00\x05Chello", "header says 5"),
        (b"\x01\x01\x00\x06Chello", "not an encapsulated"),
        (b"\x01\x03\x00\x06Ihello", "unencrypted"),
    ]:
        with pytest.raises(GssapiError, match=match):
            c.decode_datagram(bad)


def test_out_of_sequence_is_good_in_a_datagram_only() -> None:
    """GssapiOutOfSequence carries a verified message: a datagram delivers it, a stream fails."""

    def unwrap(token: bytes) -> tuple[bytes, bool]:
        raise GssapiOutOfSequence("gss_unwrap: out of order", token.upper(), True)

    c = GssapiEncapsulation(C, plain_wrap, unwrap, 100)
    assert c.decode_datagram(b"\x01\x03\x00\x04late") == b"LATE"
    c.receive_data(b"\x01\x03\x00\x04late")
    with pytest.raises(GssapiOutOfSequence, match="out of order"):
        c.read()

    def unwrap_plain(token: bytes) -> tuple[bytes, bool]:
        raise GssapiOutOfSequence("gss_unwrap: out of order", token, False)

    with pytest.raises(GssapiError, match="unencrypted"):  # the level still applies
        GssapiEncapsulation(C, plain_wrap, unwrap_plain, 100).decode_datagram(b"\x01\x03\x00\x01x")


def test_toy_context_detects_what_kerberos_detects() -> None:
    """The stand-in is worth testing with: tamper, replay and reordering all fail."""
    initiator, acceptor = toy_pair()
    sender = GssapiEncapsulation(C, initiator.wrap, initiator.unwrap, 100)
    receiver = GssapiEncapsulation(C, acceptor.wrap, acceptor.unwrap, 100)
    first, second = sender.encode(b"first"), sender.encode(b"second")
    receiver.receive_data(first)
    assert receiver.read() == b"first"
    for bad in (first, second[:-1] + bytes([second[-1] ^ 1])):
        r = GssapiEncapsulation(C, acceptor.wrap, acceptor.unwrap, 100)
        r.receive_data(bad)
        with pytest.raises(GssapiError):
            r.read()
    _, acceptor2 = toy_pair()
    r = GssapiEncapsulation(C, acceptor2.wrap, acceptor2.unwrap, 100)
    r.receive_data(second)  # skips "first": a gap
    with pytest.raises(GssapiError, match="sequence"):
        r.read()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.integers(min_value=1, max_value=64),
    st.data(),
    st.sampled_from([I, C, S]),
)
def test_stream_round_trip_at_any_split(
    messages: list[bytes], max_payload: int, data: st.DataObject, level: ProtectionLevel
) -> None:
    initiator, acceptor = toy_pair()
    sender = GssapiEncapsulation(level, initiator.wrap, initiator.unwrap, max_payload)
    receiver = GssapiEncapsulation(level, acceptor.wrap, acceptor.unwrap, max_payload)
    wire = b"".join(sender.encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    out = b""
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        receiver.receive_data(wire[a:b])
        out += receiver.read()
    assert out == b"".join(messages)
    assert receiver.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=20))
def test_garbage_is_refused_cleanly_and_bounded(chunks: list[bytes]) -> None:
    c = codec(S)
    for chunk in chunks:
        c.receive_data(chunk)
        try:
            c.read()
        except GssapiError:
            return
        assert c.buffered <= MAX_TOKEN + 4


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_datagram_garbage_is_refused_cleanly(datagram: bytes) -> None:
    with contextlib.suppress(GssapiError):
        codec(S).decode_datagram(datagram)


# -- protection levels ---------------------------------------------------------------------------


def test_choose_level() -> None:
    assert choose_level(1, {I, C, S}) is I
    assert choose_level(3, {I, C, S}) is S
    assert choose_level(1, {C}) is C
    assert choose_level(2, {I}) is I
    assert choose_level(2, {I, S}) is S
    assert choose_level(0, {I, C}) is C  # Dante's "clear", outside the RFC
    assert choose_level(0xFF, {I}) is I
    with pytest.raises(ValueError, match="no protection level"):
        choose_level(1, set())


def test_levels_at_least() -> None:
    assert levels_at_least(I) == {I, S, C}
    assert levels_at_least(S) == {S, C}
    assert levels_at_least(C) == {C}


def test_parse_levels() -> None:
    assert parse_levels("1,2,3") == (I, C, S)
    assert parse_levels(" 2 , 2,1") == (C, I)
    for bad in ("", "0", "4", "1,,2", "one"):
        with pytest.raises(ValueError, match="not a protection level"):
            parse_levels(bad)


# -- the sub-negotiation ---------------------------------------------------------------------


class ToyMechanism:
    """Context establishment of ``legs`` tokens in all (Kerberos with mutual auth: 2, without: 1)."""

    def __init__(self, legs: int) -> None:
        self.legs = legs
        self.initiator, self.acceptor = toy_pair()
        self.seen = 0

    def init_step(self, token: bytes) -> tuple[bytes, bool]:
        self.seen += 1
        leg = 2 * self.seen - 1  # legs sent by the initiator: 1, 3, 5...
        return (b"init-%d" % leg, leg >= self.legs) if leg <= self.legs else (b"", True)

    def accept_step(self, token: bytes) -> tuple[bytes, bool]:
        leg = int(token.split(b"-")[1]) + 1
        return (b"accept-%d" % leg if leg <= self.legs else b""), leg >= self.legs


def negotiate(
    legs: int,
    client_level: ProtectionLevel,
    server_levels: set[ProtectionLevel],
    accepted: set[ProtectionLevel] | None = None,
) -> tuple[GssapiClientNegotiation, GssapiServerNegotiation, list[GssapiMessage]]:
    """Run both negotiations against each other; returns them and every message sent."""
    mech = ToyMechanism(legs)
    client = GssapiClientNegotiation(
        mech.initiator.wrap, mech.initiator.unwrap, client_level, accepted
    )
    server = GssapiServerNegotiation(mech.acceptor.wrap, mech.acceptor.unwrap, server_levels)
    wire: list[GssapiMessage] = []
    out = client.context_step(*mech.init_step(b""))
    while True:
        wire.append(out)
        step = server.receive(out)
        if isinstance(step, MechanismStep):
            reply = server.context_step(*mech.accept_step(step.token))
        else:
            assert isinstance(step, LevelAgreed) and step.reply is not None
            reply = step.reply
        wire.append(reply)
        answer = client.receive(reply)
        if isinstance(answer, LevelAgreed):
            return client, server, wire
        if isinstance(answer, MechanismStep):
            out = client.context_step(*mech.init_step(answer.token))
        else:
            out = answer


@pytest.mark.parametrize("legs", [1, 2, 3, 4])
def test_negotiation_round_trips(legs: int) -> None:
    client, server, wire = negotiate(legs, C, {I, C, S})
    assert client.state is server.state is NegotiationState.DONE
    assert client.level is server.level is C
    kinds = [m.mtyp for m in wire]
    assert kinds[-2:] == [PROT, PROT]
    assert all(k == AUTH for k in kinds[:-2])
    # the server answers every client token; a complete context with no more to say: empty token
    assert len(kinds) - 2 == 2 * ((legs + 1) // 2)
    if legs % 2:
        assert wire[-3] == GssapiMessage(AUTH, b"")


def test_level_messages_are_wrapped_without_confidentiality() -> None:
    _, _, wire = negotiate(2, C, {C})
    request, answer = wire[-2], wire[-1]
    initiator, acceptor = toy_pair()  # fresh ends: the level messages are each side's first
    assert acceptor.unwrap(request.token) == (b"\x02", False)
    assert initiator.unwrap(answer.token) == (b"\x02", False)


@pytest.mark.parametrize(
    ("asked", "server_levels", "agreed"),
    [(I, {I, C, S}, I), (S, {I, C, S}, S), (I, {C}, C), (S, {C, I}, C), (I, {S}, S)],
)
def test_server_level_choice_accepted_by_client(
    asked: ProtectionLevel, server_levels: set[ProtectionLevel], agreed: ProtectionLevel
) -> None:
    client, server, _ = negotiate(2, asked, server_levels)
    assert client.level is server.level is agreed
    assert server.requested == asked


def test_client_closes_on_a_weaker_level() -> None:
    with pytest.raises(GssapiError, match="chose protection level 1"):
        negotiate(2, C, {I})


def test_client_accepted_levels_are_explicit() -> None:
    client, _, _ = negotiate(2, I, {C, I}, accepted={I})
    assert client.level is I
    with pytest.raises(GssapiError, match="accepted: 1"):
        negotiate(2, I, {C}, accepted={I})
    with pytest.raises(ValueError, match="among the accepted"):
        GssapiClientNegotiation(plain_wrap, plain_unwrap, C, {I})


def test_dante_clear_level_gets_the_strongest_accepted() -> None:
    initiator, acceptor = toy_pair()
    server = GssapiServerNegotiation(acceptor.wrap, acceptor.unwrap, {I, S})
    server.receive(GssapiMessage(AUTH, b"t"))
    server.context_step(b"", True)
    agreed = server.receive(GssapiMessage(PROT, initiator.wrap(b"\x00", False)))
    assert isinstance(agreed, LevelAgreed) and agreed.level is S
    assert server.requested == 0
    assert agreed.reply is not None and initiator.unwrap(agreed.reply.token) == (b"\x03", False)


def _server_at(state: str) -> tuple[GssapiServerNegotiation, ToyContext]:
    initiator, acceptor = toy_pair()
    server = GssapiServerNegotiation(acceptor.wrap, acceptor.unwrap)
    if state == "protection":
        server.receive(GssapiMessage(AUTH, b"t"))
        server.context_step(b"out", True)
    return server, initiator


@pytest.mark.parametrize(
    ("state", "message", "match"),
    [
        ("context", GssapiMessage(GssapiMessageType.ABORT), "aborted"),
        ("context", GssapiMessage(PROT, b"x"), "type 0x02 where 0x01"),
        ("context", GssapiMessage(GssapiMessageType.ENCAPSULATION, b"x"), "type 0x03"),
        ("protection", GssapiMessage(AUTH, b"x"), "type 0x01 where 0x02"),
        ("protection", GssapiMessage(PROT, b"garbage"), "protection-level message"),
        ("protection", GssapiMessage(GssapiMessageType.ABORT), "aborted"),
    ],
)
def test_server_refuses(state: str, message: GssapiMessage, match: str) -> None:
    server, _ = _server_at(state)
    with pytest.raises(GssapiError, match=match):
        server.receive(message)
    assert server.state is NegotiationState.FAILED
    assert server.abort() == GssapiMessage(GssapiMessageType.ABORT)
    assert server.abort().to_bytes() == ABORT == b"\x01\xff"


def test_server_refuses_a_long_level_message() -> None:
    server, initiator = _server_at("protection")
    with pytest.raises(GssapiError, match="holds 2 bytes"):
        server.receive(GssapiMessage(PROT, initiator.wrap(b"\x01\x02", False)))


def test_server_limits_round_trips() -> None:
    server = GssapiServerNegotiation(plain_wrap, plain_unwrap, max_round_trips=3)
    for _ in range(3):
        server.receive(GssapiMessage(AUTH, b"more"))
        server.context_step(b"again", False)
    with pytest.raises(GssapiError, match="3 round trips"):
        server.receive(GssapiMessage(AUTH, b"more"))


def test_server_without_confidentiality_keeps_level_1_only() -> None:
    server = GssapiServerNegotiation(plain_wrap, plain_unwrap, {I, C})
    server.receive(GssapiMessage(AUTH, b"t"))
    server.context_step(b"", True, confidentiality=False)
    agreed = server.receive(GssapiMessage(PROT, plain_wrap(b"\x02", False)))
    assert isinstance(agreed, LevelAgreed) and agreed.level is I
    server = GssapiServerNegotiation(plain_wrap, plain_unwrap, {C})
    server.receive(GssapiMessage(AUTH, b"t"))
    with pytest.raises(GssapiError, match="cannot encrypt"):
        server.context_step(b"", True, confidentiality=False)


def test_misuse_is_a_local_error() -> None:
    server = GssapiServerNegotiation(plain_wrap, plain_unwrap)
    with pytest.raises(LocalProtocolError):
        server.context_step(b"x", True)  # no step due
    with pytest.raises(LocalProtocolError):
        server.encapsulation()
    server.receive(GssapiMessage(AUTH, b"t"))
    with pytest.raises(LocalProtocolError):
        server.receive(GssapiMessage(AUTH, b"t"))  # a step is due first
    with pytest.raises(GssapiError, match="no token"):
        server.context_step(b"", False)
    with pytest.raises(ValueError, match="at least one"):
        GssapiServerNegotiation(plain_wrap, plain_unwrap, set())
    client = GssapiClientNegotiation(plain_wrap, plain_unwrap)
    with pytest.raises(LocalProtocolError):
        client.receive(GssapiMessage(AUTH, b"t"))
    with pytest.raises(GssapiError, match="no token"):
        client.context_step(b"", False)


def test_client_refuses_a_token_after_completion() -> None:
    client = GssapiClientNegotiation(plain_wrap, plain_unwrap)
    client.context_step(b"ap-req", True)  # complete at once (no mutual authentication)
    with pytest.raises(GssapiError, match="after the context was done"):
        client.receive(GssapiMessage(AUTH, b"unexpected"))


def test_client_sees_the_server_abort() -> None:
    client = GssapiClientNegotiation(plain_wrap, plain_unwrap)
    client.context_step(b"ap-req", False)
    with pytest.raises(GssapiError, match="aborted"):
        client.receive(GssapiMessage(GssapiMessageType.ABORT))


# -- the state machines with encapsulation ---------------------------------------------------------


def _to_gssapi(conn: Any, server: bool) -> None:
    if server:
        conn.receive_data(Greeting((AuthMethod.GSSAPI,)).to_bytes())
        conn.next_event()
        conn.send(conn.choose_method((AuthMethod.GSSAPI,)))
    else:
        conn.send(Greeting((AuthMethod.GSSAPI,)))
        conn.receive_data(b"\x05\x01")
        conn.next_event()
    assert conn.state is State.AUTH_GSSAPI


def encapsulated_pair(level: ProtectionLevel = C) -> tuple[ClientConnection, ServerConnection]:
    initiator, acceptor = toy_pair()
    client, server = ClientConnection(), ServerConnection()
    _to_gssapi(client, False)
    _to_gssapi(server, True)
    client.authentication_done(GssapiEncapsulation(level, initiator.wrap, initiator.unwrap, 50))
    server.authentication_done(GssapiEncapsulation(level, acceptor.wrap, acceptor.unwrap, 50))
    return client, server


def test_request_and_reply_are_encapsulated(bytewise: bool) -> None:
    client, server = encapsulated_pair()
    request = Request(Command.CONNECT, TARGET)
    wire = client.send(request) + client.encapsulation.encode(b"payload!")  # type: ignore[union-attr]
    assert wire[:2] == b"\x01\x03" and request.to_bytes() not in wire
    events = []
    for chunk in [wire[i : i + 1] for i in range(len(wire))] if bytewise else [wire]:
        server.receive_data(chunk)
        if (event := server.next_event()) is not None and isinstance(event, Request):
            events.append(event)
    assert events == [request]
    reply = Reply(ReplyCode.SUCCEEDED, Address.of("10.1.2.3", 4567))
    out = server.send(reply)
    assert out[:2] == b"\x01\x03" and reply.to_bytes() not in out
    # decoded with the request, or left in the codec for the relay: nothing is lost
    assert server.trailing_data() + server.encapsulation.read() == b"payload!"  # type: ignore[union-attr]
    client.receive_data(out)
    assert client.next_event() == reply
    assert client.state is server.state is State.ESTABLISHED


def test_frames_buffered_before_authentication_done_are_decoded() -> None:
    initiator, acceptor = toy_pair()
    server = ServerConnection()
    _to_gssapi(server, True)
    sender = GssapiEncapsulation(C, initiator.wrap, initiator.unwrap)
    server.receive_data(GssapiMessage(AUTH, b"tok").to_bytes())
    server.receive_data(sender.encode(Request(Command.CONNECT, TARGET).to_bytes() + b"early"))
    assert server.next_event() == GssapiMessage(AUTH, b"tok")
    server.authentication_done(GssapiEncapsulation(C, acceptor.wrap, acceptor.unwrap))
    assert server.next_event() == Request(Command.CONNECT, TARGET)
    server.send(Reply(ReplyCode.SUCCEEDED))
    assert server.trailing_data() == b"early"


def test_tampered_request_gets_the_abort_message() -> None:
    client, server = encapsulated_pair()
    wire = bytearray(client.send(Request(Command.CONNECT, TARGET)))
    wire[-1] ^= 0x01
    server.receive_data(bytes(wire))
    with pytest.raises(GssapiError, match="bad MIC") as info:
        server.next_event()
    assert server.refusal(info.value) == b"\x01\xff"
    assert server.state is State.CLOSED


def test_bad_request_gets_an_encapsulated_reply() -> None:
    client, server = encapsulated_pair()
    server.receive_data(client.encapsulation.encode(b"\x05\x09\x00\x01" + bytes(6)))  # type: ignore[union-attr]
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    answer = server.refusal(info.value)
    assert answer[:2] == b"\x01\x03"
    client.encapsulation.receive_data(answer)  # type: ignore[union-attr]
    assert client.encapsulation.read() == Reply(ReplyCode.COMMAND_NOT_SUPPORTED).to_bytes()  # type: ignore[union-attr]


def test_eof_in_the_middle_of_a_frame() -> None:
    client, server = encapsulated_pair()
    wire = client.send(Request(Command.CONNECT, TARGET))
    server.receive_data(wire[:-3])
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle of a message"):
        server.next_event()


def test_sending_abort_closes_the_connection() -> None:
    for conn, is_server in ((ServerConnection(), True), (ClientConnection(), False)):
        _to_gssapi(conn, is_server)
        assert conn.send(GssapiMessage(GssapiMessageType.ABORT)) == b"\x01\xff"
        assert conn.state is State.CLOSED
