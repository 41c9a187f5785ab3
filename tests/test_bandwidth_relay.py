"""The rate-limited relay in one process, on real loopback TCP connections, on uvloop and asyncio.

These drive the awkward moments directly: data held for the bucket while the other side's buffer
is full, an EOF or a reset arriving while data is held, a reader that stops. Nothing may be lost,
the EOF must come after the data, the write buffer must stay bounded, and the relay must finish.

The relay's buckets read a :class:`~tests.helpers.FakeClock`: tokens come only when the test
advances it, so "paced" is checked exactly (never more bytes than the bucket allowed by the fake
time) and no test waits for real seconds of rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from socksd.limits import MIN_BURST, TokenBucket
from socksd.server.dataplane.bandwidth import ThrottledEndpoint
from socksd.server.dataplane.relay import Holding, Relay
from tests.helpers import FakeClock, await_for

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
    """Stands in for the session: the relay's owner."""

    def __init__(self, first_data: bytes = b"", client_eof: bool = False) -> None:
        self.client_transport: asyncio.Transport | None = None
        self.finished = asyncio.get_running_loop().create_future()
        self.first_data = first_data
        self.client_eof = client_eof

    def relay_finished(self, relay: Relay, error: str | None) -> None:
        if not self.finished.done():
            self.finished.set_result(error)


