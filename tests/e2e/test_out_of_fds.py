"""Out of file descriptors, end to end, on uvloop and on asyncio.

The server runs under ``prlimit --nofile=NOFILE:NOFILE`` (it cannot raise the limit) with
``max_sessions`` far above what the limit holds. Greeted connections, each holding one of the
server's descriptors, are opened until the server (counted in /proc/PID/fd) has ``spare`` left.
Then: connections wait while none is left, and the server neither dies nor spins (its CPU time
over two seconds, from /proc/PID/stat: a generous bound, not a benchmark); a request that cannot
get its socket is answered 0x01 (CONNECT, BIND, UDP ASSOCIATE, whichever of its sockets is
missing); each place logs one line, not one per attempt; once the connections close, new
sessions are served. The splice relay's pipe shortage is in tests/test_splice_relay.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.admin_support import sleep_until, socks_reply
from tests.e2e.support import (
    IO_TIMEOUT,
    UdpEchoServer,
    assert_closed,
    echo_roundtrip,
    parse_udp,
    recv_exact,
    udp_associate_raw,
    udp_header,
)
from tests.servers import EchoServer, ServerProcess, StubDns

pytestmark = pytest.mark.e2e

NOFILE = 64
"""The server's open-files limit (soft and hard)."""
WAITING = 30
"""Connections that arrive while no descriptor is free."""
LOOPS = ["uvloop", "asyncio"]
SHORTAGE = "out of file descriptors"
METRICS_ON = re.compile(r"metrics on http://(\S+):(\d+)/metrics")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> dict[str, float]:
    """User + system CPU time of each thread of the process so far ("main": the event loop's)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            fields = stat.rpartition(")")[2].split()
            name = "main" if int(tid) == pid else f"thread {tid}"
            out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def greeted(server: ServerProcess) -> socket.socket:
    """A connection past the method negotiation (the server holds a descriptor for it)."""
    sock = socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT)
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    return sock


@pytest.fixture
def limited(socksd: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """Factory: socksd on LOOP with NOFILE descriptors and max_sessions 1000."""

    def start(loop: str, *args: str) -> ServerProcess:
        return socksd(
            "--loop", loop, "--max-sessions", "1000", "--handshake-timeout", "120", *args,
            launcher=("prlimit", f"--nofile={NOFILE}:{NOFILE}"),
        )  # fmt: skip

    return start


def fill(server: ServerProcess, held: list[socket.socket], spare: int) -> None:
    """Open greeted connections until the server has ``spare`` descriptors left (all of them
    in /proc/PID/fd: no thread of the server waits in a blocking accept(), which takes one the
    listing does not show)."""
    pid = server.proc.pid
    full = NOFILE - spare
    for _ in range(NOFILE):
        if open_fds(pid) >= full:
            break
        held.append(greeted(server))
    time.sleep(0.2)  # nothing else opens meanwhile
    assert open_fds(pid) == full, (open_fds(pid), server.log()[-2000:])


def release(held: list[socket.socket]) -> None:
    for sock in held:
        sock.close()
    held.clear()


def serves_connect(server: ServerProcess, echo: EchoServer) -> bool:
    try:
        code, sock = socks_reply(server, "127.0.0.1", echo.port)
    except (AssertionError, OSError):
        return False
    with sock:
        if code != 0:
            return False
        echo_roundtrip(sock, b"serving again")
    return True


def shortage_lines(server: ServerProcess, place: str) -> list[str]:
    return [line for line in server.log().splitlines() if SHORTAGE in line and place in line]


RESERVE_STOLEN = (
    "libuv turns connections away with a descriptor it keeps in reserve (closed, then opened "
    "again); the metrics or control thread accepting at that instant takes its slot, and "
    "uvloop's listener then spins at 100% while no descriptor is free (about 1 run in 3 here)"
)


@pytest.mark.parametrize(
    ("loop", "side_doors"),
    [
        ("uvloop", False),
        ("asyncio", False),
        pytest.param("uvloop", True, marks=pytest.mark.xfail(reason=RESERVE_STOLEN)),
        ("asyncio", True),
    ],
)
def test_accept_waits_without_spinning(
    limited: Callable[..., ServerProcess],
    held: list[socket.socket],
    echo: EchoServer,
    tmp_path: Path,
    loop: str,
    side_doors: bool,
) -> None:
    """No descriptor left: connections to the SOCKS port (``side_doors``: also the metrics
    port and the control socket) wait (asyncio) or are closed (uvloop: libuv); the process
    stays up and idle; one line is logged; once connections close, new sessions are served."""
    control = tmp_path / "control.sock"
    doors = ("--metrics", "127.0.0.1:0", "--control-socket", str(control)) if side_doors else ()
    server = limited(loop, *doors)
    found = METRICS_ON.search(server.log())
    assert found or not side_doors, server.log()
    pid = server.proc.pid
    fill(server, held, 0)
    waiting = []
    for _ in range(WAITING):
        sock = socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT)
        sock.sendall(b"\x05\x01\x00")
        waiting.append(sock)
    scrape = asker = None
    if found:
        scrape = socket.create_connection((found[1], int(found[2])), timeout=IO_TIMEOUT)
        scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        asker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        asker.settimeout(IO_TIMEOUT)
        asker.connect(str(control))
    try:
        time.sleep(0.5)
        before, start = cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)
        after, spent = cpu_seconds(pid), time.monotonic() - start
        threads = {k: (v - before.get(k, 0.0)) / spent for k, v in after.items()}
        busy = sum(threads.values())
        assert server.alive(), server.log()[-3000:]
        files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        assert busy < 0.5, (
            f"{busy:.0%} of a core while out of descriptors: {threads}; "
            f"{len(files)} open: {sorted(f for f in files if not f.startswith('socket'))}"
        )

        release(held)
        sleep_until(lambda: serves_connect(server, echo), 20)
        if loop == "asyncio":  # they waited in the listen queue and are served now
            for sock in waiting:
                assert recv_exact(sock, 2) == b"\x05\x00"
            assert shortage_lines(server, "accept")
        if scrape is not None:
            answer = b""
            while chunk := scrape.recv(65536):  # the scrape waited, or was closed (uvloop
                answer += chunk  # too: the exporter is a thread, not on the event loop)
            assert answer.startswith(b"HTTP/1.0 200") or answer == b"", answer[:200]
        log = server.log()
        assert "Traceback" not in log, log[-3000:]
        assert len(shortage_lines(server, "")) <= 3, log[-3000:]  # not one per attempt
        assert log.count("control socket: accept failed") <= 5, log[-3000:]
    finally:
        for sock in (*waiting, scrape, asker):
            if sock is not None:
                sock.close()


@pytest.mark.parametrize(
    ("cmd", "host"),
    [(1, "127.0.0.1"), (1, "localhost"), (2, "127.0.0.1")],
    ids=["connect", "connect-name", "bind"],
)
@pytest.mark.parametrize("loop", LOOPS)
def test_request_without_a_socket_is_answered(
    limited: Callable[..., ServerProcess],
    held: list[socket.socket],
    echo: EchoServer,
    loop: str,
    cmd: int,
    host: str,
) -> None:
    """The session got the last descriptor, so CONNECT's outgoing socket (BIND's listener; the
    name lookup's /etc/hosts) cannot be had: reply 0x01 and close, one line logged; afterwards
    sessions are served."""
    if host == "localhost" and loop == "uvloop":
        pytest.skip(
            "libuv's getaddrinfo reports a lookup that could not open /etc/hosts as 'Name or "
            "service not known' (EAI_NONAME): answered 0x04, the shortage not seen"
        )
    server = limited(loop)
    fill(server, held, 1)
    for _ in range(3):
        code, sock = socks_reply(server, host, echo.port, cmd=cmd)
        with sock:
            assert code == 1, server.log()[-2000:]
            assert_closed(sock)
    assert server.alive()
    place = "CONNECT" if cmd == 1 else "BIND"
    assert len(shortage_lines(server, place)) == 1, server.log()[-3000:]
    release(held)
    sleep_until(lambda: serves_connect(server, echo), 20)
    assert "Traceback" not in server.log()


def test_name_lookup_without_a_socket_is_answered(
    limited: Callable[..., ServerProcess], held: list[socket.socket], echo: EchoServer
) -> None:
    """With ``dns``: the session got the last descriptor, so the query's UDP socket cannot be
    made: 0x01 (the server is short, the name is not unknown), one line logged."""
    dns = StubDns()  # would answer NXDOMAIN (0x04) to a query that got out
    try:
        server = limited("uvloop", "--dns", f"127.0.0.1:{dns.port}")
        fill(server, held, 1)
        for _ in range(2):
            code, sock = socks_reply(server, "name.test", echo.port)
            with sock:
                assert code == 1, server.log()[-2000:]
                assert_closed(sock)  # its descriptor is free again
        assert len(shortage_lines(server, "CONNECT")) == 1, server.log()[-3000:]
        assert dns.count("name.test") == 0
        release(held)
        time.sleep(0.3)
        code, sock = socks_reply(server, "name.test", echo.port)
        sock.close()
        assert code == 4  # asked, and NXDOMAIN
    finally:
        dns.close()


@pytest.mark.parametrize("spare", [1, 2], ids=["no-client-socket", "no-target-socket"])
@pytest.mark.parametrize("loop", LOOPS)
def test_udp_associate_without_sockets_is_answered(
    limited: Callable[..., ServerProcess],
    held: list[socket.socket],
    udp_echo: UdpEchoServer,
    loop: str,
    spare: int,
) -> None:
    """UDP ASSOCIATE short of a descriptor for its client-side socket (spare 1) or for its
    target-side socket (spare 2): reply 0x01, not an association that drops every datagram;
    afterwards associations relay."""
    server = limited(loop)
    fill(server, held, spare)
    control, udp, _, raw = udp_associate_raw(server)
    with control, udp:
        assert raw[1] == 1, (raw, server.log()[-2000:])
        assert_closed(control)
    assert len(shortage_lines(server, "UDP ASSOCIATE")) == 1, server.log()[-3000:]
    release(held)
    time.sleep(0.3)
    control, udp, relay, raw = udp_associate_raw(server)
    with control, udp:
        assert raw[1] == 0
        udp.sendto(udp_header(udp_echo.host, udp_echo.port) + b"ping", relay)
        _, _, _, data = parse_udp(udp.recv(65536))
        assert data == b"ping"
    assert "Traceback" not in server.log()
