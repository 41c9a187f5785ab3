"""One client connection, from accept to the access-log line.

accept (access rules, limits) -> greeting -> method selection -> sub-negotiation
(username/password, or GSSAPI in ``socksd.server.gssapi_handshake``) -> request -> access rules ->
command (``socksd.server.connect``, ``bind``, ``udp``) -> relay (``relay_gssapi`` when GSSAPI
encapsulates the traffic) or UDP association -> access log. The rule and limit checks live in
``socksd.server.admission``.

:class:`Session` is the ``asyncio.Protocol`` of the client's connection during the handshake. It
feeds the bytes to the sans-I/O :class:`~socksd.protocol.ServerConnection` and acts on its events.
Whenever it waits for something of its own (a password check, an outgoing connection) it pauses
reading, so a client cannot make it buffer more than one read. Once the command succeeds, the
client's transport is handed to the relay with ``set_protocol``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, cast

from socksd.accesslog import SessionRecord, user_name
from socksd.limits import LoginFailure
from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Address,
    AuthMethod,
    Command,
    Greeting,
    GssapiMessage,
    RemoteProtocolError,
    Reply,
    ReplyCode,
    Request,
    ServerConnection,
    State,
    UserPassReply,
    UserPassRequest,
    format_hostport,
)
from socksd.server import admission
from socksd.server.bind import bind
from socksd.server.connect import connect
from socksd.server.context import ServerContext
from socksd.server.gssapi_handshake import GssapiHandshake
from socksd.server.relay import Relay
from socksd.server.relays import RelayTerms, make_relay, relay_terms
from socksd.server.udp import udp_associate

log = logging.getLogger("socksd.session")

PENDING_LIMIT = 64 * 1024
"""Bytes a client may send after its request, before the command is done, until reading pauses."""

CommandHandler = Callable[["Session", Address], Coroutine[Any, Any, None]]
COMMANDS: dict[Command, CommandHandler] = {
    Command.CONNECT: connect,
    Command.BIND: bind,
    Command.UDP_ASSOCIATE: udp_associate,
}
"""The handler coroutine of each command (a command missing here, or not in the ``commands``
setting, is answered with 0x07)."""


class Handover(Protocol):
    """What owns the client connection once a command succeeded: a Relay, a UDP association."""

    def abort(self, error: str) -> None:
        """End at once, dropping buffered data (shutdown deadline)."""

    def reloaded(self) -> None:
        """The configuration was reloaded: drop what was derived from the old one."""


def _format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), peer[1])
    return str(peer)


def _failure_note(failure: LoginFailure | None) -> str:
    """The counts and delay of a failed login, for its log line."""
    if failure is None:
        return ""
    note = f" ({failure.user_failures} for the user, {failure.address_failures} from the address"
    return note + (f"; answered in {failure.delay:g}s)" if failure.delay else ")")


class Session(asyncio.Protocol):
    """The client's connection until the relay takes over; then the relay's owner."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.conn = ServerConnection()
        self.transport: asyncio.Transport | None = None
        self.record: SessionRecord | None = None
        self.client_eof = False
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.relay: Handover | None = None
        self.gssapi: GssapiHandshake | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False
        self.admission: admission.Admission | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        self.record = SessionRecord(_format_peer(peer), time.time())
        if len(ctx.sessions) >= ctx.config.max_sessions:
            ctx.refused_sessions += 1
            log.warning(
                "refusing %s: %d sessions open (max_sessions)",
                self.record.client,
                len(ctx.sessions),
            )
            self.closed = self._finished = True
            transport.abort()
            return
        if not admission.admit(self, str(peer[0]) if isinstance(peer, tuple) else ""):
            self.closed = self._finished = True
            return
        ctx.sessions.add(self)  # (asyncio and uvloop both set TCP_NODELAY on accepted sockets)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(ctx.config.handshake_timeout, self._handshake_timeout)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        if conn.state is State.REPLY:
            # The command is running; what the client sends meanwhile is kept for the target.
            # Reading is paused only if that grows large: pausing costs two syscalls a session.
            if conn.buffered > PENDING_LIMIT and self.transport is not None:
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.conn.state is State.ESTABLISHED or self.conn.state is State.REPLY:
            return True  # the request is in: keep the write side for the reply and relay
        self.conn.receive_data(b"")
        self._process()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            return  # the relay's endpoints own the transport now
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if not self.closed:
            self.finish(error=str(exc) if exc else "client closed during handshake")

    # -- handshake ---------------------------------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        transport = self.transport
        assert transport is not None
        while not self.closed:
            try:
                event = conn.next_event()
            except RemoteProtocolError as e:
                transport.write(conn.refusal(e))
                if conn.refused_reply is not None and self.record is not None:
                    self.record.reply = conn.refused_reply  # what was sent, not what was raised
                self.close(f"protocol error: {e}")
                return
            if event is NEED_DATA:
                return
            if event is CONNECTION_CLOSED:
                self.close("client closed during handshake")
                return
            if isinstance(event, Greeting):
                selection = conn.choose_method(self.ctx.methods)
                transport.write(conn.send(selection))
                if selection.method == AuthMethod.NO_ACCEPTABLE:
                    self.close("no acceptable authentication method offered")
                    return
            elif isinstance(event, UserPassRequest):
                transport.pause_reading()
                self.task = asyncio.get_running_loop().create_task(self._check_password(event))
                return
            elif isinstance(event, Request):
                self._request(event)
                return
            elif isinstance(event, GssapiMessage):
                transport.pause_reading()
                self.task = asyncio.get_running_loop().create_task(self._gssapi_message(event))
                return

    async def _check_password(self, creds: UserPassRequest) -> None:
        """RFC 1929 check. A login in the verified-login cache is let in at once; one that is
        being checked for another session shares that check; any other goes through the login
        checkpoint (in-flight checks per address) to bcrypt. A failure's reply waits the delay
        admission gives (bounded by ``max_auth_delay``)."""
        auth = self.ctx.authenticator
        record, transport = self.record, self.transport
        assert record is not None and transport is not None
        record.user = user = user_name(creds.username)
        ok = auth is not None and auth.cached(creds.username, creds.password)
        if not ok:
            shared = auth is not None and auth.checking(creds.username, creds.password)
            refusal = None if shared else admission.login_start(self)
            if refusal is not None:
                log.warning("refusing the login of %r from %s: %s", user, record.client, refusal)
                transport.write(self.conn.send(UserPassReply(1)))
                self.close(f"login refused: {refusal}")
                return
            ok = auth is not None and await auth.verify(creds.username, creds.password)
            if not ok:
                failure = admission.login_failed(self, user)
                delay = failure.delay if failure is not None else 0.0
                log.warning(
                    "authentication failed for user %r from %s%s",
                    user,
                    record.client,
                    _failure_note(failure),
                )
                if delay > 0:
                    self.cancel_handshake_timer()  # the failure reply comes, within max_auth_delay
                    await asyncio.sleep(delay)
        admission.login_done(self, user, ok)
        transport.write(self.conn.send(UserPassReply(0 if ok else 1)))
        if not ok:
            self.close("authentication failed")
            return
        transport.resume_reading()
        self._process()

    async def _gssapi_message(self, message: GssapiMessage) -> None:
        if self.gssapi is None:
            if self.ctx.gssapi is None:  # selected, then switched off by a reload
                self.close("GSSAPI: switched off by a reload")
                return
            self.gssapi = GssapiHandshake(self, self.ctx.gssapi)
        if await self.gssapi.receive(message):
            assert self.transport is not None
            self.transport.resume_reading()
            self._process()

    def _request(self, request: Request) -> None:
        assert self.transport is not None and self.record is not None
        self.cancel_handshake_timer()
        self.record.command = request.command.name
        self.record.target = str(request.address)
        handler = COMMANDS.get(request.command)
        if handler is None or request.command not in self.ctx.config.commands:
            self.fail(ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.name} not supported")
            return
        if not admission.authorize(self, request):
            return
        self.task = asyncio.get_running_loop().create_task(handler(self, request.address))

    def cancel_handshake_timer(self) -> None:
        """The handshake timeout no longer applies."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handshake_timeout(self) -> None:
        self._timer = None
        if not self.closed and self.relay is None:
            self.close(f"handshake not done within {self.ctx.config.handshake_timeout:g}s")

    # -- outcomes ----------------------------------------------------------------------------

    def reply(self, code: ReplyCode, bound: Reply | None = None) -> None:
        """Write the reply to the request (success replies come with their bound address)."""
        assert self.transport is not None and self.record is not None
        self.record.reply = code
        self.transport.write(self.conn.send(bound if bound is not None else Reply(code)))

    def fail(self, code: ReplyCode, error: str) -> None:
        """Answer the request with a failure code and close (RFC 1928: at once)."""
        if self.closed:
            return
        self.reply(code)
        self.close(error)

    def abort(self, error: str) -> None:
        """End the session at once, dropping buffered data (shutdown deadline)."""
        if self.relay is not None:
            self.relay.abort(error)
        elif self.transport is not None:
            if self.task is not None:
                self.task.cancel()
            self.transport.abort()
            self.finish(error)

    def reloaded(self) -> None:
        """The configuration was reloaded (SIGHUP): tell what owns the connection now."""
        if self.relay is not None:
            self.relay.reloaded()

    def close(self, error: str | None = None) -> None:
        """Close the client connection (after flushing what is written) and log the session."""
        if self.closed:
            return
        if self.transport is not None:
            self.transport.close()
        self.finish(error)

    # -- RelayOwner ----------------------------------------------------------------------------

    def relay_terms(self) -> RelayTerms:
        """Idle timeout, bandwidth and buffer limits of this session's data (any command)."""
        admission = self.admission
        user = self.record.user if self.record is not None else None
        if admission is None:
            return relay_terms(self.ctx, 0, user, None)
        return relay_terms(self.ctx, admission.command, user, admission.idle_timeout)

    def new_relay(self) -> Relay:
        """The relay of a CONNECT, owned by this session."""
        return make_relay(self, self.relay_terms(), self.conn.encapsulation)

    def target_connected(self, relay: Relay, transport: asyncio.Transport) -> None:
        """Reply with the outgoing connection's local address, then hand over to the relay.

        Called from the target protocol's ``connection_made``, before any target byte can be
        delivered, so the reply always precedes the target's data (docs/design-notes.md).
        """
        if self.closed or self.transport is None:
            transport.close()
            return
        assert self.record is not None
        self.relay = relay
        sockname = transport.get_extra_info("sockname")
        if self.record.remote is None:
            self.record.remote = _format_peer(transport.get_extra_info("peername"))
        self.reply(ReplyCode.SUCCEEDED, Reply(ReplyCode.SUCCEEDED, Address.of(*sockname[:2])))
        relay.start(self.transport, self.conn.trailing_data(), self.client_eof)

    def relay_finished(self, relay: Relay, error: str | None) -> None:
        """Both connections of the relay are closed."""
        self.finish(error, relay.up, relay.down)

    def finish(self, error: str | None = None, up: int = 0, down: int = 0) -> None:
        """Account for the session's end: drop it from the open set, write its access-log line."""
        if self._finished:
            return
        self._finished = True
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.ctx.sessions.discard(self)
        admission.release(self)
        record = self.record
        if record is not None:
            record.bytes_up, record.bytes_down = up, down
            if error and record.error is None:
                record.error = error
            self.ctx.access_log.write(record)
