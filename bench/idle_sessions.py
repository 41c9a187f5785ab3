"""Idle sessions at scale: memory per established session held by ONE socksd process.

Starts ``socksd serve`` (one process, ``--access-log off``, ``--max-sessions`` above the count)
and a loopback echo target, then opens CONNECT sessions through socksd in steps (``--steps
5000,20000,50000``): each one from its own source address in 127.0.0.0/8 (the client socket is
bound to 127.X.Y.Z before it connects), greeting + request + 32 bytes in one write, the reply and
the echo read back. After each step it waits ``--hold`` seconds and reads socksd's Rss and Pss
from ``/proc/PID/smaps_rollup``: per session = (now - before the first session) / sessions. At
the end every session echoes 32 bytes once more (all of them still work, or the failures are
counted), the clients close, socksd is stopped with SIGTERM and its log is searched for errors.

Scale needs, and what the script does about them:

- open files: socksd holds two a session, the client and the echo target one each. The script
  raises RLIMIT_NOFILE (soft and hard, as root up to ``fs.nr_open``) before it starts anything;
  the children inherit it.
- ephemeral ports: socksd's connections to the target all leave from 127.0.0.1. Linux reuses a
  local port towards different destinations, so the echo target listens on several addresses
  (127.0.0.2 ... : one per 12,000 sessions).
- by default (``--netns auto``, as root) everything runs in a network namespace of its own
  (``unshare --net``, loopback up): its port range is widened to 1024-65535 there and the
  TIME_WAIT sockets the run leaves stay there, so nothing on the host is touched (no host
  sysctl is changed) and other loopback benchmarks do not wait for them to drain.

Bounded: at most ``MAX_SESSIONS`` sessions, ``--inflight`` handshakes at a time, ``--timeout``
seconds each, ``--deadline`` seconds in all; it stops only the processes it started.

Run (from the repository root):
    PYTHONPATH=src python3 bench/idle_sessions.py --steps 5000,20000,50000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_SESSIONS = 200_000
FILES_PER_SESSION = 2  # as socksd.fdlimit counts them: the client's socket and the target's
FILE_RESERVE = 64
SESSIONS_PER_TARGET = 12_000
"""Connections from socksd to one echo address (each needs its own local port)."""
NETNS_MARK = "SOCKSD_BENCH_IN_NETNS"
PAYLOAD = 32
LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() resets, so the client's side leaves no TIME_WAIT."""


# -- the network namespace and the limits ------------------------------------------------------


def enter_netns(argv: list[str]) -> int:
    """Run this script again in a new network namespace (root); return its exit status."""
    env = {**os.environ, NETNS_MARK: "1"}
    return subprocess.call(["unshare", "--net", "--", sys.executable, *argv], env=env)


def set_up_netns() -> None:
    """Inside the new namespace: loopback up, the whole port range for outgoing connections."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("1024 65535\n")


def raise_nofile(needed: int) -> int:
    """Raise RLIMIT_NOFILE to ``needed`` (both limits, when allowed); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        return needed
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- /proc ------------------------------------------------------------------------------------


def memory_kib(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1])
    return values["Rss:"], values["Pss:"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the echo target (a child process: ``--role echo``) --------------------------------------


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def echo_main(hosts: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Echo, host, 0, backlog=4096) for host in hosts]
    addresses = [
        f"{s.sockets[0].getsockname()[0]}:{s.sockets[0].getsockname()[1]}" for s in servers
    ]
    print("READY " + " ".join(addresses), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# -- the client --------------------------------------------------------------------------------


def source_ip(i: int) -> str:
    """Session ``i``'s own source address: 127.X.Y.Z, the second byte changing fastest."""
    return f"127.{1 + i % 254}.{(i // 254) % 256}.{1 + (i // (254 * 256)) % 254}"


def connect_request(host: str, port: int) -> bytes:
    """Greeting (no authentication) and CONNECT to an IPv4 target, in one write."""
    return b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


class Client(asyncio.Protocol):
    """One SOCKS client connection: counts what it received, wakes a waiter at a mark."""

    __slots__ = ("received", "transport", "waiter", "want")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.want = 0
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        waiter = self.waiter
        if waiter is not None and len(self.received) >= self.want and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"closed: {exc}"))

    async def expect(self, total: int, timeout: float) -> None:
        """Wait until ``total`` bytes in all have arrived."""
        if len(self.received) >= total:
            return
        self.want = total
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.waiter, timeout)
        finally:
            self.waiter = None


