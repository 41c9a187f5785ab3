"""CONNECT: resolve the target, connect with Happy Eyeballs, reply, relay.

The command awaits the outgoing connection, then writes the success reply itself, with the
connection's local address as BND.ADDR/BND.PORT: a reply that says "connected" is true. The
connection is opened with a :class:`~socksd.server.dataplane.relay.Holding` protocol, which keeps
whatever the target sends before the reply is out (banners) for the relay: target bytes never
overtake the reply. Domain names are resolved by the server's resolver, and the access rules see
each address (``CommandSession.allowed_addresses``); with several allowed addresses the attempts
follow RFC 8305 (``aiohappyeyeballs``, 250 ms stagger, address families interleaved). Failures
become reply codes through ``replycodes``; then the client connection is closed at once. With
``bind_out`` or the rule's ``via`` (``session.outgoing``, ``socksd.outgoing``) the connection
leaves from the address of the target's family; a target of another family gets 0x03.

Through an upstream proxy (``upstream``: the request's rule or the global ``upstream`` names one)
the target is not resolved or connected here: the upstream is, then the client library's
handshake asks it for the target, and its reply's BND is passed on; the relay is the same.

The common case, an IP literal going straight out, is started by the session with
:func:`connect_direct` instead: the same steps (same reply, BND, ``remote``, timeout reply,
metrics), driven by the loop's callbacks without a task of its own (:class:`DirectConnect`), as it
is what every short session pays for. Anything else (a name, an upstream) runs :func:`connect`.
"""

from __future__ import annotations

import asyncio
import socket
import time
from functools import partial
from typing import TYPE_CHECKING

import aiohappyeyeballs

from socksd.outgoing import unbound_port_socket
from socksd.protocol import Address, AddressType, ReplyCode, format_hostport
from socksd.resolver import AddrInfo
from socksd.server.commands.base import timed
from socksd.server.commands.replycodes import answer_failure
from socksd.server.commands.upstream import UpstreamFailure, connect_upstream
from socksd.server.dataplane.relay import Holding
from socksd.server.handshake.admission import Refusal

if TYPE_CHECKING:
    from socksd.accesslog import SessionRecord
    from socksd.client.proxy import Proxy
    from socksd.outgoing import SourceAddresses
    from socksd.server.commands.base import CommandSession

HAPPY_EYEBALLS_DELAY = 0.25


def literal_addrinfo(address: Address) -> list[AddrInfo]:
    """The one addrinfo entry of an IP literal address (no lookup)."""
    if address.atyp == AddressType.IPV6:
        return [
            (
                socket.AF_INET6,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (address.host, address.port, 0, 0),
            )
        ]
    return [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address.host, address.port))
    ]


async def open_target(
    infos: list[AddrInfo],
    timeout: float,
    record: SessionRecord,
    held: Holding | None = None,
    source: SourceAddresses | None = None,
) -> Holding:
    """The connection to the first reachable of ``infos``, holding what it delivers (in
    ``held``, when given: an upstream's connection), from ``source``'s address of each one's
    family when given (``bind_out``/``via``: the others are not tried)."""
    loop = asyncio.get_running_loop()
    held = held or Holding()
    if source is not None:
        infos = source.usable(infos)
    async with asyncio.timeout(timeout):
        if len(infos) == 1:
            family, _, _, _, sockaddr = infos[0]
            record.remote = format_hostport(sockaddr[0], sockaddr[1])
            if source is None:
                await loop.create_connection(lambda: held, sockaddr[0], sockaddr[1], family=family)
                return held
        sock = await aiohappyeyeballs.start_connection(
            infos,
            local_addr_infos=None if source is None else source.addr_infos,
            happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
            interleave=1,
            socket_factory=None if source is None else unbound_port_socket,
        )
    await loop.create_connection(lambda: held, sock=sock)
    return held


async def connect(session: CommandSession, address: Address) -> None:
    """Carry out one CONNECT request."""
    config, metrics = session.config, session.metrics
    bound: Address | None = None  # the upstream's BND
    infos: list[AddrInfo] = []
    try:
        upstream = session.upstream()
        if upstream is None:
            if address.atyp == AddressType.DOMAIN:
                resolving = session.resolver.resolve(address.host, address.port)
                infos = await (resolving if metrics is None else timed(resolving, metrics.resolved))
                allowed = session.allowed_addresses(address, infos)  # the rules, by address
                if isinstance(allowed, Refusal):
                    session.refuse(allowed)
                    return
                infos = allowed
                upstream = session.upstream()  # the rule the addresses matched may name one
            else:
                infos = literal_addrinfo(address)
        if upstream is None:
            opening = open_target(
                infos, config.connect_timeout, session.record, source=session.outgoing
            )
            held = await (opening if metrics is None else timed(opening, metrics.connected))
        else:
            connector = partial(open_to_upstream, session, upstream.proxy)
            chaining = connect_upstream(upstream, address, config.connect_timeout, connector)
            held, bound = await (
                chaining if metrics is None else timed(chaining, metrics.connected)
            )
    except asyncio.CancelledError:
        raise
    except Exception as e:  # every failure is a reply code, never a crash
        _failed(session, e, config.connect_timeout)
        return
    exact = session.record.remote is not None and len(infos) <= 1 and bound is None
    _established(session, held, bound, exact)


