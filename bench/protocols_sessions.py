"""Sessions per second through one socksd for each protocol it serves: SOCKS5, SOCKS4, HTTP CONNECT.

Starts ``socksd serve --protocols socks5,socks4,http --access-log off`` and a loopback echo target,
then runs rounds alternating the three kinds of client (asyncio on uvloop when installed,
CONCURRENCY at a time, from 127.0.1.N with N cycling over SOURCES addresses so TIME_WAIT never runs
out of ports). Each session: connect -> handshake -> CONNECT 127.0.0.1:echo (SOCKS5: no-auth
greeting then the request in one write each; SOCKS4: one request; HTTP: one ``CONNECT`` head) ->
32 bytes echoed -> close. Prints sessions/s and the server's CPU time per session (utime +
stime from /proc) per round, and the medians per protocol.

Run: PYTHONPATH=src python3 bench/protocols_sessions.py [SECONDS_PER_ROUND] [ROUNDS]
(under the shared bench lock: ``flock /tmp/socksd-bench.lock ...``).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENCY = 32
SOURCES = 64
PAYLOAD = bytes(range(32))
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


async def echo_target() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def socks5(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int) -> None:
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big"))
    reply = await reader.readexactly(10)
    assert reply[1] == 0, reply


async def socks4(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int) -> None:
    writer.write(struct.pack("!BBH4s", 4, 1, target, b"\x7f\0\0\1") + b"bench\0")
    reply = await reader.readexactly(8)
    assert reply[1] == 90, reply


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: int) -> None:
    where = f"127.0.0.1:{target}"
    writer.write(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n\r\n".encode())
    assert await reader.readexactly(len(ESTABLISHED)) == ESTABLISHED


HANDSHAKES = {"socks5": socks5, "socks4": socks4, "http": http}


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def round_(port: int, target: int, protocol: str, seconds: float) -> tuple[float, int]:
    handshake = HANDSHAKES[protocol]
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            source = f"127.0.1.{done % SOURCES + 1}"
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            await handshake(reader, writer, target)
            writer.write(PAYLOAD)
            assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
            writer.close()
            await writer.wait_closed()
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done / (time.monotonic() - start), done


async def main(seconds: float, rounds: int) -> None:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
    argv = [sys.executable, "-m", "socksd", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--protocols", "socks5,socks4,http", "--access-log", "off", "--shutdown-timeout", "1"]
    proc = subprocess.Popen(argv, stdout=log, stderr=log)
    rates: dict[str, list[float]] = {name: [] for name in HANDSHAKES}
    costs: dict[str, list[float]] = {name: [] for name in HANDSHAKES}
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
        for i in range(rounds):
            names = list(HANDSHAKES)
            for name in names[i % 3 :] + names[: i % 3]:  # rotate the order between rounds
                cpu = cpu_seconds(proc.pid)
                rate, done = await round_(port, target, name, seconds)
                cost = (cpu_seconds(proc.pid) - cpu) / done * 1e6
                rates[name].append(rate)
                costs[name].append(cost)
                print(
                    f"round {i + 1} {name:6}: {rate:7.0f} sessions/s, "
                    f"server {cost:5.0f} CPU-us/session",
                    flush=True,
                )
        server.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    base = statistics.median(rates["socks5"])
    base_cost = statistics.median(costs["socks5"])
    for name, values in rates.items():
        median = statistics.median(values)
        cost = statistics.median(costs[name])
        print(
            f"median {name:6}: {median:7.0f} sessions/s ({median / base:.2f} x socks5), "
            f"server {cost:4.0f} CPU-us/session ({cost / base_cost:.2f} x socks5)"
        )


if __name__ == "__main__":
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    run(main(seconds, int(sys.argv[2]) if len(sys.argv) > 2 else 4))
