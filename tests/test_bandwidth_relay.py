"""The rate-limited relay in one process, on real loopback TCP connections, on uvloop and asyncio.

The e2e tests measure rates; these drive the awkward moments directly: data held for the bucket
while the other side's buffer is full, an EOF or a reset arriving while data is held, a reader
that stops. Nothing may be lost, the EOF must come after the data, the write buffer must stay
bounded, and the relay must finish.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from socksd.limits import TokenBucket
from socksd.server.bandwidth import ThrottledEndpoint
from socksd.server.relay import Relay
from socksd.server.relays import RelayTerms, make_relay

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
    """Stands in for the session: starts the relay when the target is connected."""

    def __init__(self, first_data: bytes = b"", client_eof: bool = False) -> None:
        self.client_transport: asyncio.Transport | None = None
        self.finished = asyncio.get_running_loop().create_future()
        self.first_data = first_data
        self.client_eof = client_eof

    def target_connected(self, relay: Relay, transport: asyncio.Transport) -> None:
        assert self.client_transport is not None
        relay.start(self.client_transport, self.first_data, self.client_eof)

    def relay_finished(self, relay: Relay, error: str | None) -> None:
        if not self.finished.done():
            self.finished.set_result(error)


class Idle(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast_transport: Any = transport
        cast_transport.pause_reading()


async def throttled(
    rate: float,
    high_water: int = 64 * 1024,
    first_data: bytes = b"",
    client_eof: bool = False,
    small_buffers: bool = False,
) -> tuple[Relay, Owner, socket.socket, socket.socket]:
    """A throttled relay (the factory's) between a client app socket and a target app socket."""
    loop = asyncio.get_running_loop()
    client_app, client_srv = tcp_pair()
    target_srv, target_app = tcp_pair()
    if small_buffers:  # so that the relay's own buffer, not the kernel's, fills up
        client_srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        client_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    owner = Owner(first_data, client_eof)
    now = time.monotonic()
    relay = make_relay(
        owner, RelayTerms(0.0, (TokenBucket(rate, now), TokenBucket(rate, now)), high_water)
    )
    transport, _ = await loop.connect_accepted_socket(Idle, client_srv)
    owner.client_transport = transport
    await loop.connect_accepted_socket(lambda: relay.target, target_srv)
    return relay, owner, client_app, target_app


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
        relay, owner, client_app, target_app = await throttled(
            2_000_000, high_water=256 * 1024, small_buffers=True
        )
        data = bytes(range(256)) * 4096 * 4  # 4 MiB
        sending = loop.create_task(loop.sock_sendall(target_app, data))
        peak = 0
        states = set()
        for _ in range(75):  # 1.5 s without reading
            await asyncio.sleep(0.02)
            transport = relay.client.transport
            assert transport is not None
            peak = max(peak, transport.get_write_buffer_size())
            target = relay.target
            assert isinstance(target, ThrottledEndpoint)
            states.add((bool(target.held), target.blocked))
        assert (True, True) in states, states  # held data while the client side was full
        assert peak <= 2 * 256 * 1024, peak  # high water + one read
        received = loop.create_task(read_all(client_app))
        await sending
        target_app.shutdown(socket.SHUT_WR)
        assert await received == data
        client_app.close()
        target_app.close()
        await asyncio.wait_for(owner.finished, 10)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_eof_after_held_data(loop_name: str) -> None:
    """The target sends more than the bucket allows and half-closes: the client gets it all,
    paced, then the EOF; the other direction goes on."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _, owner, client_app, target_app = await throttled(200_000)
        data = bytes(range(251)) * 1200  # ~300 kB: more than the bucket holds
        await loop.sock_sendall(target_app, data)
        target_app.shutdown(socket.SHUT_WR)
        start = time.monotonic()
        assert await read_all(client_app) == data
        assert time.monotonic() - start > 0.8  # paced, not dumped
        await loop.sock_sendall(client_app, b"reply after EOF")
        client_app.shutdown(socket.SHUT_WR)
        assert await read_all(target_app) == b"reply after EOF"
        assert await asyncio.wait_for(owner.finished, 10) is None
        client_app.close()
        target_app.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_pipelined_data_and_eof_at_start(loop_name: str) -> None:
    """What the client sent with its request, EOF included, is held and paced like any read;
    the EOF reaches the target after the data."""

    async def main() -> None:
        first = bytes(range(199)) * 1000  # ~200 kB at 100 kB/s
        relay, owner, client_app, target_app = await throttled(
            100_000, first_data=first, client_eof=True
        )
        client = relay.client
        assert isinstance(client, ThrottledEndpoint)
        assert client.held and client.eof_pending
        start = time.monotonic()
        assert await read_all(target_app) == first
        assert time.monotonic() - start > 1.2
        target_app.shutdown(socket.SHUT_WR)
        assert await read_all(client_app) == b""
        assert await asyncio.wait_for(owner.finished, 10) is None
        client_app.close()
        target_app.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reset_while_data_is_held_delivers_the_data_first(loop_name: str) -> None:
    """The target resets while data it sent is still held: the client gets that data, then
    the relay closes."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        relay, owner, client_app, target_app = await throttled(100_000)
        data = bytes(range(241)) * 1000
        await loop.sock_sendall(target_app, data)
        async with asyncio.timeout(10):
            while relay.down < len(data):  # all of it read by the relay
                await asyncio.sleep(0.01)
        target_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        target_app.close()  # reset
        target = relay.target
        assert isinstance(target, ThrottledEndpoint)
        async with asyncio.timeout(10):
            while not target.lost_pending:  # writing to the target finds the reset
                await loop.sock_sendall(client_app, b"x")
                await asyncio.sleep(0.05)
        assert target.held
        assert await read_all(client_app) == data
        await asyncio.wait_for(owner.finished, 10)
        client_app.close()

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_upload_is_limited_too(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        _, owner, client_app, target_app = await throttled(500_000)
        data = b"u" * 1_000_000
        start = time.monotonic()
        sending = loop.create_task(loop.sock_sendall(client_app, data))
        received = bytearray()
        async with asyncio.timeout(30):
            while len(received) < len(data):
                received += await loop.sock_recv(target_app, 65536)
        elapsed = time.monotonic() - start
        await sending
        assert bytes(received) == data
        assert 1.6 < elapsed < 2.4, elapsed  # (1 MB - the first 50 kB burst) at 500 kB/s
        client_app.close()
        target_app.close()
        await asyncio.wait_for(owner.finished, 10)

    run(loop_name, main)