@dataclass
class Step:
    sessions: int
    open_s: float
    errors: dict[str, int]
    rss_kib: int
    pss_kib: int
    rss_per_session_kib: float
    pss_per_session_kib: float
    server_cpu_s: float
    server_files: int


@dataclass
class Report:
    netns: bool
    targets: list[str]
    nofile: int
    before_rss_kib: int
    before_pss_kib: int
    steps: list[Step] = field(default_factory=list)
    check_ok: int = 0
    check_errors: dict[str, int] = field(default_factory=dict)
    check_s: float = 0.0
    beyond_ok: int = 0
    beyond_refused: dict[str, int] = field(default_factory=dict)
    server_exit: int | None = None
    server_log_errors: list[str] = field(default_factory=list)
    server_log_warnings: int = 0
    server_log_warning_samples: list[str] = field(default_factory=list)


def count_error(errors: dict[str, int], exc: BaseException) -> None:
    key = type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) and exc.errno else "")
    errors[key] = errors.get(key, 0) + 1


async def open_sessions(
    proxy: tuple[str, int],
    targets: list[tuple[str, int]],
    clients: list[Client],
    count: int,
    args: argparse.Namespace,
    errors: dict[str, int],
    first: int | None = None,
) -> None:
    """Open sessions until ``clients`` holds ``count`` (failures are counted, not retried);
    ``first``: the index of the first new one (its source address)."""
    loop = asyncio.get_running_loop()
    next_index = len(clients) + sum(errors.values()) if first is None else first
    last = next_index + (count - len(clients))

    async def one(i: int) -> None:
        host, port = targets[i % len(targets)]
        payload = i.to_bytes(8, "big") * (PAYLOAD // 8)
        try:
            transport, client = await asyncio.wait_for(
                loop.create_connection(Client, *proxy, local_addr=(source_ip(i), 0)),
                args.timeout,
            )
            transport.write(connect_request(host, port) + payload)
            await client.expect(2 + 10 + PAYLOAD, args.timeout)
            got = bytes(client.received)
            if got[:4] != b"\x05\x00\x05\x00" or got[12:] != payload:
                raise ValueError(f"unexpected answer {got[:12].hex()}")
            del client.received[:]
            clients.append(client)
        except (OSError, TimeoutError, ValueError, ConnectionError, RuntimeError) as e:
            count_error(errors, e)

    async def worker() -> None:
        nonlocal next_index
        while next_index < last:
            i = next_index
            next_index += 1
            await one(i)

    await asyncio.gather(*(worker() for _ in range(args.inflight)))


async def check_sessions(
    clients: list[Client], args: argparse.Namespace
) -> tuple[int, dict[str, int]]:
    """Every session echoes ``PAYLOAD`` bytes once more; (working, errors by kind)."""
    errors: dict[str, int] = {}
    ok = 0
    queue = iter(clients)

    async def worker() -> None:
        nonlocal ok
        for client in queue:
            try:
                if client.transport is None:
                    raise ConnectionError("closed while idle")
                client.transport.write(b"k" * PAYLOAD)
                await client.expect(PAYLOAD, args.timeout)
                ok += 1
            except (OSError, TimeoutError, ConnectionError, RuntimeError) as e:
                count_error(errors, e)

    await asyncio.gather(*(worker() for _ in range(args.inflight)))
    return ok, errors


def close_all(clients: list[Client]) -> None:
    for client in clients:
        transport = client.transport
        if transport is None:
            continue
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()


async def drive(
    pid: int,
    proxy: tuple[str, int],
    targets: list[tuple[str, int]],
    args: argparse.Namespace,
    report: Report,
) -> None:
    clients: list[Client] = []
    errors: dict[str, int] = {}
    rss0, pss0 = report.before_rss_kib, report.before_pss_kib
    for count in args.steps:
        had = len(clients)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await open_sessions(proxy, targets, clients, count, args, errors)
        opened = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        await asyncio.sleep(args.hold)
        rss, pss = memory_kib(pid)
        n = len(clients)
        step = Step(
            sessions=n,
            open_s=round(opened, 2),
            errors=dict(errors),
            rss_kib=rss,
            pss_kib=pss,
            rss_per_session_kib=round((rss - rss0) / n, 2) if n else 0.0,
            pss_per_session_kib=round((pss - pss0) / n, 2) if n else 0.0,
            server_cpu_s=round(cpu, 2),
            server_files=open_files(pid),
        )
        report.steps.append(step)
        print(
            f"{n:7d} sessions (+{n - had} in {opened:.1f}s, socksd {cpu:.1f} CPU-s), "
            f"errors {sum(errors.values())} "
            f"{errors or ''}; Rss {rss} KiB, Pss {pss} KiB: "
            f"{step.rss_per_session_kib} / {step.pss_per_session_kib} KiB a session",
            flush=True,
        )
    if args.beyond:
        extra: list[Client] = []
        refused: dict[str, int] = {}
        first = len(clients) + sum(errors.values())
        await open_sessions(proxy, targets, extra, args.beyond, args, refused, first)
        report.beyond_ok, report.beyond_refused = len(extra), refused
        print(
            f"beyond max_sessions: {len(extra)} of {args.beyond} more sessions opened, "
            f"refused {refused or 0}",
            flush=True,
        )
        clients += extra
    t0 = time.monotonic()
    report.check_ok, report.check_errors = await check_sessions(clients, args)
    report.check_s = round(time.monotonic() - t0, 2)
    print(
        f"check: {report.check_ok} of {len(clients)} sessions echoed again in "
        f"{report.check_s}s; errors {report.check_errors or 0}",
        flush=True,
    )
    close_all(clients)
    clients.clear()
    # socksd closes its sides as the resets arrive: wait for its open files to drop back.
    deadline = time.monotonic() + 60
    while open_files(pid) > 64 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


# -- the processes ------------------------------------------------------------------------------


def wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"no {prefix!r} line from {proc.args!r}")