def _established(
    session: CommandSession, held: Holding, bound: Address | None, remote_known: bool
) -> None:
    """The outgoing connection is up: reply with its BND (``bound``: the upstream's; None: the
    connection's local address) and relay. ``remote_known``: the access log's ``remote`` is
    already the address connected to; otherwise it is asked of the connection."""
    target = held.transport
    assert target is not None
    if session.closed:  # the client left while the connection was being made
        target.close()
        return
    if not remote_known:
        session.record.remote = _peer(target)
    if bound is None:
        bound = Address.of(*target.get_extra_info("sockname")[:2])
    session.reply(ReplyCode.SUCCEEDED, bound)
    session.start_relay(held)


def _failed(session: CommandSession, exc: BaseException, timeout: float) -> None:
    """Answer a failed connection attempt with its reply code and close."""
    if isinstance(exc, UpstreamFailure):
        session.fail(exc.reply, str(exc))
    else:
        answer_failure(session, "CONNECT", exc, _describe(exc, timeout))


def connect_direct(session: CommandSession, address: Address) -> DirectConnect | None:
    """Start the CONNECT of an IP literal that goes straight to the target (no upstream):
    what :func:`connect` does, without a task (:class:`DirectConnect`). None: any other
    request, for :func:`connect` (names, upstreams, a source address from ``bind_out`` or
    ``via``)."""
    if address.atyp == AddressType.DOMAIN or session.outgoing is not None:
        return None
    try:
        if session.upstream() is not None:
            return None
    except UpstreamFailure:
        return None  # connect() answers it
    return DirectConnect(session, address)


class DirectConnect:
    """A CONNECT to one IP address, driven by the loop's callbacks instead of a task.

    The literal address needs no lookup, no rule by address and no Happy Eyeballs, so all there
    is to wait for is the loop's ``create_connection``. Its coroutine is stepped here, as a task
    would step it (each future it waits on resumes it from that future's done callback), which
    spares a task, its scheduling and its registration, and the connect timeout is a deadline in
    the server's shared queue (``CommandSession.deadlines``) instead of ``asyncio.timeout``. It
    offers what the session asks of a running command's task: ``done()`` and ``cancel()``.
    """

    __slots__ = ("_coro", "_deadlines", "_done", "_held", "_session", "_started", "_timed_out")

    def __init__(self, session: CommandSession, address: Address) -> None:
        self._session = session
        self._held = held = Holding()
        self._done = self._timed_out = False
        metrics = session.metrics
        self._started = time.monotonic() if metrics is not None else 0.0
        session.record.remote = format_hostport(address.host, address.port)
        family = socket.AF_INET6 if address.atyp == AddressType.IPV6 else socket.AF_INET
        self._coro = asyncio.get_running_loop().create_connection(
            lambda: held, address.host, address.port, family=family
        )
        self._deadlines = session.deadlines(session.config.connect_timeout, DirectConnect.expire)
        self._deadlines.add(self)
        self._step()

    def done(self) -> bool:
        """The connection attempt has ended (whatever its outcome)."""
        return self._done

    def cancel(self) -> None:
        """Stop the attempt (the client left): what it opened is closed, nothing is answered."""
        if not self._done:
            self._throw(asyncio.CancelledError())

    def expire(self) -> None:
        """The connect timeout: the attempt fails with reply 0x06."""
        if not self._done:
            self._timed_out = True
            self._throw(asyncio.CancelledError())

    def _throw(self, exc: BaseException) -> None:
        try:
            waiting = self._coro.throw(exc)
        except StopIteration:  # it caught the exception and returned: an odd success
            self._end(None)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            self._end(e)
        else:
            self._wait(waiting)

    def _step(self, _: object = None) -> None:
        if self._done:
            return
        try:
            waiting = self._coro.send(None)
        except StopIteration:
            self._end(None)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            self._end(e)
        else:
            self._wait(waiting)

    def _wait(self, waiting: object) -> None:
        """Resume the coroutine when what it yielded is done (a bare yield: at once)."""
        if isinstance(waiting, asyncio.Future):
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(self._step)
        else:
            asyncio.get_running_loop().call_soon(self._step)

    def _end(self, exc: BaseException | None) -> None:
        self._done = True
        self._deadlines.discard(self)
        session = self._session
        metrics = session.metrics
        if exc is None:
            if metrics is not None:
                metrics.connected(time.monotonic() - self._started, True)
            _established(session, self._held, None, True)
            return
        if isinstance(exc, asyncio.CancelledError):
            if not self._timed_out:
                return  # cancelled: the session is ending anyway
            exc = TimeoutError()
        if metrics is not None:
            metrics.connected(time.monotonic() - self._started, False)
        _failed(session, exc, session.config.connect_timeout)


async def open_to_upstream(session: CommandSession, proxy: Proxy, held: Holding) -> None:
    """The TCP connection to an upstream proxy (its name through socksd's resolver)."""
    where = Address.of(proxy.host, proxy.port)
    if where.atyp == AddressType.DOMAIN:
        infos = await session.resolver.resolve(where.host, where.port)
    else:
        infos = literal_addrinfo(where)
    await open_target(infos, session.config.connect_timeout, session.record, held, session.outgoing)


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return format_hostport(str(peer[0]), peer[1])


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"connect timeout after {timeout:g}s"
    return str(exc) or type(exc).__name__
