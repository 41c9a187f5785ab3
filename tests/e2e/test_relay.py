"""The relay: half-close both ways, integrity of large transfers, backpressure, many sessions,
idle timeout and graceful shutdown."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e.support import (
    ResettingServer,
    ReverseHalfCloseServer,
    SilentServer,
    SourceServer,
    access_lines,
    connect_proxy,
    connecting_to,
    echo_roundtrip,
    full_backlog_target,
    random_bytes,
    recv_exact,
    recv_until_eof,
    request,
    rss_kb,
    socks_open,
    socks_request,
    wait_for,
    wait_for_log,
)
from tests.helpers import refused_port
from tests.servers import EchoServer, ServerProcess

MB = 1024 * 1024
BIG = 10 * MB


@pytest.fixture(scope="module")
def big_data() -> bytes:
    return random_bytes(BIG, seed=42)


@pytest.fixture(scope="module")
def source(big_data: bytes) -> Iterator[SourceServer]:
    server = SourceServer(big_data)
    yield server
    server.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[EchoServer]:
    server = EchoServer(mode="halfclose")
    yield server
    server.close()


def read_all_digest(sock: socket.socket, timeout: float = 60.0) -> tuple[str, int]:
    """Read until EOF; return (sha256 hex, byte count)."""
    digest = hashlib.sha256()
    total = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(15)
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return digest.hexdigest(), total
        digest.update(chunk)
        total += len(chunk)
    raise AssertionError(f"no EOF after {total} bytes within {timeout}s")


# -- half-close ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100_000], ids=["empty", "one-byte", "100k"])
def test_client_half_close_still_gets_the_answer(
    open_server: ServerProcess, sink: EchoServer, size: int
) -> None:
    data = random_bytes(size, seed=size)
    with socks_open(open_server, "127.0.0.1", sink.port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock, 30)
    assert answer == hashlib.sha256(data).hexdigest().encode()


def test_target_sends_and_closes(open_server: ServerProcess) -> None:
    data = random_bytes(300_000, seed=3)
    target = SourceServer(data)
    try:
        with socks_open(open_server, "127.0.0.1", target.port) as sock:
            assert recv_until_eof(sock, 30) == data
    finally:
        target.close()


def test_target_half_close_client_keeps_sending(open_server: ServerProcess) -> None:
    target = ReverseHalfCloseServer()
    data = random_bytes(500_000, seed=5)
    try:
        with socks_open(open_server, "127.0.0.1", target.port) as sock:
            greeting = recv_exact(sock, len(ReverseHalfCloseServer.greeting))
            assert greeting == ReverseHalfCloseServer.greeting
            # The target's EOF reaches the client, whose own direction stays open.
            assert recv_until_eof(sock, 15) == b""
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert target.done.wait(30), "the target never saw the client's EOF"
        assert target.received_bytes == len(data)
        assert target.received_digest == hashlib.sha256(data).hexdigest()
    finally:
        target.close()


# -- integrity -----------------------------------------------------------------------------------


def test_upload_10mb(open_server: ServerProcess, sink: EchoServer, big_data: bytes) -> None:
    with socks_open(open_server, "127.0.0.1", sink.port) as sock:
        sock.sendall(big_data)
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock, 60)
    assert answer == hashlib.sha256(big_data).hexdigest().encode()


def test_download_10mb(open_server: ServerProcess, source: SourceServer) -> None:
    with socks_open(open_server, "localhost", source.port) as sock:
        digest, total = read_all_digest(sock)
    assert total == BIG
    assert digest == source.digest


def test_echo_10mb_both_ways_at_once(
    open_server: ServerProcess, module_echo: EchoServer, big_data: bytes
) -> None:
    result: dict[str, object] = {}

    with socks_open(open_server, "127.0.0.1", module_echo.port) as sock:
        sock.settimeout(30)

        def reader() -> None:
            try:
                result["digest"] = hashlib.sha256(recv_exact(sock, BIG)).hexdigest()
            except BaseException as e:
                result["error"] = e

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        view = memoryview(big_data)
        for offset in range(0, BIG, 64 * 1024):
            sock.sendall(view[offset : offset + 64 * 1024])
        thread.join(60)
        assert not thread.is_alive(), "reader thread stuck"
    assert "error" not in result, result.get("error")
    assert result["digest"] == hashlib.sha256(big_data).hexdigest()


# -- backpressure --------------------------------------------------------------------------------


def test_slow_reader_backpressure(socksd: Callable[..., ServerProcess]) -> None:
    """A client that does not read for 2 s must not make socksd buffer the download.

    40 MB: more than the loopback socket buffers of the kernel (several MB each way, more under
    gVisor) can hold, so without backpressure most of it would end up in socksd's memory.
    """
    size = 40 * MB
    big_source = SourceServer(random_bytes(size, seed=40))
    server = socksd()
    try:
        # Warm up the process (first session allocations) before measuring.
        with socks_open(server, "127.0.0.1", big_source.port) as sock:
            assert read_all_digest(sock)[1] == size
        with socks_open(server, "127.0.0.1", big_source.port) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            before = rss_kb(server.proc.pid)
            peak = before
            for _ in range(20):  # a 2 s pause without reading, sampling the RSS
                time.sleep(0.1)
                peak = max(peak, rss_kb(server.proc.pid))
            digest, total = read_all_digest(sock)
    finally:
        big_source.close()
    assert total == size
    assert digest == big_source.digest
    assert peak - before < 8 * 1024, f"socksd RSS grew by {peak - before} kB while paused"


# -- many sessions -------------------------------------------------------------------------------


def test_300_concurrent_sessions(open_server: ServerProcess, module_echo: EchoServer) -> None:
    count = 300

    async def one(i: int) -> bytes:
        payload = bytes((i % 256,)) * 1024
        reader, writer = await asyncio.open_connection(open_server.host, open_server.port)
        try:
            writer.write(b"\x05\x01\x00" + request("127.0.0.1", module_echo.port))
            await writer.drain()
            head = await reader.readexactly(12)
            assert head[:4] == b"\x05\x00\x05\x00", head.hex()
            writer.write(payload)
            await writer.drain()
            data = await reader.readexactly(len(payload))
            assert data == payload
            return data
        finally:
            writer.close()

    async def main() -> list[bytes | BaseException]:
        async with asyncio.timeout(90):  # all sessions open at once
            return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} sessions failed, e.g. {errors[:3]!r}"
    assert len(results) == count
    assert open_server.alive()


# -- idle timeout --------------------------------------------------------------------------------


def test_idle_timeout(socksd: Callable[..., ServerProcess], module_echo: EchoServer) -> None:
    server = socksd("--idle-timeout", "1")
    idle = socks_open(server, "127.0.0.1", module_echo.port)
    active = socks_open(server, "127.0.0.1", module_echo.port)
    with idle, active:
        echo_roundtrip(idle, b"x")
        start = time.monotonic()
        closed_at: list[float] = []

        def watch_idle() -> None:
            if recv_until_eof(idle, 10) == b"":
                closed_at.append(time.monotonic() - start)

        watcher = threading.Thread(target=watch_idle, daemon=True)
        watcher.start()
        for i in range(30):  # a message every 0.3 s until the idle one is closed (after 1 s+)
            echo_roundtrip(active, b"tick %d" % i)
            if not watcher.is_alive():
                break
            time.sleep(0.3)
        echo_roundtrip(active, b"still open")
        watcher.join(10)
        assert closed_at, "the idle session was not closed"
        assert closed_at[0] < 8
    assert wait_for(lambda: "idle for 1s" in server.log(), 10)


# -- graceful shutdown ---------------------------------------------------------------------------


def test_sigterm_lets_open_sessions_finish(
    socksd: Callable[..., ServerProcess], module_echo: EchoServer
) -> None:
    server = socksd()
    sent = hashlib.sha256()
    received = hashlib.sha256()
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        chunk = random_bytes(256 * 1024, seed=9)
        for _ in range(4):
            sock.sendall(chunk)
            sent.update(chunk)
            received.update(recv_exact(sock, len(chunk)))
        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, "signal received")
        # New connections are refused once the listener is closed.
        refused = False
        for _ in range(50):
            try:
                with socket.create_connection((server.host, server.port), timeout=5) as probe:
                    probe.close()
            except ConnectionRefusedError:
                refused = True
                break
            time.sleep(0.1)
        assert refused, "the listener still accepts connections after SIGTERM"
        # The open session goes on.
        for _ in range(8):
            sock.sendall(chunk)
            sent.update(chunk)
            received.update(recv_exact(sock, len(chunk)))
        assert server.alive()
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, 15) == b""
    assert received.hexdigest() == sent.hexdigest()
    try:
        code = server.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"socksd did not exit after its last session ended:\n{server.log()}")
    assert code == 0, server.log()
    log = server.log()
    assert "stopped" in log
    assert "rep=0x00 up=3145728 down=3145728" in log


def test_shutdown_timeout_aborts_endless_session(socksd: Callable[..., ServerProcess]) -> None:
    target = SilentServer()
    server = socksd("--shutdown-timeout", "1")
    try:
        with socks_open(server, "127.0.0.1", target.port) as sock:
            sock.sendall(b"this session never ends by itself")
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                code = server.proc.wait(15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"socksd ignored its shutdown timeout:\n{server.log()}")
            elapsed = time.monotonic() - start
            assert code == 0, server.log()
            assert elapsed < 15
            assert recv_until_eof(sock, 10) == b""
        log = server.log()
        assert "shutdown deadline reached" in log
        assert "server shutdown deadline" in log  # the session's access-log line
    finally:
        target.close()


def test_sigterm_without_sessions_exits_zero(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    server2 = socksd()
    server2.proc.send_signal(signal.SIGINT)
    assert server2.proc.wait(15) == 0


# -- session accounting --------------------------------------------------------------------------


def _rst_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_every_kind_of_session_end_frees_its_slot(
    socksd: Callable[..., ServerProcess], module_echo: EchoServer
) -> None:
    """With --max-sessions 3, sessions that ended in every possible way must all be forgotten:
    afterwards 3 concurrent sessions still fit and a 4th is turned away."""
    server = socksd("--max-sessions", "3", "--handshake-timeout", "1", "--connect-timeout", "2")
    sessions = 0

    def ended(n: int = 1) -> None:
        nonlocal sessions
        sessions += n
        assert wait_for(lambda: len(access_lines(server)) >= sessions, 15), server.log()

    # refused target
    sock, raw, _, _ = socks_request(server, "127.0.0.1", refused_port())
    sock.close()
    assert raw[1] == 5
    ended()
    # garbage, no acceptable method, silent client (handshake timeout)
    for data in (b"GET / HTTP/1.0\r\n\r\n", b"\x05\x01\x02", b""):
        with connect_proxy(server) as sock:
            if data:
                sock.sendall(data)
            recv_until_eof(sock, 10)
        ended()
    # client leaves in the middle of the handshake, with a FIN and with a reset
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x01")
    ended()
    sock = connect_proxy(server)
    sock.sendall(b"\x05\x01\x00\x05\x01\x00")
    recv_exact(sock, 2)
    _rst_close(sock)
    ended()
    # client leaves while the server is still connecting to the target
    with full_backlog_target() as target:
        before = connecting_to(target)
        sock = connect_proxy(server)
        sock.sendall(b"\x05\x01\x00" + request(*target))
        recv_exact(sock, 2)
        assert wait_for(lambda: connecting_to(target) > before, 10)  # the server's SYN is out
        sock.close()
        ended()
    # relayed sessions: normal close, half-close, reset by the client, reset by the target
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"normal")
    ended()
    sink = EchoServer(mode="halfclose")
    try:
        with socks_open(server, "127.0.0.1", sink.port) as sock:
            sock.sendall(b"data")
            sock.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock, 15) == hashlib.sha256(b"data").hexdigest().encode()
        ended()
    finally:
        sink.close()
    sock = socks_open(server, "127.0.0.1", module_echo.port)
    echo_roundtrip(sock, b"about to reset")
    _rst_close(sock)
    ended()
    resetter = ResettingServer()
    try:
        with socks_open(server, "127.0.0.1", resetter.port) as sock:
            recv_until_eof(sock, 15)
        ended()
    finally:
        resetter.close()

    # Now 3 sessions fit, and a 4th is closed at once.
    held = [socks_open(server, "127.0.0.1", module_echo.port) for _ in range(3)]
    try:
        for i, sock in enumerate(held):
            echo_roundtrip(sock, b"held %d" % i)
        with connect_proxy(server) as extra:
            try:
                extra.sendall(b"\x05\x01\x00")
                assert recv_until_eof(extra, 10) == b""
            except (BrokenPipeError, ConnectionResetError):
                pass
        assert wait_for(lambda: "max_sessions" in server.log(), 10)
    finally:
        for sock in held:
            sock.close()
    ended(3)
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"a slot is free again")
    ended()
    # And the server still shuts down at once: no session is left behind.
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert "waiting up to" not in server.log()
