"""The zero-copy relay (Linux): bytes move socket -> pipe -> socket with ``os.splice``.

A :class:`SpliceRelay` starts as the copying :class:`~socksd.server.dataplane.relay.Relay` (so
a short session costs nothing more: no dup, no pipe, no extra registration) and moves to splice
once one side has passed ``splice_after`` bytes on, at a moment when both transports' write
buffers are empty and no EOF has been seen (``_try_splice``, run from ``call_soon``: uvloop
flushes writes after the read callbacks of a loop turn). The check sits on the chunk path as one
comparison. Everything the copying phase handled first (the SOCKS reply, a target's banner held
by ``Holding``, the client's early data and EOF) has then reached the kernel, in order.

Moving a socket: the transports own their fds and neither loop accepts ``add_reader`` on a
transport's fd, so the relay ``dup``\\ s each fd, points the transport at a no-op protocol and
aborts it (both loops deregister the fd before closing it; the dup keeps the connection open).
From then on the relay drives the two raw non-blocking fds with ``add_reader``/``add_writer``;
a failed ``dup`` leaves the session on the copying relay.

Each direction (the endpoint it is read from) takes a pipe from the process's :class:`PipePool`
when data arrives and gives it back once empty, so an idle session holds none; a pipe still
holding bytes when its destination went away is closed, not pooled. The pool keeps at most
``POOL_IDLE`` spare pipes; pipes are resized to ``PIPE_SIZE`` (F_SETPIPE_SZ). When no pipe can be
had (out of file descriptors) the direction copies instead: ``recv`` of at most ``COPY_SIZE``
bytes, ``send`` to the peer, the next ``recv`` once all of it is out (one buffer held, as one
pipe would be); each read asks for a pipe again, so splicing resumes once descriptors are free.

Same behaviour as the copying relay:

- half-close: EOF from one side becomes ``shutdown(SHUT_WR)`` on the other once its pipe is
  empty; the other direction keeps flowing; a socket is closed as soon as both of its
  directions have ended (EOF read, write side shut down).
- backpressure: a direction whose destination does not take its pipe's bytes waits on the
  destination's writability; with the pipe full it stops reading the source. At most one pipe
  of data per direction is held, whatever the reader's speed.
- a reset or error on one side closes the other once what is in flight for it is delivered;
  ``relay_finished`` is called once, when both sockets are closed, with the first error.
- counts: ``received`` counts bytes read from a side (spliced into its pipe), the idle watch
  reads them as before; ``quiet_for`` asks the kernel (TCP_INFO) on the socket.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket

from socksd.client.gssapi import EncapsulatingTransport
from socksd.fdlimit import is_shortage, out_of_files
from socksd.server.dataplane.idle import tcp_quiet_for
from socksd.server.dataplane.relay import Holding, Relay, RelayEndpoint, RelayOwner

AVAILABLE = hasattr(os, "splice")
"""The platform has ``os.splice`` (Linux, Python 3.10+)."""

SPLICE_AFTER = 64 * 1024
"""Bytes one side passes on through the copying relay before the session moves to splice.
Moving at the first byte costs a short session a dup, two pipes and four registrations: a third
fewer sessions/s at 128 clients (measured); 64 KiB keeps them on the copying relay."""
RETRY_STEP = 256 * 1024
"""When the move was not possible (a write buffer not empty), bytes until it is tried again."""
PIPE_SIZE = 256 * 1024
"""Capacity asked of each pipe (F_SETPIPE_SZ); the kernel may keep its default. 64 KiB (the
default) cost about twice the CPU per GB with 8 streams; 1 MiB was no better than 256 KiB and
would spend the user's pipe budget (fs.pipe-user-pages-soft, 64 MiB) on 64 pipes."""
POOL_IDLE = 64
"""Spare pipes one process keeps for the next session; more are closed."""
COPY_SIZE = 64 * 1024
"""Bytes one read takes when a direction copies for want of a pipe."""

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FD_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)
_EMPTY = memoryview(b"")


