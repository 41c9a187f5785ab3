"""The splice relay in one process, on real loopback TCP connections, on uvloop and asyncio.

Each test builds the relay as ``make_relay`` does for a plain session, between a client app
socket and a target app socket, and checks what the copying relay guarantees: every byte in
order, half-close each way, backpressure with a bounded amount held, errors reported, the idle
timeout, close/abort, and that pipes and fds are given back. ``after=0`` moves to splice at
``start``; the default moves once a side has passed ``SPLICE_AFTER`` bytes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from socksd import fdlimit
from socksd.config import Config, ConfigError, build_config
from socksd.limits import TokenBucket
from socksd.server.dataplane import splice
from socksd.server.dataplane.bandwidth import ThrottledEndpoint
from socksd.server.dataplane.relay import Holding, Relay
from socksd.server.dataplane.splice import POOL, SPLICE_AFTER, SpliceRelay
from socksd.server.dataplane.terms import RelayTerms, make_relay
from tests.helpers import await_for

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="os.splice is Linux only")

LOOPS = ["asyncio", "uvloop"]


def run(loop_name: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop_name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(main(), 60))
    else:
        asyncio.run(asyncio.wait_for(main(), 60))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


class Owner:
    """Stands in for the session: counts ``relay_finished`` calls."""

    def __init__(self) -> None:
        self.finished: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.calls = 0

    def relay_finished(self, relay: Relay, error: str | None) -> None:
        self.calls += 1
        if not self.finished.done():
            self.finished.set_result(error)


class Quiet(asyncio.Protocol):
    """The session's protocol until the relay starts (reading paused, like a command's)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]


@dataclass
class Rig:
    relay: SpliceRelay
    owner: Owner
    client_app: socket.socket
    target_app: socket.socket

    def close(self) -> None:
        self.client_app.close()
        self.target_app.close()


async def spliced_rig(
    after: int = 0,
    idle_timeout: float = 0.0,
    first_data: bytes = b"",
    client_eof: bool = False,
    banner: bytes = b"",
    small_buffers: bool = False,
) -> Rig:
    """A splice relay (as ``make_relay`` builds it) between two app sockets, started."""
    loop = asyncio.get_running_loop()
    client_app, client_srv = tcp_pair()
    target_srv, target_app = tcp_pair()
    if small_buffers:  # so that the relay's pipe, not the kernel's buffers, fills up
        client_srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        client_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    owner = Owner()
    relay = make_relay(owner, RelayTerms(idle_timeout, None, 256 * 1024, True))
    assert isinstance(relay, SpliceRelay)
    relay.splice_after = after
    relay.client.check_at = relay.target.check_at = after
    transport, _ = await loop.connect_accepted_socket(Quiet, client_srv)
    held = Holding()
    await loop.connect_accepted_socket(lambda: held, target_srv)
    if banner:
        target_app.send(banner)
        assert await await_for(lambda: held.size >= len(banner))
    if client_eof:
        client_app.shutdown(socket.SHUT_WR)
    transport.write(b"REPLY")  # the SOCKS reply: the first bytes the client must see
    relay.start(transport, held, first_data, client_eof)
    return Rig(relay, owner, client_app, target_app)


