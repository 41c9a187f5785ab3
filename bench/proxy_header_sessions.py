"""Sessions per second through one socksd, plain SOCKS vs behind a PROXY v2 header.

Starts ``socksd serve --proxy-protocol-from 127.0.2.0/24 --access-log off`` and a loopback echo
target, then runs rounds alternating the two kinds of client (asyncio, CONCURRENCY at a time):
plain from 127.0.1.N, and from 127.0.2.N (trusted) with a v2 header (what HAProxy sends) in the
same write as the greeting; N cycles over SOURCES addresses so TIME_WAIT never runs out of ports. Each session: greeting, CONNECT, 16 bytes echoed, close. Prints sessions/s per
round. Run: PYTHONPATH=src python3 bench/proxy_header_sessions.py [SECONDS_PER_ROUND]
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from socksd.protocol.proxy_header import ProxyCommand, build_v2

CONCURRENCY = 32
SOURCES = 64
ROUNDS = 4


async def echo_target() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def one(port: int, target: int, source: str, header: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(header + b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
    reply = await reader.readexactly(10)
    assert reply[1] == 0, reply
    writer.write(b"0123456789abcdef")
    assert await reader.readexactly(16) == b"0123456789abcdef"
    writer.close()
    await writer.wait_closed()


async def round_(port: int, target: int, proxied: bool, seconds: float) -> float:
    net = "127.0.2" if proxied else "127.0.1"
    header = (
        build_v2(ProxyCommand.PROXY, ("127.0.0.5", 4000), ("127.0.0.1", port)) if proxied else b""
    )
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await one(port, target, f"{net}.{done % SOURCES + 1}", header)
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.monotonic() - start)


async def main(seconds: float) -> None:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
    argv = [sys.executable, "-m", "socksd", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--proxy-protocol-from", "127.0.2.0/24", "--access-log", "off"]
    argv += ["--shutdown-timeout", "1"]
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        port = 0
        for _ in range(200):
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", Path(log.name).read_text())
            if found:
                port = int(found.group(1))
                break
            await asyncio.sleep(0.05)
        server = await echo_target()
        target = server.sockets[0].getsockname()[1]
        for proxied in (False, True) * ROUNDS:
            rate = await round_(port, target, proxied, seconds)
            print(f"{'PROXY v2 header' if proxied else 'plain          '}: {rate:7.0f} sessions/s")
        server.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 5.0))
