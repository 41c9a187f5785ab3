"""The session's GSSAPI driver when the mechanism misbehaves (cannot be provoked with a real KDC)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from socksd.accesslog import SessionRecord
from socksd.config import Config
from socksd.protocol import (
    AuthMethod,
    Greeting,
    GssapiError,
    GssapiMessage,
    GssapiMessageType,
    ServerConnection,
    State,
)
from socksd.server.gssapi_handshake import GssapiHandshake


class BrokenContext:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.confidentiality = True

    async def step(self, token: bytes) -> tuple[bytes, bool]:
        raise self.error

    def wrap(self, data: bytes, conf: bool) -> bytes:
        return data

    def unwrap(self, token: bytes) -> tuple[bytes, bool]:
        return token, False


@dataclass
class FakeAcceptor:
    error: Exception

    def new_context(self) -> BrokenContext:
        return BrokenContext(self.error)


@dataclass
class FakeTransport:
    written: bytearray = field(default_factory=bytearray)

    def write(self, data: bytes) -> None:
        self.written += data


@dataclass
class FakeSession:
    ctx: Any
    conn: ServerConnection
    transport: FakeTransport = field(default_factory=FakeTransport)
    record: SessionRecord = field(default_factory=lambda: SessionRecord("127.0.0.1:5", 0.0))
    closed: bool = False
    error: str | None = None

    def close(self, error: str | None = None) -> None:
        self.closed, self.error = True, error


def run(error: Exception) -> FakeSession:
    conn = ServerConnection()
    conn.receive_data(Greeting((AuthMethod.GSSAPI,)).to_bytes())
    conn.next_event()
    conn.send(conn.choose_method((AuthMethod.GSSAPI,)))

    @dataclass
    class Ctx:
        config: Config = field(default_factory=Config)

    session = FakeSession(Ctx(), conn)
    handshake = GssapiHandshake(session, FakeAcceptor(error))  # type: ignore[arg-type]
    message = GssapiMessage(GssapiMessageType.AUTHENTICATION, b"token")
    assert asyncio.run(handshake.receive(message)) is False
    return session


def test_gss_failure_is_aborted_and_closed() -> None:
    session = run(GssapiError("gss_accept_sec_context: Decrypt integrity check failed"))
    assert session.transport.written == b"\x01\xff"
    assert session.closed
    assert session.error == "GSSAPI: gss_accept_sec_context: Decrypt integrity check failed"
    assert session.conn.state is State.CLOSED


def test_unexpected_library_error_ends_only_the_session() -> None:
    session = run(RuntimeError("library bug"))
    assert session.transport.written == b"\x01\xff"
    assert session.closed
    assert session.error == "GSSAPI: RuntimeError: library bug"