class PipePool:
    """Spare pipes ``(read fd, write fd, capacity)`` of one process, at most ``idle_max`` kept."""

    __slots__ = ("idle", "idle_max", "live", "size")

    def __init__(self, idle_max: int = POOL_IDLE, size: int = PIPE_SIZE) -> None:
        self.idle: list[tuple[int, int, int]] = []
        self.idle_max = idle_max
        self.size = size
        self.live = 0
        """Pipes open, pooled or in use."""

    def take(self) -> tuple[int, int, int] | None:
        """An empty pipe; None when no fd is left."""
        if self.idle:
            return self.idle.pop()
        try:
            r, w = os.pipe()
        except OSError as e:
            if e.errno in _FD_SHORTAGE:
                out_of_files("splice: no pipe", e, "copying through user space instead")
                return None
            raise
        try:
            size = fcntl.fcntl(w, _SETPIPE_SZ, self.size)
        except OSError:  # over /proc/sys/fs/pipe-max-size or the user's pipe pages
            size = 65536
        self.live += 1
        return r, w, size

    def give(self, pipe: tuple[int, int, int]) -> None:
        """Take back an empty pipe."""
        if len(self.idle) < self.idle_max:
            self.idle.append(pipe)
        else:
            self.drop(pipe)

    def drop(self, pipe: tuple[int, int, int]) -> None:
        """Close a pipe (bytes may be left in it)."""
        self.live -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def forget(self) -> None:
        """In a forked child: the spare pipes are the parent's, not this process's."""
        for pipe in self.idle:
            self.drop(pipe)
        self.idle.clear()
        self.live = 0


POOL = PipePool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL.forget)


def _no_dup(exc: OSError) -> None:
    if is_shortage(exc):
        out_of_files("splice: no dup", exc, "the session stays on the copying relay")


_DETACHED = asyncio.Protocol()
"""What an aborted transport reports to once its socket is the splice relay's."""


