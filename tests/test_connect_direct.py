"""CONNECT to an IP literal without a task (``DirectConnect``), in one process: the reply, the
access-log fields, the connect timeout from the shared deadline queue, a client that leaves."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from socksd.accesslog import SessionRecord
from socksd.config import Config, ListenAddress
from socksd.server.commands import connect as connect_module
from socksd.server.commands.connect import DirectConnect
from socksd.server.process.context import ServerContext
from socksd.server.process.listener import Server


class Recorder:
    """Stands in for the access log: keeps the records written."""

    enabled = True

    def __init__(self) -> None:
        self.records: list[SessionRecord] = []

    def write(self, record: SessionRecord) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass


async def start(**settings: Any) -> tuple[ServerContext, Server, int, Recorder]:
    config = dataclasses.replace(
        Config(), listen=(ListenAddress.parse("127.0.0.1:0"),), access_log="off", **settings
    )
    ctx = ServerContext.create(config)
    recorder = Recorder()
    ctx.access_log = recorder  # type: ignore[assignment]
    server = Server(ctx)
    await server.start(announce=False)
    return ctx, server, server.addresses[0][1], recorder


async def socks_connect(
    port: int, host: str, target_port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", target_port))
    return reader, writer


async def wait_until(check: Callable[[], bool]) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in 2s")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_direct_connect_replies_with_the_local_address_and_relays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[DirectConnect] = []

    class Counted(DirectConnect):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            started.append(self)
            super().__init__(*args)

    monkeypatch.setattr(connect_module, "DirectConnect", Counted)

    async def main() -> None:
        peers: list[tuple[str, int]] = []

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername"))
            while data := await reader.read(1024):
                writer.write(data)
            writer.close()

        target = await asyncio.start_server(echo, "127.0.0.1", 0)
        target_port = target.sockets[0].getsockname()[1]
        ctx, server, port, recorder = await start()
        reader, writer = await socks_connect(port, "127.0.0.1", target_port)
        reply = await reader.readexactly(10)
        (direct,) = started  # the session dropped it once the relay took over
        assert direct.done()
        assert reply[:4] == b"\x05\x00\x00\x01"
        # BND is the outgoing connection's own address: the one the target saw connecting.
        assert (socket.inet_ntoa(reply[4:8]), struct.unpack("!H", reply[8:])[0]) == peers[0]
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.write_eof()  # half-close: the target's answer still comes back
        assert await reader.read() == b""
        writer.close()
        await wait_until(lambda: bool(recorder.records))
        (record,) = recorder.records
        assert record.remote == f"127.0.0.1:{target_port}"
        assert record.target == f"127.0.0.1:{target_port}"
        assert (record.reply, record.bytes_up, record.bytes_down) == (0, 4, 4)
        assert len(ctx.deadlines(ctx.config.connect_timeout, DirectConnect.expire)) == 0
        await server.shutdown()
        target.close()

    run(main)


UNREACHED = "192.0.2.1"


class HangingConnect:
    """A loop's ``create_connection`` that never connects to ``UNREACHED`` (others go through);
    notes when it is cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.real = loop.create_connection

    async def __call__(self, factory: Any, host: str | None = None, *args: Any, **kw: Any) -> Any:
        if host != UNREACHED:
            return await self.real(factory, host, *args, **kw)
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("not reached")


def test_direct_connect_timeout_is_0x06(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hanging = HangingConnect(loop)
        monkeypatch.setattr(loop, "create_connection", hanging)
        _, server, port, recorder = await start(connect_timeout=0.2)
        reader, writer = await socks_connect(port, UNREACHED, 80)
        assert await reader.read() == b"\x05\x06\x00\x01" + bytes(6)  # the reply, then closed
        assert hanging.cancelled.is_set()
        await wait_until(lambda: bool(recorder.records))
        (record,) = recorder.records
        assert record.error == "connect timeout after 0.2s"
        assert record.remote == "192.0.2.1:80"
        writer.close()
        await server.shutdown()

    run(main)


def test_client_leaving_cancels_the_direct_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hanging = HangingConnect(loop)
        monkeypatch.setattr(loop, "create_connection", hanging)
        ctx, server, port, recorder = await start()
        _, writer = await socks_connect(port, UNREACHED, 80)
        await hanging.started.wait()
        (session,) = ctx.sessions
        assert isinstance(session.task, DirectConnect)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset: the session ends (an EOF alone would wait)
        await asyncio.wait_for(hanging.cancelled.wait(), 2)
        await wait_until(lambda: bool(recorder.records))
        (record,) = recorder.records
        assert record.reply is None  # nothing was answered
        assert session.task.done()
        assert len(ctx.deadlines(ctx.config.connect_timeout, DirectConnect.expire)) == 0
        await server.shutdown()

    run(main)


def test_only_a_literal_address_is_connected_without_a_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A domain name is resolved and its addresses checked by the rules: the task path."""
    started: list[DirectConnect] = []

    class Counted(DirectConnect):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            started.append(self)
            super().__init__(*args)

    monkeypatch.setattr(connect_module, "DirectConnect", Counted)

    async def main() -> None:
        _, server, port, recorder = await start()
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        closed_port = refused.getsockname()[1]
        for name in (b"localhost", b"127.0.0.1"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            request = b"\x05\x01\x00\x05\x01\x00\x03" + bytes((len(name),)) + name
            writer.write(request + struct.pack("!H", closed_port))
            assert (await reader.read())[:4] == b"\x05\x00\x05\x05"  # refused (0x05), closed
            writer.close()
        reader, writer = await socks_connect(port, "127.0.0.1", closed_port)
        assert (await reader.read())[:2] == b"\x05\x05"
        writer.close()
        refused.close()
        await wait_until(lambda: len(recorder.records) == 3)
        assert len(started) == 1  # the IPv4 literal only (a name, even an IP's text, resolves)
        await server.shutdown()

    run(main)