def wait_listening(log: Path, proc: subprocess.Popen[bytes], timeout: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on (127\.0\.0\.1):(\d+)", log.read_text(errors="replace"))
        if found:
            return found.group(1), int(found.group(2))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError("socksd did not start:\n" + log.read_text(errors="replace"))


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def files_for(sessions: int) -> int:
    """Open files socksd needs for ``sessions`` CONNECT sessions (fdlimit's budget)."""
    return FILES_PER_SESSION * sessions + FILE_RESERVE


def fit_steps(args: argparse.Namespace, nofile: int) -> None:
    """Check the steps against the open-files limit; with ``--fit`` lower the largest ones to
    what it holds."""
    most = (nofile - FILE_RESERVE) // FILES_PER_SESSION
    if args.steps[-1] <= most:
        return
    problem = (
        f"{args.steps[-1]} sessions need RLIMIT_NOFILE >= "
        f"{files_for(args.steps[-1])} for socksd; it is {nofile} here "
        "(raising the hard limit needs CAP_SYS_RESOURCE: ulimit -Hn, prlimit, LimitNOFILE=)"
    )
    if not args.fit:
        raise SystemExit(problem + "; --fit measures up to what it holds")
    print(f"warning: {problem}; measuring up to {most}", flush=True)
    args.steps = sorted({min(step, most) for step in args.steps})


def run(args: argparse.Namespace, netns: bool) -> Report:
    nofile = raise_nofile(files_for(args.steps[-1] + args.beyond) + 4096)
    fit_steps(args, nofile)
    total = args.steps[-1]
    targets_n = max(1, -(-(total + args.beyond) // SESSIONS_PER_TARGET))
    hosts = [f"127.0.0.{2 + k}" for k in range(targets_n)]
    echo = subprocess.Popen(
        [sys.executable, __file__, "--role", "echo", *hosts], stdout=subprocess.PIPE, text=True
    )
    tmp = tempfile.TemporaryDirectory(prefix="socksd-idle-")
    log = Path(tmp.name) / "socksd.log"
    server: subprocess.Popen[bytes] | None = None
    try:
        ready = wait_line(echo, "READY", 30).split()[1:]
        targets = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in ready]
        argv = [sys.executable, "-m", "socksd", "serve", "--listen", "127.0.0.1:0"]
        argv += ["--access-log", "off", "--max-sessions", str(total), *args.server_arg]
        with log.open("wb") as out:
            server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        proxy = wait_listening(log, server, 30)
        time.sleep(1.0)  # settled, as the reference harness does before its first reading
        rss0, pss0 = memory_kib(server.pid)
        report = Report(netns, ready, nofile, rss0, pss0)
        runner = asyncio.run
        with contextlib.suppress(ImportError):
            import uvloop

            runner = uvloop.run
        runner(asyncio.wait_for(drive(server.pid, proxy, targets, args, report), args.deadline))
        report.server_exit = stop(server)
        text = log.read_text(errors="replace")
        lines = text.splitlines()
        report.server_log_errors = [
            line for line in lines if re.search(r" (ERROR|CRITICAL) |Traceback", line)
        ][:20]
        warnings = [line for line in lines if " WARNING " in line]
        report.server_log_warnings = len(warnings)
        report.server_log_warning_samples = warnings[:3]
        return report
    finally:
        if server is not None:
            stop(server)
        stop(echo)
        tmp.cleanup()


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--role", default="bench", choices=["bench", "echo"], help=argparse.SUPPRESS)
    p.add_argument("hosts", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--steps", default="5000,20000,50000", help="session counts to measure at")
    p.add_argument("--hold", type=float, default=2.0, help="seconds idle before each reading")
    p.add_argument("--inflight", type=int, default=128, help="handshakes at a time")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per handshake or echo")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds for the whole run")
    p.add_argument(
        "--netns",
        default="auto",
        choices=["auto", "yes", "no"],
        help="run in a network namespace of its own (auto: when root and unshare exists)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra argument for socksd serve (repeat: --server-arg=--idle-timeout "
        "--server-arg=600)",
    )
    p.add_argument(
        "--fit", action="store_true", help="lower the steps to what the open-files limit holds"
    )
    p.add_argument(
        "--beyond",
        type=int,
        default=0,
        help="after the last step, try this many sessions more than socksd's max_sessions "
        "(they must be refused cleanly, the others keep working)",
    )
    p.add_argument("--json", type=Path, help="write the report here too")
    args = p.parse_args(argv)
    if args.role == "bench":
        args.steps = sorted({int(s) for s in args.steps.split(",")})
        if not args.steps or args.steps[0] <= 0 or args.steps[-1] > MAX_SESSIONS:
            p.error(f"--steps: counts between 1 and {MAX_SESSIONS}")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.role == "echo":
        raise_nofile(MAX_SESSIONS + 4096)
        try:
            import uvloop

            uvloop.run(echo_main(args.hosts))
        except ImportError:
            asyncio.run(echo_main(args.hosts))
        return 0
    inside = os.environ.get(NETNS_MARK) == "1"
    want_netns = args.netns == "yes" or (
        args.netns == "auto" and os.geteuid() == 0 and shutil.which("unshare") is not None
    )
    if want_netns and not inside:
        return enter_netns([__file__, *argv])
    if inside:
        set_up_netns()
    report = run(args, netns=inside)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    problems = report.server_log_errors
    print(
        f"socksd exit status {report.server_exit}; log: {len(problems)} error lines, "
        f"{report.server_log_warnings} warnings"
    )
    for line in problems + report.server_log_warning_samples:
        print("   ", line)
    failed = bool(problems) or report.server_exit != 0 or bool(report.check_errors)
    failed = failed or any(step.errors for step in report.steps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