class SplicingEndpoint(RelayEndpoint):
    """A side of a :class:`SpliceRelay`: copies until the move, then splices from its socket
    (through ``pipe``, ``held`` bytes in it; without a pipe, ``copied`` holds them) into its
    peer's."""

    __slots__ = ("check_at", "copied", "fd", "held", "pipe", "reading", "sock", "writing")

    relay: SpliceRelay
    peer: SplicingEndpoint

    def __init__(self) -> None:
        super().__init__()
        self.check_at = SPLICE_AFTER
        self.sock: socket.socket | None = None
        self.fd = -1
        self.pipe: tuple[int, int, int] | None = None
        self.copied = _EMPTY
        self.held = 0
        self.reading = False
        self.writing = False

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)  # type: ignore[union-attr]
        if self.received >= self.check_at:
            self.check_at = 1 << 62
            self.relay.want_splice()

    def quiet_for(self) -> float | None:
        """Seconds since data last arrived on this side's connection (TCP_INFO)."""
        return tcp_quiet_for(self.sock if self.sock is not None else self.transport)

    # -- after the move: raw fds -------------------------------------------------------------

    def take(self, transport: asyncio.Transport, family: int, fd: int) -> None:
        """Own ``fd`` (a dup of the transport's socket) instead of ``transport``."""
        self.sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        self.fd = fd
        self.transport = None
        transport.set_protocol(_DETACHED)
        transport.abort()

    def read_on(self, on: bool) -> None:
        """Watch (or stop watching) this side for data."""
        if on != self.reading and not self.lost:
            self.reading = on
            loop = self.relay.loop
            if on:
                loop.add_reader(self.fd, self.pump)
            else:
                loop.remove_reader(self.fd)

    def write_on(self, on: bool) -> None:
        """Watch (or stop watching) this side for room to write (the peer's pipe waits)."""
        if on != self.writing and not self.lost:
            self.writing = on
            loop = self.relay.loop
            if on:
                loop.add_writer(self.fd, self.peer.deliver)
            else:
                loop.remove_writer(self.fd)

    def pump(self) -> None:
        """This side is readable: splice into the pipe, then on to the peer."""
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = POOL.take()
            if pipe is None:  # no fd for a pipe: copy this read
                self.copy()
                return
        room = pipe[2] - self.held
        if room <= 0:
            n = -2
        else:
            try:
                n = os.splice(self.fd, pipe[1], room, flags=_FLAGS)
            except BlockingIOError:  # the socket is empty, or the pipe full (partial pages)
                n = -2 if self.held else -1
            except OSError as e:
                self.gone(e)
                return
        if n == 0:
            self.read_done = True
            self.read_on(False)
        elif n == -2:  # pipe full: read again once some of it has gone out
            self.read_on(False)
        elif n > 0:
            self.received += n
            self.held += n
        if not self.peer.writing:  # else the peer's writability calls deliver
            self.deliver()

    def copy(self) -> None:
        """No pipe: read into ``copied`` and pass it on; read again once it has all gone out."""
        try:
            data = self.sock.recv(COPY_SIZE)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.gone(e)
            return
        self.read_on(False)
        if data:
            self.received += len(data)
            self.held = len(data)
            self.copied = memoryview(data)
        else:
            self.read_done = True
        if not self.peer.writing:
            self.deliver()

    def deliver(self) -> None:
        """Splice what the pipe holds into the peer; wait for room, or end the direction."""
        peer = self.peer
        pipe = self.pipe
        if peer.lost:  # nowhere to go (the peer's close dropped the pipe)
            self.drop_pipe()
            return
        sent = 0
        if pipe is not None and self.held:
            try:
                sent = os.splice(pipe[0], peer.fd, self.held, flags=_FLAGS)
            except BlockingIOError:
                pass
            except OSError as e:
                peer.gone(e)
                return
            self.held -= sent
        elif self.held:  # copied for want of a pipe
            try:
                sent = peer.sock.send(self.copied)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                peer.gone(e)
                return
            self.held -= sent
            self.copied = self.copied[sent:] if self.held else _EMPTY
        if self.held:
            peer.write_on(True)
            if sent and not self.read_done and pipe and self.held <= pipe[2] // 2:  # room
                self.read_on(True)
            return
        peer.write_on(False)
        if pipe is not None:
            self.pipe = None
            POOL.give(pipe)
        if not self.read_done:
            self.read_on(True)
        else:
            self.ended()

    def ended(self) -> None:
        """Nothing more comes from this side and its pipe is empty: end the peer's write side."""
        peer = self.peer
        if peer.lost:
            return
        if self.lost or self.relay.closing:
            peer.shut()
            return
        if not peer.write_done:
            peer.write_done = True
            try:
                peer.sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
            except OSError as e:
                peer.gone(e)
                return
        if peer.read_done:
            peer.shut()
        if self.write_done and not self.lost:
            self.shut()

    def gone(self, exc: Exception) -> None:
        """This side's connection failed: close it; the peer gets what is in flight, then closes."""
        self.relay.note(exc)
        self.read_done = True
        self.shut()
        peer = self.peer
        peer.drop_pipe()
        if not peer.lost:
            peer.read_done = True
            peer.read_on(False)
            self.deliver() if self.held else self.ended()

    def drop_pipe(self) -> None:
        """The peer is closed: what this side's pipe holds is lost."""
        pipe = self.pipe
        self.copied = _EMPTY
        if pipe is None:
            self.held = 0
        else:
            self.pipe = None
            if self.held:
                self.held = 0
                POOL.drop(pipe)
            else:
                POOL.give(pipe)

    def shut(self) -> None:
        """Close this side's socket (no callbacks stay registered on it)."""
        if self.lost:
            return
        self.read_on(False)
        self.write_on(False)
        self.lost = True
        self.read_done = True
        peer = self.peer
        peer.drop_pipe()
        if not peer.lost:  # what the peer would send has nowhere to go
            peer.read_done = True
            peer.read_on(False)
        if self.sock is not None:
            self.sock.close()
        if peer.lost:
            self.drop_pipe()
            self.relay._finished(None)