async def read_all(sock: socket.socket, limit: float = 30) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(limit):
        while chunk := await loop.sock_recv(sock, 65536):
            out += chunk
    return bytes(out)


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await loop.sock_recv(sock, n - len(out))
        assert chunk, "EOF too early"
        out += chunk
    return bytes(out)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(251)) * (n // 251) + b"x" * (n % 251)


@pytest.mark.parametrize("after", [0, SPLICE_AFTER])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_bytes_exact_both_ways(loop_name: str, after: int) -> None:
    """A few MiB each way at once arrive byte for byte, after the reply; the counts match."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await spliced_rig(after)
        up, down = pattern(3 << 20, 1), pattern(4 << 20, 2)

        async def send(sock: socket.socket, data: bytes) -> None:
            await loop.sock_sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)

        tasks = [
            loop.create_task(send(rig.client_app, up)),
            loop.create_task(send(rig.target_app, down)),
        ]
        got_up, got_down = await asyncio.gather(read_all(rig.target_app), read_all(rig.client_app))
        await asyncio.gather(*tasks)
        assert got_up == up
        assert got_down == b"REPLY" + down
        assert rig.relay.spliced
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        assert (rig.relay.up, rig.relay.down) == (len(up), len(down))
        assert rig.owner.calls == 1
        rig.close()

    run(loop_name, main)


@pytest.mark.parametrize("first", ["client", "target"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_half_close_each_way(loop_name: str, first: str) -> None:
    """One side half-closes: the other gets its data then EOF, and can still send back."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await spliced_rig()
        assert await read_exactly(rig.client_app, 5) == b"REPLY"
        assert await await_for(lambda: rig.relay.spliced)
        closer, other = (
            (rig.client_app, rig.target_app)
            if first == "client"
            else (rig.target_app, rig.client_app)
        )
        await loop.sock_sendall(closer, b"last words")
        closer.shutdown(socket.SHUT_WR)
        assert await read_all(other) == b"last words"
        answer = pattern(1 << 20, 3)
        await loop.sock_sendall(other, answer)  # the other direction still flows
        other.shutdown(socket.SHUT_WR)
        assert await read_all(closer) == answer
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        assert not rig.relay.client.reading and not rig.relay.target.reading
        assert rig.relay.client.lost and rig.relay.target.lost  # both sockets closed
        rig.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_banner_and_early_data_keep_their_place(loop_name: str) -> None:
    """A target's banner held before start reaches the client after the reply; the client's
    early data reaches the target first; then the session moves to splice."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await spliced_rig(first_data=b"EARLY", banner=b"SSH-2.0-banner\r\n")
        assert await read_exactly(rig.client_app, 21) == b"REPLYSSH-2.0-banner\r\n"
        assert await read_exactly(rig.target_app, 5) == b"EARLY"
        assert await await_for(lambda: rig.relay.spliced)
        await loop.sock_sendall(rig.target_app, b"after")
        assert await read_exactly(rig.client_app, 5) == b"after"
        rig.client_app.shutdown(socket.SHUT_WR)
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await read_all(rig.client_app) == b""
        assert await read_all(rig.target_app) == b""
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        assert (rig.relay.up, rig.relay.down) == (5, 16 + 5)
        rig.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_client_eof_at_start_stays_copying(loop_name: str) -> None:
    """A client that sent its data and EOF with the request: the target gets both; the session
    does not move (an EOF was seen) and the target's answer still arrives."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await spliced_rig(first_data=b"GET / HTTP/1.0\r\n\r\n", client_eof=True)
        assert await read_all(rig.target_app) == b"GET / HTTP/1.0\r\n\r\n"
        answer = pattern(300_000, 4)
        await loop.sock_sendall(rig.target_app, answer)
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await read_all(rig.client_app) == b"REPLY" + answer
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        assert not rig.relay.spliced
        rig.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_slow_reader_stops_reading_source(loop_name: str) -> None:
    """The client stops reading: the relay stops reading the target with at most one pipe's
    worth held; once the client reads again every byte arrives."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await spliced_rig(small_buffers=True)
        assert await read_exactly(rig.client_app, 5) == b"REPLY"
        data = pattern(8 << 20, 5)
        sending = loop.create_task(loop.sock_sendall(rig.target_app, data))
        target = rig.relay.target
        live = POOL.live
        assert await await_for(lambda: target.held > 0 and not target.reading and target.pipe)
        assert target.pipe is not None and target.held <= target.pipe[2]
        assert rig.relay.client.writing  # waiting for the client's room
        await asyncio.sleep(0.2)
        assert not target.reading and target.received < len(data)  # still stopped
        assert POOL.live <= live + 1
        received = loop.create_task(read_all(rig.client_app))
        await sending
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await received == data
        rig.client_app.shutdown(socket.SHUT_WR)
        assert await read_all(rig.target_app) == b""
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        rig.close()

    run(loop_name, main)


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("side", ["client", "target"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_reset_is_reported(loop_name: str, side: str) -> None:
    """A reset on either side ends the relay with an error; the other side is closed."""

    async def main() -> None:
        rig = await spliced_rig()
        assert await read_exactly(rig.client_app, 5) == b"REPLY"
        assert await await_for(lambda: rig.relay.spliced)
        victim, other = (
            (rig.client_app, rig.target_app)
            if side == "client"
            else (rig.target_app, rig.client_app)
        )
        reset(victim)
        with contextlib.suppress(ConnectionResetError):  # the other side sees its end
            assert await read_all(other) == b""
        error = await asyncio.wait_for(rig.owner.finished, 10)
        assert error is not None and "reset" in error.lower(), error
        assert rig.owner.calls == 1
        other.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_idle_timeout_fires(loop_name: str) -> None:
    async def main() -> None:
        rig = await spliced_rig(idle_timeout=0.2)
        assert await read_exactly(rig.client_app, 5) == b"REPLY"
        assert await await_for(lambda: rig.relay.spliced)
        error = await asyncio.wait_for(rig.owner.finished, 10)
        assert error == "idle for 0.2s"
        assert await read_all(rig.client_app) == b""
        assert await read_all(rig.target_app) == b""
        rig.close()

    run(loop_name, main)


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_close_and_abort(loop_name: str, how: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await spliced_rig()
        assert await read_exactly(rig.client_app, 5) == b"REPLY"
        assert await await_for(lambda: rig.relay.spliced)
        await loop.sock_sendall(rig.target_app, b"in flight")
        assert await read_exactly(rig.client_app, 9) == b"in flight"
        assert rig.relay.quiet_for() is not None  # TCP_INFO on the relay's own sockets
        if how == "close":
            rig.relay.close("shutting down")
        else:
            rig.relay.abort("deadline")
        assert await asyncio.wait_for(rig.owner.finished, 10) == (
            "shutting down" if how == "close" else "deadline"
        )
        assert await read_all(rig.client_app) == b""
        assert await read_all(rig.target_app) == b""
        assert rig.owner.calls == 1
        rig.close()

    run(loop_name, main)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("loop_name", LOOPS)
def test_pipes_go_back_no_fd_leak(loop_name: str) -> None:
    """Many spliced sessions leave no fd behind; idle pipes stay within the pool's cap."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        before = -1
        for i in range(41):
            if i == 1:  # after a first session: the loop's own lazily opened fds are open
                POOL.forget()
                await asyncio.sleep(0.05)
                before = open_fds()
            rig = await spliced_rig()
            data = pattern(200_000, i)
            await loop.sock_sendall(rig.client_app, data)
            rig.client_app.shutdown(socket.SHUT_WR)
            assert await read_all(rig.target_app) == data
            if i % 2:
                reset(rig.target_app)  # some sessions end with a reset
            else:
                rig.target_app.shutdown(socket.SHUT_WR)
            with_reply = await read_all(rig.client_app) if not i % 2 else b"REPLY"
            assert with_reply == b"REPLY"
            await asyncio.wait_for(rig.owner.finished, 10)
            assert rig.relay.spliced
            assert rig.relay.client.pipe is None and rig.relay.target.pipe is None
            rig.close()
        assert len(POOL.idle) <= POOL.idle_max
        assert POOL.live == len(POOL.idle)  # none left in use
        POOL.forget()
        await asyncio.sleep(0.05)  # transports' own sockets close on the next loop turn
        assert open_fds() == before

    run(loop_name, main)


def test_pool_caps_spare_pipes() -> None:
    pool = splice.PipePool(idle_max=2)
    pipes = [pool.take() for _ in range(4)]
    assert all(p is not None for p in pipes)
    for p in pipes:
        assert p is not None
        pool.give(p)
    assert len(pool.idle) == 2 and pool.live == 2
    pool.forget()
    assert pool.live == 0


@pytest.mark.parametrize("loop_name", LOOPS)
def test_plain_relay_where_splice_does_not_apply(loop_name: str) -> None:
    """``splice`` off, a bandwidth limit, or GSSAPI: the copying relays, as before."""

    async def main() -> None:
        owner = Owner()
        assert type(make_relay(owner, RelayTerms(0.0, None, 65536, False))) is Relay
        buckets = (TokenBucket(1e6, 0.0), TokenBucket(1e6, 0.0))
        limited = make_relay(owner, RelayTerms(0.0, buckets, 65536, True))
        assert type(limited) is Relay and isinstance(limited.client, ThrottledEndpoint)
        assert isinstance(make_relay(owner, RelayTerms(0.0, None, 65536, True)), SpliceRelay)

    run(loop_name, main)


def test_splice_config_key() -> None:
    assert Config().splice == "auto"
    assert build_config({"splice": "off"}, {}).splice == "off"
    assert build_config({}, {"splice": "ON"}).splice == "on"
    assert build_config({"splice": False}, {}).splice == "off"
    with pytest.raises(ConfigError, match="splice"):
        build_config({"splice": "sometimes"}, {})


@pytest.mark.parametrize("shortage", ["always", "then_free"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_no_pipe_copies_instead(
    loop_name: str, shortage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of fds for pipes (os.pipe fails with EMFILE): a spliced session keeps relaying by
    copying, every byte in order both ways with a slow reader, one log line; once pipes can be
    had again it splices again."""
    real_pipe = os.pipe
    calls = {"n": 0}

    def no_pipe() -> tuple[int, int]:
        calls["n"] += 1
        if shortage == "then_free" and calls["n"] > 20:
            return real_pipe()
        raise OSError(errno.EMFILE, "Too many open files")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        POOL.forget()
        monkeypatch.setattr(splice.os, "pipe", no_pipe)
        monkeypatch.setattr(fdlimit, "_shortages", {})
        rig = await spliced_rig(small_buffers=True)
        assert await await_for(lambda: rig.relay.spliced)
        up, down = pattern(3 << 20, 3), pattern(5 << 20, 4)

        async def send(sock: socket.socket, data: bytes) -> None:
            await loop.sock_sendall(sock, data)
            sock.shutdown(socket.SHUT_WR)

        async def slow_read(sock: socket.socket) -> bytes:
            await asyncio.sleep(0.3)  # the relay's buffer fills up and waits
            return await read_all(sock)

        tasks = [
            loop.create_task(send(rig.client_app, up)),
            loop.create_task(send(rig.target_app, down)),
        ]
        got_up, got_down = await asyncio.gather(read_all(rig.target_app), slow_read(rig.client_app))
        await asyncio.gather(*tasks)
        assert got_up == up
        assert got_down == b"REPLY" + down
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        assert (rig.relay.up, rig.relay.down) == (len(up), len(down))
        assert calls["n"] > 2  # asked again at reads
        if shortage == "then_free":
            assert POOL.live > 0  # spliced again once pipes could be had
        rig.close()
        POOL.forget()

    with caplog.at_level(logging.WARNING, logger="socksd"):
        run(loop_name, main)
    lines = [r.getMessage() for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "splice: no pipe" in lines[0]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_no_dup_stays_copying(
    loop_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of fds at the move (os.dup fails with EMFILE): the session stays on the copying
    relay, every byte arrives, nothing leaks, one log line."""

    def no_dup(fd: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(splice.os, "dup", no_dup)
        monkeypatch.setattr(fdlimit, "_shortages", {})
        rig = await spliced_rig()
        data = pattern(1 << 20, 6)
        await loop.sock_sendall(rig.client_app, data)
        rig.client_app.shutdown(socket.SHUT_WR)
        assert await read_all(rig.target_app) == data
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await read_all(rig.client_app) == b"REPLY"
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        assert not rig.relay.spliced
        rig.close()

    with caplog.at_level(logging.WARNING, logger="socksd"):
        run(loop_name, main)
    lines = [r.getMessage() for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert len(lines) == 1 and "splice: no dup" in lines[0], lines
