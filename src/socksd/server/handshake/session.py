"""One client connection, from accept to the access-log line.

accept -> PROXY header (only from a load balancer in ``proxy_protocol_from``:
``socksd.server.handshake.proxied``) -> admission (``admission.admit``, with the real client) ->
greeting -> method selection -> sub-negotiation (username/password here, GSSAPI in
``socksd.server.handshake.gssapi``) -> request (``Admission.authorize``) -> command
(``socksd.server.commands``: ``connect``, ``bind``, ``udp``) -> relay (``socksd.server.dataplane``)
or UDP association -> access log.

:class:`Session` is the ``asyncio.Protocol`` of the client's connection during the handshake. It
feeds the bytes to the sans-I/O :class:`~socksd.protocol.ServerConnection` and acts on its events
and on the decisions of its :class:`~socksd.server.handshake.admission.Admission`. Whenever it
waits for something of its own (a password check, a command) it pauses reading, so a client
cannot make it buffer more than one read. A command gets the session as a
:class:`~socksd.server.commands.base.CommandSession` (what it may use, nothing more), writes its
own reply and hands the client's transport to a relay or a UDP association, which then own it;
the session stays the owner that writes the access-log line at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from socksd.accesslog import SessionRecord, user_name
from socksd.limits import LoginFailure
from socksd.limitstore import Verdict
from socksd.protocol import (
    CONNECTION_CLOSED,
    NEED_DATA,
    Address,
    AuthMethod,
    Command,
    Greeting,
    GssapiEncapsulation,
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
from socksd.protocol.proxy_header import (
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    looks_like_header,
)
from socksd.server.commands.base import CommandSession, Handover
from socksd.server.commands.bind import bind
from socksd.server.commands.connect import DirectConnect, connect, connect_direct
from socksd.server.commands.udp import UdpAssociation
from socksd.server.commands.udp_upstream import udp_command
from socksd.server.commands.upstream import Upstream, UpstreamFailure
from socksd.server.dataplane.idle import tcp_quiet_for
from socksd.server.dataplane.relay import Holding, Relay
from socksd.server.dataplane.terms import RelayTerms, make_relay, relay_terms
from socksd.server.handshake import mixed
from socksd.server.handshake.admission import Admission, LoginRefusal, Refusal, admit, rule_field
from socksd.server.handshake.deadlines import DeadlineQueue, K
from socksd.server.handshake.gssapi import GssapiHandshake
from socksd.server.handshake.login import check_login
from socksd.server.handshake.proxied import client_of
from socksd.sessionview import LiveSession

if TYPE_CHECKING:
    from socksd.config import Config
    from socksd.metrics import SessionMetrics
    from socksd.outgoing import SourceAddresses
    from socksd.resolver import AddrInfo, Resolver
    from socksd.rules import Decision
    from socksd.server.process.context import ServerContext

log = logging.getLogger("socksd.session")

PENDING_LIMIT = 64 * 1024
"""Bytes a client may send after its request, before the command is done, until reading pauses."""

CommandHandler = Callable[[CommandSession, Address], Coroutine[Any, Any, None]]
COMMANDS: dict[Command, CommandHandler] = {
    Command.CONNECT: connect,
    Command.BIND: bind,
    Command.UDP_ASSOCIATE: udp_command,
}
"""The handler coroutine of each command (a command missing here, or not in the ``commands``
setting, is answered with 0x07)."""


def _format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return format_hostport(str(peer[0]), peer[1])
    return str(peer)


class Session(asyncio.Protocol):
    """The client's connection until a command hands it over; then the owner of what took it."""

    __slots__ = (
        "_admitted",
        "_balancer",
        "_deadline",
        "_early",
        "_finished",
        "_header_from_untrusted",
        "_quiet",
        "accepted",
        "admission",
        "client_eof",
        "closed",
        "conn",
        "ctx",
        "gssapi",
        "header",
        "metered_down",
        "metered_up",
        "number",
        "record",
        "refused_by",
        "relay",
        "task",
        "transport",
    )

    transport: asyncio.Transport
    record: SessionRecord
    admission: Admission
    """Set at admission (a refused connection never gets further): in ``connection_made``, or
    after the PROXY header of a connection from a load balancer."""
    accepted: float
    """``time.monotonic()`` at admission; set only with metrics on (handshake latency)."""
    metered_up: int
    metered_down: int
    """Bytes each way already counted in the metrics while the session runs; only with metrics."""
    refused_by: Refusal | None
    """The checkpoint refusal being answered (``refuse``)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.conn = ServerConnection()
        self.client_eof = False
        self.closed = False
        self.task: asyncio.Task[None] | DirectConnect | None = None
        """What the session waits for: a password check, a GSSAPI step, a command."""
        self.relay: Handover | None = None
        self.gssapi: GssapiHandshake | None = None
        self._deadline: DeadlineQueue[Session] | None = None
        """The queue holding the handshake deadline, while one applies (``_start_timer``)."""
        self._finished = False
        self._admitted = False
        self.header: ProxyHeaderReader | None = None
        """Reads the PROXY header of a connection from a load balancer, until it is whole."""
        self._header_from_untrusted = False
        self._balancer: tuple[str, int] = ("", 0)
        self._quiet = False
        """A connection of the balancer's own (no header yet, or PROXY LOCAL) that has not sent a
        SOCKS byte: its end is logged at debug level, not in the access log (health checks,
        several a second)."""
        self.refused_by = None
        self._early: bytes | None = None
        """While the shared store's answer at accept is awaited: the client's bytes so far
        (reading is paused too, but a loop may deliver a first read regardless)."""
        self.number = 0
        """This worker's number for the session (``socksd sessions`` shows ``worker-number``)."""

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        peer = transport.get_extra_info("peername")
        self.record = record = SessionRecord(_format_peer(peer), time.time())
        metrics = ctx.metrics
        host = str(peer[0]) if isinstance(peer, tuple) else ""
        if len(ctx.sessions) >= ctx.config.max_sessions:
            ctx.refused_sessions += 1
            if metrics is not None:
                metrics.refused("max_sessions")
            ctx.refusals.refused(
                "max_sessions",
                host,
                "refusing %s: %d sessions open (max_sessions)",
                record.client,
                len(ctx.sessions),
            )
            self.closed = self._finished = True
            transport.abort()
            return
        if ctx.proxy_from and not host:
            # Reset before it was accepted (HAProxy ends its health checks with a reset): who
            # it came from, and so whether a header is due, is not known. Nothing to serve.
            log.debug("connection reset before it was accepted")
            self.closed = self._finished = True
            transport.abort()
            return
        ctx.opened += 1
        self.number = ctx.opened
        if ctx.proxy_from and ctx.proxy_from.trusts(host):
            # A load balancer: its PROXY header names the client, admitted once it is read.
            self._balancer = (host, int(peer[1]))
            self.header = ProxyHeaderReader()
            self._quiet = True
            record.via = record.client
            ctx.sessions.add(self)
            self._start_timer()
            return
        self._admit(host)

    def _admit(self, host: str) -> None:
        """The accept checkpoint, for the client at ``host`` (``record.client``)."""
        ctx, record, metrics = self.ctx, self.record, self.ctx.metrics
        outcome = admit(
            ctx.rules, ctx.limits, host=host, client=record.client, refusals=ctx.refusals
        )
        if isinstance(outcome, Refusal):
            self._refused_at_accept(outcome)
            return
        shared: Awaitable[Verdict] | None = None
        if ctx.limits.store is not None:
            verdict = outcome.shared_accept()
            if verdict is None or isinstance(verdict, int):
                refusal = outcome.shared_outcome("ip", verdict)
                if refusal is not None:
                    outcome.release()
                    self._refused_at_accept(refusal)
                    return
            else:
                shared = verdict  # awaited once the session is counted as open (below)
        self.admission = outcome
        self._admitted = True
        ctx.sessions.add(self)  # (asyncio and uvloop both set TCP_NODELAY on accepted sockets)
        if metrics is not None:
            metrics.opened()
            self.accepted = time.monotonic()
            self.metered_up = self.metered_down = 0
        if self._deadline is None:
            self._start_timer()
        if shared is not None:
            self._check_shared("ip", shared, None)

    def _refused_at_accept(self, refusal: Refusal) -> None:
        """Close a connection the accept checkpoint refused (no access-log line unless the
        refusal asks for one)."""
        ctx, record, metrics = self.ctx, self.record, self.ctx.metrics
        self.closed = self._finished = True
        ctx.sessions.discard(self)
        self.cancel_handshake_timer()
        self.transport.close()
        if metrics is not None:
            metrics.refusal(refusal)
        if refusal.log_now:
            record.rule, record.error = refusal.rule, refusal.error
            ctx.access_log.write(record)

    def _check_shared(
        self,
        kind: str,
        verdict: Verdict | Awaitable[Verdict],
        then: Callable[[], None] | None,
    ) -> None:
        """Act on the shared store's ``verdict`` for ``kind`` ("ip", "user"): refuse, or go on
        (``then``). An awaited verdict (Redis, bounded by its timeout) holds the client's bytes
        meanwhile, reading paused; a refusal then ends an open session (its access-log line
        says which limit)."""
        if verdict is None or isinstance(verdict, int):
            refusal = self.admission.shared_outcome(kind, verdict)
            if refusal is not None:
                self.refuse(refusal)
            elif then is not None:
                then()
            return
        self.transport.pause_reading()
        if then is None:
            self._early = b""  # at accept: hold what the client sends until the answer
        self.task = asyncio.get_running_loop().create_task(self._await_shared(kind, verdict, then))

    async def _await_shared(
        self, kind: str, verdict: Awaitable[Verdict], then: Callable[[], None] | None
    ) -> None:
        answer = await verdict
        early, self._early = self._early, None
        admission = self.admission
        refusal = admission.shared_outcome(kind, answer)
        if self._finished:  # the client left meanwhile: give back what the store counted
            admission.release_shared()
            return
        if refusal is not None:
            self.refuse(refusal)
            return
        self.task = None
        self.transport.resume_reading()
        if then is not None:
            then()
        else:
            if early:
                self.data_received(early)
            if self.client_eof and not self.closed:
                self.eof_received()  # the client's EOF came meanwhile

    def _start_timer(self) -> None:
        """The handshake deadline: in the server's shared queue (one timer for all sessions)."""
        ctx = self.ctx
        deadlines = ctx.deadlines(ctx.config.handshake_timeout, Session._handshake_timeout)
        self._deadline = deadlines
        deadlines.add(self)

    def _header_received(self, reader: ProxyHeaderReader, data: bytes) -> None:
        """Bytes from a load balancer before its PROXY header is whole."""
        reader.receive_data(data)
        try:
            header = reader.next_event()
        except ProxyHeaderError as e:
            self._bad_header(str(e))
            return
        if not isinstance(header, ProxyHeader):
            return  # NEED_DATA
        self.header = None
        host, port = client_of(header, self._balancer)
        self.record.client = format_hostport(host, port)
        # The balancer's own connection (a health check), so far: no client address, or (v1
        # checks) the connection's own addresses, as the specification asks of checks.
        self._quiet = header.source is None or (host, port) == self._balancer
        self._admit(host)
        rest = reader.trailing_data()
        if rest and not self.closed:
            self.data_received(rest)

    def _bad_header(self, error: str) -> None:
        """A load balancer's connection without a valid PROXY header: counted, logged, closed."""
        if self.ctx.metrics is not None:
            self.ctx.metrics.proxy_header_errors.inc()
        self._quiet = False
        log.warning("closing the connection from %s: %s", self.record.client, error)
        self.close(f"PROXY protocol: {error}")

    def data_received(self, data: bytes) -> None:
        early = self._early
        if early is not None:  # admission not decided yet (_check_shared)
            self._early = early = early + data
            if len(early) > PENDING_LIMIT:
                self.close("too much data before admission")
            return
        reader = self.header
        if reader is not None:
            self._header_received(reader, data)
            return
        conn = self.conn
        if conn.state is State.GREETING and not conn.buffered:
            self._header_from_untrusted = looks_like_header(data[:12])
            self._quiet = False
            if data[0] != 0x05 and not self._header_from_untrusted and mixed.take_over(self, data):
                return  # SOCKS4 or HTTP CONNECT: that handshake has the connection now
        conn.receive_data(data)
        if conn.state is State.REPLY:
            # The command is running; what the client sends meanwhile is kept for the target.
            # Reading is paused only if that grows large: pausing costs two syscalls a session.
            if conn.buffered > PENDING_LIMIT:
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self._early is not None:  # admission not decided yet: handled after (_await_shared)
            return True
        if self.header is not None:
            if self.header.buffered:
                self._bad_header("closed before a complete PROXY header")
            else:  # a connect-only health check (AWS NLB, HAProxy with no-check-send-proxy)
                self.close("closed before sending anything")
            return True
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
        while not self.closed:
            try:
                event = conn.next_event()
            except RemoteProtocolError as e:
                transport.write(conn.refusal(e))
                if conn.refused_reply is not None:
                    self.record.reply = conn.refused_reply  # what was sent, not what was raised
                error = f"protocol error: {e}"
                if self._header_from_untrusted:
                    error += " (a PROXY protocol header from an address not in proxy_protocol_from)"
                    self.ctx.refusals.refused(
                        "proxy_protocol_from",
                        self.admission.host,
                        "refusing %s: %s",
                        self.record.client,
                        error,
                    )
                self.close(error)
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
        """RFC 1929 check (``login.check_login``); the reply says how it went."""
        self.record.user = user = user_name(creds.username)
        ok = await check_login(self, creds.username, creds.password, user)
        if isinstance(ok, LoginRefusal):
            self.transport.write(self.conn.send(UserPassReply(1)))
            self.close(f"login refused: {ok}")
            return
        self.transport.write(self.conn.send(UserPassReply(0 if ok else 1)))
        if not ok:
            self.close("authentication failed")
            return
        self.transport.resume_reading()
        self._process()

    def login_start(self) -> LoginRefusal | None:
        """Admission's login checkpoint (``Admission.login_start``), a refusal counted."""
        refusal = self.admission.login_start()
        if refusal is not None and self.ctx.metrics is not None:
            self.ctx.metrics.throttled(refusal.limit)
        return refusal

    def login_failed(self, method: str, user: str | None) -> LoginFailure:
        """Count a failed login of ``method`` (``Admission.login_failed``: the throttle; the
        metrics); the answer says how long its reply waits."""
        failure = self.admission.login_failed(user)
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.auth_failed(method)
            if failure.delay > 0:
                metrics.throttled("auth_delay")
        return failure

    async def _gssapi_message(self, message: GssapiMessage) -> None:
        if self.gssapi is None:
            if self.ctx.gssapi is None:  # selected, then switched off by a reload
                self.close("GSSAPI: switched off by a reload")
                return
            self.gssapi = GssapiHandshake(self, self.ctx.gssapi)
        if await self.gssapi.receive(message):
            self.transport.resume_reading()
            self._process()

    def _request(self, request: Request) -> None:
        record = self.record
        self.cancel_handshake_timer()
        if self.ctx.metrics is not None:
            self.ctx.metrics.handshake_done(time.monotonic() - self.accepted)
        record.command = request.command.name
        record.target = str(request.address)
        handler = COMMANDS.get(request.command)
        if handler is None or request.command not in self.ctx.config.commands:
            self.fail(ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.name} not supported")
            return
        admission = self.admission
        refusal = admission.authorize(self.ctx.rules, record.user, request)
        if refusal is not None:
            self.refuse(refusal)
            return
        if admission.user is not None and self.ctx.limits.store is not None:
            self._check_shared(
                "user", admission.shared_request(), lambda: self._command(handler, request)
            )
            return
        self._command(handler, request)

    def _command(self, handler: CommandHandler, request: Request) -> None:
        """Run the allowed request's command."""
        if self.closed:
            return
        if handler is connect:
            direct = connect_direct(self, request.address)
            if direct is not None:
                self.task = direct
                return
        self.task = asyncio.get_running_loop().create_task(handler(self, request.address))

    def cancel_handshake_timer(self) -> None:
        """The handshake timeout no longer applies."""
        if self._deadline is not None:
            self._deadline.discard(self)
            self._deadline = None

    def _handshake_timeout(self) -> None:
        self._deadline = None
        timeout = self.ctx.config.handshake_timeout
        if self.header is not None:
            self._bad_header(f"no complete PROXY header within {timeout:g}s")
        elif not self.closed and self.relay is None:
            handshake = self.transport.get_protocol()
            if isinstance(handshake, mixed.Handshake):  # SOCKS4 or HTTP: its farewell, if any
                handshake.timed_out(timeout)
            self.close(f"handshake not done within {timeout:g}s")

    # -- outcomes ----------------------------------------------------------------------------

    def reply(self, code: ReplyCode, bound: Address | None = None) -> None:
        """Write the reply to the request (success replies come with their bound address)."""
        self.record.reply = code
        self.transport.write(self.conn.send(Reply(code) if bound is None else Reply(code, bound)))

    def fail(self, code: ReplyCode, error: str) -> None:
        """Answer the request with a failure code and close (RFC 1928: at once)."""
        if self.closed:
            return
        self.reply(code)
        self.close(error)

    def refuse(self, refusal: Refusal) -> None:
        """Answer a checkpoint's refusal (its reply code, its rule in the access log), close."""
        self.refused_by = refusal  # the reply encoding may read it (HTTP: 503 for a limit)
        if self.ctx.metrics is not None:
            self.ctx.metrics.refusal(refusal)
        if refusal.rule is not None:
            self.record.rule = refusal.rule
        if refusal.reply is None:
            self.close(refusal.error)
        else:
            self.fail(refusal.reply, refusal.error)

    def abort(self, error: str) -> None:
        """End the session at once, dropping buffered data (shutdown deadline)."""
        if self.relay is not None:
            self.relay.abort(error)
            return
        if self.task is not None:
            self.task.cancel()
        self.transport.abort()
        self.finish(error)

    def abandon(self, error: str) -> None:
        """The client gave up while its command waits: stop the command, close."""
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.close(error)

    def reloaded(self) -> None:
        """The configuration was reloaded (SIGHUP): tell what owns the connection now."""
        if self.relay is not None:
            self.relay.reloaded()

    def close(self, error: str | None = None) -> None:
        """Close the client connection (after flushing what is written) and log the session."""
        if self.closed:
            return
        self.transport.close()
        self.finish(error)

    # -- the live view (socksd sessions) -----------------------------------------------------

    @property
    def id(self) -> str:
        """``W-N``: the worker (``ServerContext.worker_label``) and the session's number in it."""
        return f"{self.ctx.worker_label}-{self.number}"

    def snapshot(self, now: float, loop_now: float) -> LiveSession:
        """What the session is doing at ``now`` (wall clock; ``loop_now``: the loop's clock).

        Reads the counters the relay or UDP association keeps anyway; idle time from the kernel
        (TCP) or the association's activity mark, so nothing is added per byte."""
        record = self.record
        owner = self.relay
        up = down = 0
        udp: dict[str, object] | None = None
        if isinstance(owner, Relay):
            state = "relaying"
            up, down = owner.up, owner.down
            idle = owner.quiet_for()
        elif isinstance(owner, UdpAssociation):
            state = "udp"
            up, down = owner.bytes_up, owner.bytes_down
            udp = owner.stats().as_dict()
            idle = owner.quiet_for(loop_now)
        else:
            state = "handshake" if record.command is None else "connecting"
            idle = tcp_quiet_for(self.transport)
        return LiveSession(
            id=self.id,
            worker=self.ctx.worker,
            client=record.client,
            user=record.user,
            command=record.command,
            target=record.target,
            remote=record.remote,
            state=state,
            started=record.started,
            age=max(0.0, now - record.started),
            idle=idle,
            bytes_up=up,
            bytes_down=down,
            udp=udp,
            protocol=record.protocol,
        )

    # -- what a command uses (CommandSession) ------------------------------------------------

    @property
    def client(self) -> asyncio.Transport:
        return self.transport

    @property
    def client_host(self) -> str:
        return self.admission.host

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def resolver(self) -> Resolver:
        return self.ctx.resolver

    @property
    def codec(self) -> GssapiEncapsulation | None:
        return self.conn.encapsulation

    def upstream(self) -> Upstream | None:
        name = self.admission.upstream
        if name is None:
            return None
        self.record.upstream = name
        proxy = self.ctx.upstreams.get(name)
        if proxy is None:  # a reload dropped it while the request was being decided
            raise UpstreamFailure(ReplyCode.GENERAL_FAILURE, f"upstream {name} is not configured")
        return Upstream(name, proxy)

    @property
    def outgoing(self) -> SourceAddresses | None:
        return self.admission.via or self.ctx.config.bind_out

    @property
    def metrics(self) -> SessionMetrics | None:
        return self.ctx.metrics

    def deadlines(self, timeout: float, expire: Callable[[K], None]) -> DeadlineQueue[K]:
        return self.ctx.deadlines(timeout, expire)

    def terms(self) -> RelayTerms:
        """Idle timeout, bandwidth and buffer limits of this session's data (any command)."""
        admission = self.admission
        return relay_terms(self.ctx, admission.command, self.record.user, admission.idle_timeout)

    def allowed_addresses(self, target: Address, infos: list[AddrInfo]) -> list[AddrInfo] | Refusal:
        return self.admission.allowed_addresses(self.record.user, target, infos)

    def peer_decision(self, host: str, port: int) -> Decision:
        decision = self.admission.peer_decision(self.ctx.rules, self.record.user, host, port)
        if not decision.allowed and self.ctx.metrics is not None:
            self.ctx.metrics.denied(rule_field(decision))
        return decision

    def destination_allowed(self, name: str | None, ip: str, port: int) -> bool:
        decision = self.admission.destination_allowed(
            self.ctx.rules, self.record.user, name, ip, port
        )
        if not decision.allowed:
            log.debug(
                "UDP datagram to %s (%s) port %d denied by %s", name, ip, port, decision.label
            )
            if self.ctx.metrics is not None:
                self.ctx.metrics.denied(rule_field(decision))
        return decision.allowed

    def start_relay(self, held: Holding) -> None:
        """Relay from now on, with the one relay every command gets (``make_relay``): the
        success reply is written, ``held`` is the outgoing side."""
        self.relay = relay = make_relay(self, self.terms(), self.codec)
        relay.start(self.transport, held, self.conn.trailing_data(), self.client_eof)
        self._handed_over()

    def hand_over(self, owner: Handover) -> None:
        """``owner`` (a UDP association) has the client's connection from now on."""
        self.relay = owner
        self.conn.trailing_data()  # bytes after a UDP ASSOCIATE request mean nothing: dropped
        self._handed_over()

    def _handed_over(self) -> None:
        """Drop what only the handshake used, so a long idle session holds no more than it
        needs: the parser and its buffer, a GSSAPI handshake, the command's task (a finished
        task keeps its coroutine; the loop holds it while it runs). Nothing reads them from
        here on: the client's transport has the relay's (or association's) protocol now."""
        del self.conn
        self.task = None
        self.gssapi = None

    # -- RelayOwner ----------------------------------------------------------------------------

    def relay_finished(self, relay: Relay, error: str | None) -> None:
        """Both connections of the relay are closed."""
        self.finish(error, relay.up, relay.down)

    def finish(self, error: str | None = None, up: int = 0, down: int = 0) -> None:
        """Account for the session's end: drop it from the open set, write its access-log line."""
        if self._finished:
            return
        self._finished = True
        self.closed = True
        if self._deadline is not None:
            self._deadline.discard(self)
            self._deadline = None
        self.ctx.sessions.discard(self)
        record = self.record
        if self._admitted:
            self.admission.release()
            if record.rule is None and self.admission.rule is not None:
                record.rule = self.admission.rule
        record.bytes_up, record.bytes_down = up, down
        if error and record.error is None:
            record.error = error
        if self._admitted and self.ctx.metrics is not None:
            self.ctx.metrics.finished(record, self.metered_up, self.metered_down)
        if self._quiet:
            log.debug(
                "%s via %s (the balancer's own connection) ended: %s",
                record.client,
                record.via,
                error,
            )
            return
        self.ctx.access_log.write(record)