class SpliceRelay(Relay):
    """A :class:`Relay` that moves to ``os.splice`` once a session carries bulk data."""

    __slots__ = ("_first_error", "_pending", "closing", "loop", "splice_after", "spliced")

    client: SplicingEndpoint
    target: SplicingEndpoint

    def __init__(
        self,
        owner: RelayOwner,
        *,
        high_water: int = 256 * 1024,
        idle_timeout: float = 0.0,
        splice_after: int = SPLICE_AFTER,
    ) -> None:
        super().__init__(
            owner,
            high_water=high_water,
            idle_timeout=idle_timeout,
            endpoints=(SplicingEndpoint(), SplicingEndpoint()),
        )
        self.loop = asyncio.get_running_loop()
        self.splice_after = splice_after
        self.client.check_at = self.target.check_at = splice_after
        self.spliced = False
        self.closing = False
        self._pending = False
        self._first_error: Exception | None = None

    def start(
        self,
        client: asyncio.Transport,
        held: Holding,
        first_data: bytes = b"",
        client_eof: bool = False,
    ) -> None:
        if isinstance(held.transport, EncapsulatingTransport):  # GSSAPI frames to an upstream
            self.splice_after = self.client.check_at = self.target.check_at = 1 << 62
        super().start(client, held, first_data, client_eof)
        if self.splice_after <= 0:
            self.want_splice()

    def want_splice(self) -> None:
        """Move to splice after this loop turn (when uvloop has flushed this turn's writes)."""
        if not self._pending and not self.spliced:
            self._pending = True
            self.loop.call_soon(self._try_splice)

    def _try_splice(self) -> None:
        self._pending = False
        if self.spliced or self._done:
            return
        client, target = self.client, self.target
        ready = True
        for e in (client, target):
            t = e.transport
            if (
                t is None
                or e.lost
                or e.read_done
                or e.write_done
                or t.is_closing()
                or t.get_write_buffer_size()
            ):
                ready = False
        if not ready:
            for e in (client, target):
                e.check_at = e.received + RETRY_STEP
            return
        ct, tt = client.transport, target.transport
        assert ct is not None and tt is not None
        csock, tsock = ct.get_extra_info("socket"), tt.get_extra_info("socket")
        if csock is None or tsock is None:
            return
        try:
            cfd = os.dup(csock.fileno())
        except OSError as e:
            _no_dup(e)
            return  # no fd to spare: stay on the copying relay
        try:
            tfd = os.dup(tsock.fileno())
        except OSError as e:
            os.close(cfd)
            _no_dup(e)
            return
        self.spliced = True
        client.take(ct, csock.family, cfd)
        target.take(tt, tsock.family, tfd)
        client.read_on(True)
        target.read_on(True)

    def note(self, exc: Exception) -> None:
        """Remember the first error (for ``relay_finished``)."""
        if self._first_error is None:
            self._first_error = exc

    def quiet_for(self) -> float | None:
        known = [q for q in (self.client.quiet_for(), self.target.quiet_for()) if q is not None]
        return min(known) if known else None

    def close(self, error: str | None = None) -> None:
        if not self.spliced:
            super().close(error)
            return
        if error and self._error is None:
            self._error = error
        self.closing = True
        for e in (self.client, self.target):
            if not e.lost:
                e.read_done = True
                e.read_on(False)
        for e in (self.client, self.target):
            if not e.held:
                e.ended()

    def abort(self, error: str) -> None:
        if not self.spliced:
            super().abort(error)
            return
        if self._error is None:
            self._error = error
        self.closing = True
        for e in (self.client, self.target):
            e.drop_pipe()
            e.shut()

    def _finished(self, exc: Exception | None) -> None:
        super()._finished(exc or self._first_error)
