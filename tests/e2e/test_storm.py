"""Storms of short sessions in the pattern that crashes naive uvloop relays (docs/design-notes.md).

Each session: pipelined handshake, payload, client half-close first (as curl and browsers do), read
the echo until EOF. The server must answer every session correctly and still be alive afterwards,
on uvloop, on the default loop, and with two workers.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.servers import ServerProcess

SESSIONS = 1500
CONCURRENCY = 32


async def _echo_server() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _session(proxy_port: int, target_port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
    try:
        request = (
            b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", target_port)
        )
        writer.write(request + payload)
        writer.write_eof()
        head = await reader.readexactly(2 + 10)
        assert head[:2] == b"\x05\x00", head
        assert head[2:4] == b"\x05\x00", head
        return await reader.read(-1)
    finally:
        writer.close()


async def _storm(proxy_port: int) -> tuple[int, int]:
    target = await _echo_server()
    target_port = target.sockets[0].getsockname()[1]
    semaphore = asyncio.Semaphore(CONCURRENCY)
    ok = 0
    failures = 0

    async def one(i: int) -> None:
        nonlocal ok, failures
        payload = os.urandom(64) + str(i).encode()
        async with semaphore:
            try:
                echoed = await asyncio.wait_for(_session(proxy_port, target_port, payload), 20)
            except (OSError, AssertionError, asyncio.IncompleteReadError, TimeoutError):
                failures += 1
                return
            if echoed == payload:
                ok += 1
            else:
                failures += 1

    async with asyncio.timeout(180):
        await asyncio.gather(*(one(i) for i in range(SESSIONS)))
    target.close()
    return ok, failures


@pytest.mark.parametrize(
    "args",
    [("--loop", "uvloop"), ("--loop", "asyncio"), ("--loop", "uvloop", "--workers", "2")],
    ids=["uvloop", "asyncio", "uvloop-2-workers"],
)
def test_half_close_storm(
    socksd: Callable[..., ServerProcess], args: tuple[str, ...], tmp_path: Path
) -> None:
    access = tmp_path / "access.log"
    server = socksd(*args, "--access-log", str(access))
    ok, failures = asyncio.run(_storm(server.port))
    assert server.alive(), server.log()
    assert (ok, failures) == (SESSIONS, 0), server.log()[-2000:]
    # every session was closed on the server side too (one access-log line each, all complete)
    wait_for(lambda: access.read_text().count("\n") >= SESSIONS, 15)
    lines = access.read_text().splitlines()
    assert len(lines) == SESSIONS
    assert all(" rep=0x00 " in line and " up=" in line and "error=" not in line for line in lines)
    assert "double free" not in server.log() and "Traceback" not in server.log()
