"""The listener: binds the configured addresses, accepts sessions, shuts down gracefully.

``Server.start()`` binds every ``listen`` address and logs ``listening on HOST:PORT`` once each
accepts connections (scripts wait for that line; with port 0 it shows the port picked).
``Server.shutdown()`` stops accepting, lets open sessions finish until the shutdown deadline, then
aborts what is left.

Out of file descriptors (EMFILE, ENFILE): uvloop (libuv) accepts and closes the waiting
connections at once (with a descriptor it keeps in reserve for that) and goes on serving; nothing
is logged, libuv does not say. Should another thread take the reserve's slot at that instant,
libuv cannot reopen it and the listener spins while no descriptor is free, so socksd's threads do
not wait in a blocking accept() (which holds a descriptor: the control socket polls first). asyncio's selector loop stops accepting for one second
(``ACCEPT_RETRY_DELAY``) and tries again, which is the right idea, but up to Python 3.14 it keeps
calling ``accept()`` after the first failure, up to ``backlog`` times in the same burst, logging a
traceback and scheduling one more retry each time: thousands of log lines and timers a second. On
that loop the listening socket is an :class:`AcceptSocket`, which answers "nothing waiting" for
the rest of the burst after the first failure, so asyncio backs off once; its log entry becomes one
line a minute (:func:`quiet_accept_errors`, through ``fdlimit.out_of_files``). Connections
arriving meanwhile wait in the kernel's backlog.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from asyncio.selector_events import BaseSelectorEventLoop
from typing import Any

from socksd.config import Config, ConfigError, ListenAddress
from socksd.fdlimit import is_shortage, out_of_files
from socksd.protocol import format_hostport
from socksd.server.handshake.session import Session
from socksd.server.process.context import ServerContext

log = logging.getLogger("socksd")
# "listening on" lines are what scripts wait for: shown whatever the log level.
ready_log = logging.getLogger("socksd.listener")
ready_log.setLevel(logging.INFO)

LISTEN_BACKLOG = 4096


def bind_socket(
    address: ListenAddress, *, reuse_port: bool = False, port: int | None = None
) -> socket.socket:
    """A listening TCP socket on ``address`` (IPv6 sockets accept IPv6 only).

    ``reuse_port`` sets SO_REUSEPORT so that several worker processes can each have a socket on
    the same port (the kernel spreads connections over them); ``port`` overrides the address's.
    """
    infos = socket.getaddrinfo(
        address.host,
        address.port if port is None else port,
        type=socket.SOCK_STREAM,
        flags=socket.AI_PASSIVE,
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        _setup_listener(sock, family, sockaddr, reuse_port)
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"listen: cannot listen on {address}: {e.strerror or e}"
            + ("; is another server using it?" if e.errno == errno.EADDRINUSE else "")
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _setup_listener(sock: socket.socket, family: int, sockaddr: Any, reuse_port: bool) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(sockaddr)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)


_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class AcceptSocket(socket.socket):
    """A listening socket whose ``accept()`` fails once per burst when resources run out.

    After an accept fails with EMFILE/ENFILE/ENOBUFS/ENOMEM, further calls in the same event-loop
    step raise BlockingIOError ("nothing waiting"), so asyncio's accept loop stops there.
    """

    _exhausted = False

    @classmethod
    def adopt(cls, sock: socket.socket) -> AcceptSocket:
        """Take over ``sock``'s file descriptor (``sock`` is detached)."""
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def accept(self) -> tuple[socket.socket, Any]:
        if self._exhausted:
            raise BlockingIOError(errno.EAGAIN, "accept backing off")
        try:
            return super().accept()
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                self._exhausted = True
                asyncio.get_running_loop().call_soon(self._recovered)
            raise

    def _recovered(self) -> None:
        self._exhausted = False


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Exception handler: asyncio's accept back-off in one log line, the rest as usual."""
    exc = context.get("exception")
    if context.get("message") == "socket.accept() out of system resource":
        if isinstance(exc, OSError) and is_shortage(exc):
            out_of_files("accept", exc, "new connections wait in the listen queue")
        else:
            strerror = getattr(exc, "strerror", None) or str(exc)
            log.error("accept: %s; not accepting new connections for 1s", strerror)
        return
    handle = context.get("handle")
    if isinstance(exc, ValueError) and "_start_serving" in repr(handle):
        return  # a back-off retry that fired after the listener was closed (asyncio bug)
    loop.default_exception_handler(context)


def bind_for_workers(
    addresses: tuple[ListenAddress, ...],
    workers: int,
) -> list[list[socket.socket]]:
    """For each worker, one SO_REUSEPORT socket per address, all on the same ports.

    With port 0 the first socket picks the port and the others take the same one.
    """
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for address in addresses:
            first = bind_socket(address, reuse_port=True)
            port = first.getsockname()[1]
            per_worker[0].append(first)
            for i in range(1, workers):
                per_worker[i].append(bind_socket(address, reuse_port=True, port=port))
    except BaseException:
        for socks in per_worker:
            for sock in socks:
                sock.close()
        raise
    return per_worker


class Server:
    """A running socksd server: its listeners and its open sessions."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self._servers: list[asyncio.Server] = []

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) each listener is bound to."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((host, port))
        return out

    async def start(
        self, sockets: list[socket.socket] | None = None, *, announce: bool = True
    ) -> None:
        """Bind (or adopt the given pre-bound sockets) and start accepting sessions."""
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        if sockets is None:
            sockets = [bind_socket(address) for address in self.config.listen]
        if isinstance(loop, BaseSelectorEventLoop):
            sockets = [AcceptSocket.adopt(sock) for sock in sockets]
            loop.set_exception_handler(quiet_accept_errors)
        for sock in sockets:
            server = await loop.create_server(
                lambda: Session(ctx), sock=sock, backlog=LISTEN_BACKLOG
            )
            self._servers.append(server)
        if announce:
            for host, port in self.addresses:
                ready_log.info("listening on %s", format_hostport(host, port))

    def abort_all(self, reason: str) -> None:
        """Cut every open session now."""
        for session in list(self.ctx.sessions):
            session.abort(reason)

    async def shutdown(self) -> None:
        """Stop accepting, let sessions drain until the deadline, abort the rest."""
        for server in self._servers:
            server.close()
        sessions = self.ctx.sessions
        deadline = self.config.shutdown_timeout
        if sessions:
            log.info("shutting down: waiting up to %gs for %d sessions", deadline, len(sessions))
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while sessions and loop.time() < end:
            await asyncio.sleep(0.05)
        if sessions:
            log.warning("shutdown deadline reached: aborting %d sessions", len(sessions))
            self.abort_all("server shutdown deadline")
            await asyncio.sleep(0)
        for server in self._servers:
            await server.wait_closed()
        log.info("stopped")
