"""The session's GSSAPI driver when the mechanism misbehaves (cannot be provoked with a real KDC)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from socksd.accesslog import SessionRecord
from socksd.config import Config
from socksd.limits import Limits, LoginFailure
from socksd.protocol import (
    AuthMethod,
    Greeting,
    GssapiError,
    GssapiMessage,
    GssapiMessageType,
    ServerConnection,
    State,
)
from socksd.server.handshake.admission import Admission, LoginRefusal
from socksd.server.handshake.gssapi import GssapiHandshake
from socksd.server.handshake.refusals import RefusalLog


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
    admission: Admission = field(init=False)
    timer_cancelled: bool = False

    def __post_init__(self) -> None:
        self.admission = Admission(
            self.ctx.limits, "192.0.2.7", (4, 0), "192.0.2.7:5", self.ctx.refusals
        )

    def close(self, error: str | None = None) -> None:
        self.closed, self.error = True, error

    def cancel_handshake_timer(self) -> None:
        self.timer_cancelled = True

    def login_start(self) -> LoginRefusal | None:
        return self.admission.login_start()

    def login_failed(self, method: str, user: str | None) -> LoginFailure:
        return self.admission.login_failed(user)


@dataclass
class Ctx:
    config: Config = field(default_factory=Config)
    limits: Limits = field(default_factory=lambda: Limits(Config(auth_delay=0.01)))
    refusals: RefusalLog = field(default_factory=RefusalLog)


def run(error: Exception, ctx: Ctx | None = None) -> FakeSession:
    conn = ServerConnection()
    conn.receive_data(Greeting((AuthMethod.GSSAPI,)).to_bytes())
    conn.next_event()
    conn.send(conn.choose_method((AuthMethod.GSSAPI,)))
    session = FakeSession(ctx or Ctx(), conn)
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


def test_failed_context_counts_for_the_address_and_is_delayed() -> None:
    ctx = Ctx()
    throttle = ctx.limits.throttle
    for n in (1, 2):
        session = run(GssapiError("gss_accept_sec_context: Decrypt integrity check failed"), ctx)
        assert session.transport.written == b"\x01\xff" and session.closed
        assert session.timer_cancelled  # the abort waited its delay, not the handshake timeout
        assert throttle.failures("192.0.2.7", None, time.monotonic()) == n  # the address only
        assert throttle.checks("192.0.2.7") == 0  # the check is given back
    assert len(throttle._pairs) == 0


def test_context_step_refused_when_the_address_has_its_checks_in_flight() -> None:
    ctx = Ctx(limits=Limits(Config(max_auth_checks_per_ip=1)))
    assert ctx.limits.throttle.begin_check("192.0.2.7")
    session = run(RuntimeError("step must not run"), ctx)
    assert session.transport.written == b"\x01\xff" and session.closed
    assert session.error == (
        "GSSAPI: refused: 1 logins from this address are being checked (max_auth_checks_per_ip)"
    )
    assert len(ctx.limits.throttle) == 0  # a refusal is not a failure
