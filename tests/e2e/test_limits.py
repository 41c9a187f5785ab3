"""Limits end to end: sessions per client address and per user (hit and released), per-user
bandwidth (never faster than the rate, both directions, shared by a
user's sessions, data intact). The failed-login throttle is in test_login_throttle.py; running out
of file descriptors in test_out_of_fds.py."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.admin_support import (
    closed_before_negotiation,
    config_server,
    connect_from,
    sleep_until,
    socks_reply,
)
from tests.e2e.support import (
    SourceServer,
    add_user,
    echo_roundtrip,
    random_bytes,
    rss_kb,
    wait_for,
    wait_for_log,
)
from tests.servers import EchoServer, ServerProcess


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "users"
    for name in ("alice", "bob", "carol"):
        add_user(path, name, f"pw-{name}")
    return path


# -- sessions per client address and per user --------------------------------------------------------


def test_sessions_per_ip(socksd: Callable[..., ServerProcess], echo: EchoServer) -> None:
    server = socksd("--max-sessions-per-ip", "2")
    held = []
    for _ in range(2):
        code, sock = socks_reply(server, "127.0.0.1", echo.port)
        assert code == 0
        held.append(sock)
    # a third from the same address is closed at accept; another address is not affected
    assert closed_before_negotiation(connect_from(server, "127.0.0.1"))
    wait_for_log(server, "refusing 127.0.0.1:")
    assert "2 sessions open from this address (max_sessions_per_ip)" in server.log()
    code, other = socks_reply(server, "127.0.0.1", echo.port, source="127.0.0.2")
    with other:
        assert code == 0
        echo_roundtrip(other, b"other address")
    # released when a session ends
    held.pop().close()

    def third_works() -> bool:
        try:
            code, sock = socks_reply(server, "127.0.0.1", echo.port)
        except (AssertionError, OSError):
            return False
        held.append(sock)
        return code == 0

    sleep_until(third_works, 10)
    for sock in held:
        echo_roundtrip(sock, b"still relayed")
        sock.close()


def test_failed_requests_give_their_count_back(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, _ = config_server(
        socksd, tmp_path, 'max_sessions_per_ip = 1\n[[rules]]\naction = "deny"\nports = ["9"]'
    )
    for _ in range(5):
        code, sock = socks_reply(server, "127.0.0.1", 9)
        sock.close()
        assert code == 2
        wait_for(lambda: True, 0)

    def works() -> bool:
        code, sock = socks_reply(server, "127.0.0.1", echo.port)
        with sock:
            return code == 0

    sleep_until(works, 10)


def test_sessions_per_user(
    socksd: Callable[..., ServerProcess], users: Path, echo: EchoServer
) -> None:
    server = socksd("--users", str(users), "--max-sessions-per-user", "1")
    code, first = socks_reply(server, "127.0.0.1", echo.port, user="alice", password="pw-alice")
    assert code == 0
    code, second = socks_reply(server, "127.0.0.1", echo.port, user="alice", password="pw-alice")
    second.close()
    assert code == 1  # general failure, after negotiation
    wait_for_log(server, "refusing user 'alice' from 127.0.0.1:")
    assert "1 sessions open (max_sessions_per_user)" in server.log()
    code, bob = socks_reply(server, "127.0.0.1", echo.port, user="bob", password="pw-bob")
    with bob:
        assert code == 0
    echo_roundtrip(first, b"first goes on")
    first.close()

    def alice_again() -> bool:
        code, sock = socks_reply(server, "127.0.0.1", echo.port, user="alice", password="pw-alice")
        with sock:
            return code == 0

    sleep_until(alice_again, 10)


# -- bandwidth -------------------------------------------------------------------------------------

RATE = 1_000_000
SIZE = 3_000_000
FAST_RATE = 50_000_000


def assert_paced(size: int, elapsed: float) -> None:
    """``size`` bytes took at least what the bucket allows (a full bucket, a tenth of a second of
    rate, then ``RATE``), and were not stalled: at least half the rate, however loaded the
    machine. The exact pacing is tests/test_bandwidth_relay.py's, on a fake clock."""
    least = (size - RATE / 10) / RATE - 0.05  # 0.05: the reply reaches us after the relay starts
    assert elapsed >= least, f"{size / elapsed:.0f} B/s over {elapsed:.2f}s: faster than {RATE}"
    assert size / elapsed >= RATE / 2, f"{size / elapsed:.0f} B/s over {elapsed:.2f}s: stalled"


