"""The reply codecs of SOCKS4 and HTTP CONNECT sessions: one SOCKS5-terms outcome in, the bytes
each protocol's client gets out (``socksd.server.handshake.socks4`` and ``.http``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from socksd.protocol import Address, Command, Reply, ReplyCode, State
from socksd.protocol.socks4 import Socks4Request
from socksd.server.handshake.admission import Refusal
from socksd.server.handshake.http import HttpCodec
from socksd.server.handshake.socks4 import Socks4Codec

HEAD = b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n"


def fake_session(refused_by: Refusal | None = None) -> Any:
    return SimpleNamespace(refused_by=refused_by, record=SimpleNamespace(client="127.0.0.1:1"))


def http_codec(session: Any, early: bytes = b"") -> HttpCodec:
    codec = HttpCodec(session)
    codec.reader.receive_data(HEAD + early)
    codec.reader.next_event()
    codec.state = State.REPLY
    return codec


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ReplyCode.GENERAL_FAILURE, b"502"),
        (ReplyCode.NOT_ALLOWED, b"403"),
        (ReplyCode.HOST_UNREACHABLE, b"502"),
        (ReplyCode.CONNECTION_REFUSED, b"502"),
        (ReplyCode.TTL_EXPIRED, b"504"),
        (ReplyCode.COMMAND_NOT_SUPPORTED, b"405"),
    ],
)
def test_http_failures(code: ReplyCode, status: bytes) -> None:
    codec = http_codec(fake_session())
    assert codec.send(Reply(code)).startswith(b"HTTP/1.1 " + status + b" ")
    assert codec.state is State.CLOSED


def test_http_limit_refusal_is_503() -> None:
    refusal = Refusal(ReplyCode.GENERAL_FAILURE, "limit", limit="max_sessions_per_user")
    codec = http_codec(fake_session(refusal))
    assert codec.send(Reply(ReplyCode.GENERAL_FAILURE)).startswith(b"HTTP/1.1 503 ")


def test_http_success_then_every_early_byte_in_order() -> None:
    codec = http_codec(fake_session(), early=b"hello ")
    codec.receive_data(b"world")
    assert codec.buffered == 5
    bound = Address.of("127.0.0.1", 4000)
    assert codec.send(Reply(ReplyCode.SUCCEEDED, bound)) == (
        b"HTTP/1.1 200 Connection established\r\n\r\n"
    )
    assert codec.state is State.ESTABLISHED
    assert codec.trailing_data() == b"hello world"
    assert codec.trailing_data() == b""


def socks4_codec(command: Command) -> Socks4Codec:
    codec = Socks4Codec(fake_session())
    codec.receive_data(Socks4Request(command, Address.of("192.0.2.1", 80)).to_bytes() + b"early")
    codec.conn.next_event()
    return codec


def test_socks4_connect_replies() -> None:
    codec = socks4_codec(Command.CONNECT)
    reply = codec.send(Reply(ReplyCode.SUCCEEDED, Address.of("127.0.0.1", 4000)))
    assert reply == b"\x00\x5a\x0f\xa0\x7f\x00\x00\x01"
    assert codec.trailing_data() == b"early"
    failed = socks4_codec(Command.CONNECT)
    assert failed.send(Reply(ReplyCode.CONNECTION_REFUSED)) == b"\x00\x5b" + b"\0" * 6


def test_socks4_bind_two_replies() -> None:
    codec = socks4_codec(Command.BIND)
    assert codec.send(Reply(ReplyCode.SUCCEEDED, Address.of("127.0.0.1", 4000)))[1] == 90
    assert codec.state is State.BIND_WAIT
    peer = codec.send(Reply(ReplyCode.SUCCEEDED, Address.of("::ffff:192.0.2.9", 5000)))
    assert peer == b"\x00\x5a\x13\x88\xc0\x00\x02\x09"  # the mapped address, unmapped
    assert codec.state is State.ESTABLISHED
