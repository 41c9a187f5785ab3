"""What a command is given: :class:`CommandSession`, the part of a session a command may use.

A command is a coroutine ``command(session, address)`` run once the request passed admission.
It resolves and opens what it needs, asks the session for the checkpoints it meets on the way
(a name's addresses, a BIND's peer, a UDP datagram's destination), writes its own replies with
``reply``/``fail``, and finally hands the client's connection over: to the relay every command
gets (``start_relay``, CONNECT and BIND) or to a UDP association (``hand_over``). The session
(``socksd.server.handshake.session.Session``) implements this; a test may give a command any
object that does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from socksd.outgoing import bind_error

if TYPE_CHECKING:
    from socksd.accesslog import SessionRecord
    from socksd.config import Config
    from socksd.metrics import SessionMetrics
    from socksd.outgoing import SourceAddresses
    from socksd.protocol import Address, GssapiEncapsulation, ReplyCode, ServerConnection
    from socksd.resolver import AddrInfo, Resolver
    from socksd.rules import Decision
    from socksd.server.commands.upstream import Upstream
    from socksd.server.dataplane.relay import Holding
    from socksd.server.dataplane.terms import RelayTerms
    from socksd.server.handshake.admission import Refusal
    from socksd.server.handshake.deadlines import DeadlineQueue, K


class Handover(Protocol):
    """What owns the client connection once a command succeeded: a Relay, a UDP association."""

    def abort(self, error: str) -> None:
        """End at once, dropping buffered data (shutdown deadline)."""

    def reloaded(self) -> None:
        """The configuration was reloaded: drop what was derived from the old one."""

    @property
    def up(self) -> int:
        """Bytes relayed from the client so far."""

    @property
    def down(self) -> int:
        """Bytes relayed to the client so far."""


class CommandSession(Protocol):
    """The session of a request, as its command sees it."""

    client_eof: bool
    """The client has half-closed its connection."""
    closed: bool
    """The session has ended."""

    @property
    def record(self) -> SessionRecord:
        """The access-log record: a command fills in ``remote`` (and ``udp``)."""

    @property
    def conn(self) -> ServerConnection:
        """The sans-I/O connection: early data the client sends is kept there."""

    @property
    def client(self) -> asyncio.Transport:
        """The client's connection; reading is paused while the command runs."""

    @property
    def client_host(self) -> str:
        """The client's IP address: the connection's peer, or behind a load balancer the
        source its PROXY protocol header named (UDP datagrams come from there)."""

    @property
    def config(self) -> Config:
        """The configuration in force."""

    @property
    def resolver(self) -> Resolver:
        """The resolver in force (a reload may replace it)."""

    @property
    def codec(self) -> GssapiEncapsulation | None:
        """RFC 1961 encapsulation after GSSAPI, else None."""

    def upstream(self) -> Upstream | None:
        """The upstream proxy the allowed request goes through; None: direct (or not decided
        yet: a name whose addresses the rules need, until ``allowed_addresses``). Raises
        ``UpstreamFailure`` when the upstream named is no longer configured."""

    @property
    def outgoing(self) -> SourceAddresses | None:
        """Where connections and datagrams to targets (and upstreams) leave from: the allow
        rule's ``via``, else ``bind_out``; None: the kernel picks by its routes."""

    @property
    def metrics(self) -> SessionMetrics | None:
        """The metrics to report latencies to (``timed``); None when metrics are off."""

    def terms(self) -> RelayTerms:
        """Idle timeout, bandwidth and buffer limits of this session's data."""

    def deadlines(self, timeout: float, expire: Callable[[K], None]) -> DeadlineQueue[K]:
        """The server's shared queue of ``timeout``-second deadlines ending in ``expire(key)``
        (one timer for all of them, not one per session)."""

    def allowed_addresses(self, target: Address, infos: list[AddrInfo]) -> list[AddrInfo] | Refusal:
        """The rules for the addresses a name resolved to (admission)."""

    def peer_decision(self, host: str, port: int) -> Decision:
        """The rules for the peer that connected to a BIND for any peer."""

    def destination_allowed(self, name: str | None, ip: str, port: int) -> bool:
        """The rules for one UDP datagram's destination."""

    def reply(self, code: ReplyCode, bound: Address | None = None) -> None:
        """Write a reply (a success with its bound address)."""

    def fail(self, code: ReplyCode, error: str) -> None:
        """Answer with a failure code and close."""

    def refuse(self, refusal: Refusal) -> None:
        """Answer a checkpoint's refusal and close."""

    def close(self, error: str | None = None) -> None:
        """Close the client connection and end the session."""

    def abandon(self, error: str) -> None:
        """The client gave up while the command waits: stop the command, close."""

    def start_relay(self, held: Holding) -> None:
        """Relay the client's connection with the outgoing one (after the success reply)."""

    def hand_over(self, owner: Handover) -> None:
        """Give the client's connection to ``owner`` (a UDP association)."""

    def finish(self, error: str | None = None, up: int = 0, down: int = 0) -> None:
        """The session's end: its access-log line, its counts given back."""

    def connection_lost(self, exc: Exception | None) -> None:
        """The client's connection is gone (forwarded by a command's own protocol)."""


def bind_address(advertise: str | None, local_ip: str) -> str:
    """Where a BIND listener or a UDP ASSOCIATE client socket is bound: the advertised address
    when it is this host's own (a fleet node whose public address is not the one its load
    balancer connects to), else ``local_ip`` (``advertise`` behind NAT: the port is forwarded).

    Whether it is this host's is asked of the kernel each time (a bind on port 0), so an
    address added or removed later counts at once.
    """
    if advertise is None or advertise == local_ip or bind_error(advertise) is not None:
        return local_ip
    return advertise


T = TypeVar("T")


async def timed(step: Awaitable[T], observe: Callable[[float, bool], None]) -> T:
    """Await ``step`` and report how long it took and whether it succeeded (a cancel is not
    reported). Callers wrap a step only when metrics are on, so it costs nothing otherwise::

        resolving = session.resolver.resolve(host, port)
        infos = await (resolving if metrics is None else timed(resolving, metrics.resolved))
    """
    start = time.monotonic()
    try:
        result = await step
    except asyncio.CancelledError:
        raise
    except Exception:
        observe(time.monotonic() - start, False)
        raise
    observe(time.monotonic() - start, True)
    return result