@pytest.fixture(scope="module")
def limited(
    module_socksd: Callable[..., ServerProcess],
    users: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    path = tmp_path_factory.mktemp("bw") / "bw.toml"
    path.write_text(
        f'listen = ["127.0.0.1:0"]\nusers = "{users}"\n'
        f"[bandwidth]\nalice = {RATE}\ncarol = {FAST_RATE}\n"
    )
    return module_socksd("--config", str(path))


@pytest.fixture(scope="module")
def source() -> Iterator[SourceServer]:
    server = SourceServer(random_bytes(SIZE, seed=5))
    yield server
    server.close()


def _download(server: ServerProcess, port: int, user: str, size: int) -> tuple[float, str]:
    code, sock = socks_reply(server, "127.0.0.1", port, user=user, password=f"pw-{user}")
    with sock:
        assert code == 0
        start = time.monotonic()
        digest = hashlib.sha256()
        got = 0
        sock.settimeout(30)
        while chunk := sock.recv(65536):
            digest.update(chunk)
            got += len(chunk)
        elapsed = time.monotonic() - start
    assert got == size
    return elapsed, digest.hexdigest()


def test_download_rate(limited: ServerProcess, source: SourceServer) -> None:
    elapsed, digest = _download(limited, source.port, "alice", SIZE)
    assert digest == source.digest
    assert_paced(SIZE, elapsed)


def test_upload_rate_and_half_close(limited: ServerProcess) -> None:
    sink = EchoServer(mode="halfclose")
    data = random_bytes(SIZE, seed=6)
    try:
        code, sock = socks_reply(limited, "127.0.0.1", sink.port, user="alice", password="pw-alice")
        with sock:
            assert code == 0
            start = time.monotonic()
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # half-close: the sink answers after EOF
            sock.settimeout(30)
            answer = b""
            while chunk := sock.recv(128):
                answer += chunk
            elapsed = time.monotonic() - start
    finally:
        sink.close()
    assert answer.decode() == hashlib.sha256(data).hexdigest()
    assert_paced(SIZE, elapsed)


def test_sessions_of_a_user_share_the_rate(limited: ServerProcess) -> None:
    half = SIZE // 2
    source = SourceServer(random_bytes(half, seed=7))
    results: list[tuple[float, str]] = []
    try:
        start = time.monotonic()
        threads = [
            threading.Thread(
                target=lambda: results.append(_download(limited, source.port, "alice", half))
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - start
    finally:
        source.close()
    assert [digest for _, digest in results] == [source.digest] * 2
    assert_paced(SIZE, elapsed)  # both together: one bucket for the user


def test_users_without_a_limit_are_not_slowed(limited: ServerProcess, source: SourceServer) -> None:
    elapsed, digest = _download(limited, source.port, "bob", SIZE)
    assert digest == source.digest
    assert SIZE / elapsed > 3 * RATE, f"{SIZE / elapsed:.0f} B/s"


def test_limited_slow_reader_does_not_grow_memory(limited: ServerProcess) -> None:
    """Backpressure and a rate limit together: a client that stops reading holds the server at
    bounded memory (40 MB at 50 MB/s is more than the kernel's socket buffers take), then gets
    every byte in order."""
    size = 40_000_000
    src = SourceServer(random_bytes(size, seed=8))
    try:
        code, sock = socks_reply(limited, "127.0.0.1", src.port, user="carol", password="pw-carol")
        with sock:
            assert code == 0
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            before = peak = rss_kb(limited.proc.pid)
            for _ in range(20):  # 2 s without reading
                time.sleep(0.1)
                peak = max(peak, rss_kb(limited.proc.pid))
            digest = hashlib.sha256()
            total = 0
            sock.settimeout(30)
            while chunk := sock.recv(1 << 20):
                digest.update(chunk)
                total += len(chunk)
    finally:
        src.close()
    assert (digest.hexdigest(), total) == (src.digest, size)
    assert peak - before < 8 * 1024, f"server grew by {peak - before} kB while the reader stopped"
