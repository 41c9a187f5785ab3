"""What an upstream hop costs: socksd -> socksd (username/password) beside each alone.

Rows, in one run: ``direct`` (socksd, no authentication), ``inner`` (socksd requiring a password:
the upstream, asked directly), ``chain`` (socksd with ``upstream = "inner"``: the client talks to
it without authentication, it logs in to ``inner``). Workloads: sessions/s (CONNECT, one byte
echoed, close; ``--concurrency`` clients) with the CPU time the row's server processes spent per
session (chain: the front and the inner one together), and an echoed bulk transfer (MB/s each
way). The clients are socksd's own asyncio client library in this process, so the session rates
are bounded by the client too: the CPU per session is the figure to compare.

    python3 bench/upstream_chain.py --reps 3 --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.support import add_user  # noqa: E402
from tests.servers import EchoServer, ServerProcess, start_server  # noqa: E402

from socksd.client import open_connection  # noqa: E402


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU time of the server process so far."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_session(url: str, port: int) -> None:
    reader, writer = await open_connection(url, "127.0.0.1", port)
    writer.write(b"x")
    await writer.drain()
    await reader.readexactly(1)
    writer.close()


async def session_rate(url: str, port: int, seconds: float, concurrency: int) -> float:
    done = 0
    end = time.monotonic() + seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < end:
            await one_session(url, port)
            done += 1

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / seconds


async def bulk(url: str, port: int, size: int) -> float:
    reader, writer = await open_connection(url, "127.0.0.1", port)
    chunk = os.urandom(1 << 20)
    start = time.monotonic()

    async def send() -> None:
        for _ in range(size // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()

    async def receive() -> int:
        got = 0
        while data := await reader.read(1 << 20):
            got += len(data)
        return got

    _, got = await asyncio.gather(send(), receive())
    writer.close()
    return got / (time.monotonic() - start) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bulk-mb", type=int, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="upstream-bench-"))
    users = tmp / "users"
    add_user(users, "alice", "pw")
    (tmp / "inner.pass").write_text("pw\n")
    echo = EchoServer()
    servers: list[ServerProcess] = []
    try:
        quiet = ("--access-log", "off", "--max-auth-failures", "0")
        direct = start_server(tmp, *quiet)
        inner = start_server(tmp, "--users", str(users), *quiet)
        conf = tmp / "chain.toml"
        conf.write_text(
            'access_log = "off"\nupstream = "inner"\n[upstreams.inner]\n'
            f'proxy = "socks5://alice@127.0.0.1:{inner.port}"\npassword_file = "inner.pass"\n'
        )
        chain = start_server(tmp, "--config", str(conf), "--listen", "127.0.0.1:0")
        servers += [direct, inner, chain]
        rows = {  # the URL, and the servers whose CPU a session of the row costs
            "direct": (f"socks5://127.0.0.1:{direct.port}", [direct]),
            "inner": (f"socks5://alice:pw@127.0.0.1:{inner.port}", [inner]),
            "chain": (f"socks5://127.0.0.1:{chain.port}", [chain, inner]),
        }
        results: dict[str, tuple[list[float], list[float], list[float]]] = {
            n: ([], [], []) for n in rows
        }
        for _ in range(args.reps):
            for name, (url, costs) in rows.items():  # interleaved: load shifts hit every row
                before = [cpu_seconds(s) for s in costs]
                rate = asyncio.run(session_rate(url, echo.port, args.duration, args.concurrency))
                sessions = rate * args.duration
                cpu = [cpu_seconds(s) - b for s, b in zip(costs, before, strict=True)]
                mbps = asyncio.run(bulk(url, echo.port, args.bulk_mb << 20))
                results[name][0].append(rate)
                results[name][1].append(1e6 * sum(cpu) / sessions)
                results[name][2].append(mbps)
        print(
            f"| row | sessions/s (median of {args.reps}) | server CPU us/session (median) "
            "| bulk echo MB/s (median) |"
        )
        print("|---|---|---|---|")
        for name, (rates, cpus, mbps) in results.items():
            print(
                f"| {name} | {statistics.median(rates):.0f} | {statistics.median(cpus):.0f} "
                f"| {statistics.median(mbps):.0f} |"
            )
    finally:
        for server in servers:
            server.stop()
        echo.close()


if __name__ == "__main__":
    main()