class Idle(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast_transport: Any = transport
        cast_transport.pause_reading()


@dataclass
class Rig:
    """A throttled relay between a client app socket and a target app socket, on a fake clock."""

    relay: Relay
    owner: Owner
    client_app: socket.socket
    target_app: socket.socket
    clock: FakeClock
    rate: float
    start: float

    def allowed(self) -> float:
        """The most bytes one direction's bucket can have granted by now (a full bucket at the
        start, then ``rate`` per second of fake time)."""
        return max(self.rate / 10, MIN_BURST) + self.rate * (self.clock.now - self.start)

    async def read_paced(self, sock: socket.socket, step: float = 0.05) -> bytes:
        """Read ``sock`` (non-blocking) to EOF, advancing the clock by ``step`` whenever it has
        nothing; at every read, what arrived must be within what the bucket allowed."""
        out = bytearray()
        async with asyncio.timeout(30):
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    self.clock.advance(step)
                    await asyncio.sleep(0.002)  # the relay runs; no cancelled read loses data
                    continue
                if not chunk:
                    return bytes(out)
                out += chunk
                assert len(out) <= self.allowed(), (len(out), self.allowed())


async def throttled(
    rate: float,
    high_water: int = 64 * 1024,
    first_data: bytes = b"",
    client_eof: bool = False,
    small_buffers: bool = False,
) -> Rig:
    """A throttled relay at ``rate`` bytes/s each way, its clock stopped until the test moves it."""
    loop = asyncio.get_running_loop()
    client_app, client_srv = tcp_pair()
    target_srv, target_app = tcp_pair()
    if small_buffers:  # so that the relay's own buffer, not the kernel's, fills up
        client_srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        client_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    owner = Owner(first_data, client_eof)
    clock = FakeClock()
    buckets = (TokenBucket(rate, clock()), TokenBucket(rate, clock()))
    endpoints = (ThrottledEndpoint(buckets[0], clock), ThrottledEndpoint(buckets[1], clock))
    relay = Relay(owner, high_water=high_water, endpoints=endpoints)  # as make_relay builds it
    transport, _ = await loop.connect_accepted_socket(Idle, client_srv)
    owner.client_transport = transport
    held = Holding()  # as a command opens the target, then starts the relay after its reply
    await loop.connect_accepted_socket(lambda: held, target_srv)
    relay.start(transport, held, first_data, client_eof)
    return Rig(relay, owner, client_app, target_app, clock, rate, clock())


async def read_all(sock: socket.socket, limit: float = 30) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(limit):
        while chunk := await loop.sock_recv(sock, 65536):
            out += chunk
    return bytes(out)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_held_data_resumes_after_backpressure(loop_name: str) -> None:
    """The client stops reading: the target side ends up paused with data held and the client
    side full; once the client reads again every byte arrives, and the relay's buffer stayed
    near its high-water mark."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await throttled(2_000_000, high_water=256 * 1024, small_buffers=True)
        data = bytes(range(256)) * 4096  # 1 MiB: more than the buffers on the way hold
        sending = loop.create_task(loop.sock_sendall(rig.target_app, data))
        transport = rig.relay.client.transport
        target = rig.relay.target
        assert transport is not None and isinstance(target, ThrottledEndpoint)
        peak = 0

        def held_and_blocked() -> bool:
            nonlocal peak
            peak = max(peak, transport.get_write_buffer_size())
            if target.held and target.blocked:
                return True
            rig.clock.advance(0.02)  # 40 kB: less than a read, so each read is partly held
            return False

        assert await await_for(held_and_blocked), (target.held, target.blocked)
        assert peak <= 2 * 256 * 1024, peak  # high water + one read
        received = loop.create_task(rig.read_paced(rig.client_app))
        await sending
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await received == data
        rig.client_app.close()
        rig.target_app.close()
        await asyncio.wait_for(rig.owner.finished, 10)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_eof_after_held_data(loop_name: str) -> None:
    """The target sends more than the bucket allows and half-closes: the client gets it all,
    paced, then the EOF; the other direction goes on."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await throttled(200_000)
        data = bytes(range(251)) * 400  # ~100 kB: five times what the bucket holds
        await loop.sock_sendall(rig.target_app, data)
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await rig.read_paced(rig.client_app) == data
        assert rig.clock.now - rig.start >= (len(data) - 20_000) / 200_000  # paced, not dumped
        await loop.sock_sendall(rig.client_app, b"reply after EOF")
        rig.client_app.shutdown(socket.SHUT_WR)
        assert await rig.read_paced(rig.target_app) == b"reply after EOF"
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        rig.client_app.close()
        rig.target_app.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_pipelined_data_and_eof_at_start(loop_name: str) -> None:
    """What the client sent with its request, EOF included, is held and paced like any read;
    the EOF reaches the target after the data."""

    async def main() -> None:
        first = bytes(range(199)) * 1000  # ~200 kB: five times what the bucket holds
        rig = await throttled(400_000, first_data=first, client_eof=True)
        client = rig.relay.client
        assert isinstance(client, ThrottledEndpoint)
        assert client.held and client.eof_pending
        assert await rig.read_paced(rig.target_app) == first
        assert rig.clock.now - rig.start >= (len(first) - 40_000) / 400_000
        rig.target_app.shutdown(socket.SHUT_WR)
        assert await read_all(rig.client_app) == b""
        assert await asyncio.wait_for(rig.owner.finished, 10) is None
        rig.client_app.close()
        rig.target_app.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reset_while_data_is_held_delivers_the_data_first(loop_name: str) -> None:
    """The target resets while data it sent is still held: the client gets that data, then
    the relay closes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await throttled(100_000)
        data = bytes(range(241)) * 200  # 48 kB, one read: the bucket grants 10 kB of it
        await loop.sock_sendall(rig.target_app, data)
        assert await await_for(lambda: rig.relay.down == len(data))  # all read by the relay
        target = rig.relay.target
        assert isinstance(target, ThrottledEndpoint)
        assert target.held  # the clock stands still: held until it moves
        rig.target_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rig.target_app.close()  # reset

        async def poke() -> None:
            """One byte from the client, read by the relay (and written to the target)."""
            up = rig.relay.up
            await loop.sock_sendall(rig.client_app, b"x")
            assert await await_for(lambda: rig.relay.up > up)

        for _ in range(100):  # writing to the target finds the reset
            await poke()
            if target.lost_pending:
                break
        assert target.lost_pending and target.held
        await poke()  # the client goes on sending: dropped, the target is gone
        assert await rig.read_paced(rig.client_app) == data
        await asyncio.wait_for(rig.owner.finished, 10)
        rig.client_app.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_upload_is_limited_too(loop_name: str) -> None:
    """The client-to-target direction has its own bucket: never more than it allows."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await throttled(500_000)
        data = b"u" * 400_000
        received = loop.create_task(rig.read_paced(rig.target_app))
        await loop.sock_sendall(rig.client_app, data)
        rig.client_app.shutdown(socket.SHUT_WR)
        assert await received == data
        assert rig.clock.now - rig.start >= (len(data) - 50_000) / 500_000
        rig.client_app.close()
        rig.target_app.close()
        await asyncio.wait_for(rig.owner.finished, 10)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_relay_forwards_all_the_bucket_allows(loop_name: str) -> None:
    """Not slower than the bucket either: each time the clock gives tokens, that many more bytes
    arrive, to the byte, and not one more (times and rates exact in binary floating point)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rig = await throttled(320_000)  # a 32,000-byte bucket; 1/16 s brings 20,000 tokens
        data = bytes(range(233)) * 1400  # ~326 kB
        sending = loop.create_task(loop.sock_sendall(rig.target_app, data))
        received = bytearray()

        def reached(expected: int) -> bool:
            with contextlib.suppress(BlockingIOError):
                while chunk := rig.client_app.recv(65536):
                    received.extend(chunk)
            return len(received) >= expected

        assert await await_for(partial(reached, 32_000))  # the full bucket, at once
        assert len(received) == 32_000
        for step in range(1, 12):
            rig.clock.advance(1 / 16)
            expected = 32_000 + step * 20_000
            assert await await_for(partial(reached, expected)), (step, len(received))
            assert len(received) == expected
        rest = loop.create_task(rig.read_paced(rig.client_app))
        await sending
        rig.target_app.shutdown(socket.SHUT_WR)
        assert bytes(received) + await rest == data
        rig.client_app.close()
        rig.target_app.close()
        await asyncio.wait_for(rig.owner.finished, 10)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_data_waiting_for_its_bucket_is_not_idle(loop_name: str) -> None:
    """One read held for longer than the idle timeout (the bucket lets it out slowly) keeps the
    session alive: the idle timeout counts bytes passed on, not only bytes read."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client_app, client_srv = tcp_pair()
        target_srv, target_app = tcp_pair()
        first = bytes(range(256)) * 600  # ~150 kB, held at once: 1.5 s at 100 kB/s
        owner = Owner(first, client_eof=True)
        buckets = (TokenBucket(100_000, time.monotonic()), TokenBucket(100_000, time.monotonic()))
        endpoints = (ThrottledEndpoint(buckets[0]), ThrottledEndpoint(buckets[1]))
        relay = Relay(owner, idle_timeout=0.4, endpoints=endpoints)
        transport, _ = await loop.connect_accepted_socket(Idle, client_srv)
        held = Holding()
        await loop.connect_accepted_socket(lambda: held, target_srv)
        relay.start(transport, held, first, True)
        assert await read_all(target_app) == first  # all of it, then the client's EOF
        target_app.shutdown(socket.SHUT_WR)
        assert await read_all(client_app) == b""
        assert await asyncio.wait_for(owner.finished, 10) is None  # not "idle for 0.4s"
        client_app.close()
        target_app.close()

    run(loop_name, main)
