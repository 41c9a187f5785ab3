"""Limits apply alike to every command (issue 11, defect 6): a rule's ``idle_timeout`` and a
user's ``[bandwidth]`` hold for CONNECT, GSSAPI CONNECT, BIND and UDP ASSOCIATE.

Rates are checked from below only (a limited transfer cannot be faster than its rate allows,
however loaded the machine is): the transfers are three times the rate, so an unlimited relay
finishes in milliseconds and a limited one takes nearly three seconds.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from socksd.client import create_udp_association
from tests.e2e.admin_support import access_line, config_server
from tests.e2e.support import (
    IO_TIMEOUT,
    SourceServer,
    UdpEchoServer,
    add_user,
    connect_proxy,
    handshake,
    random_bytes,
    read_reply,
    recv_until_eof,
    request,
    udp_associate_raw,
)
from tests.servers import ServerProcess

RATE = 200_000
SIZE = 3 * RATE
AT_LEAST = 2.0
"""Seconds a SIZE transfer at RATE takes at the least (2.9 s, less the first burst, rounded)."""


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(path, "alice", "pw-alice")
    return path


def _bind(server: ServerProcess, user: str | None = None) -> tuple[socket.socket, str, int]:
    sock = connect_proxy(server)
    handshake(sock, user, f"pw-{user}" if user else None)
    sock.sendall(request("127.0.0.1", 0, cmd=2))
    raw, host, port = read_reply(sock)
    assert raw[1] == 0
    return sock, host, port


def test_bind_follows_the_rule_idle_timeout(
    socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server, _ = config_server(
        socksd, tmp_path, '[[rules]]\naction = "allow"\ncommands = ["bind"]\nidle_timeout = 1\n'
    )
    sock, host, port = _bind(server)
    with sock, socket.create_connection((host, port), timeout=IO_TIMEOUT) as peer:
        assert read_reply(sock)[0][1] == 0
        assert recv_until_eof(peer, timeout=10) == b""  # closed by socksd, not by the test
    assert "idle for 1s" in access_line(server, " BIND ")


def test_bind_follows_the_bandwidth_limit(
    socksd: Callable[..., ServerProcess], tmp_path: Path, users: Path
) -> None:
    server, _ = config_server(socksd, tmp_path, f'users = "{users}"\n[bandwidth]\nalice = {RATE}')
    data = random_bytes(SIZE, seed=11)
    sock, host, port = _bind(server, "alice")
    with sock, socket.create_connection((host, port), timeout=IO_TIMEOUT) as peer:
        assert read_reply(sock)[0][1] == 0
        start = time.monotonic()
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, timeout=30) == data
        assert time.monotonic() - start >= AT_LEAST


def test_gssapi_connect_follows_the_bandwidth_limit(
    socksd: Callable[..., ServerProcess], tmp_path: Path, krb5_realm: Any
) -> None:
    from socksd.client import GssapiOptions, Proxy, create_gssapi_connection
    from tests.krb5 import HOST, USER

    data = random_bytes(SIZE, seed=12)
    source = SourceServer(data)
    path = tmp_path / "gss.toml"
    path.write_text(
        f'listen = ["127.0.0.1:0"]\ngssapi_keytab = "{krb5_realm.keytab}"\n'
        f'[bandwidth]\n"{USER}" = {RATE}\n'
    )
    server = socksd("--config", str(path), env=krb5_realm.env)
    proxy = Proxy("127.0.0.1", server.port, gssapi=GssapiOptions(hostname=HOST, level=2))
    try:
        with create_gssapi_connection(proxy, ("127.0.0.1", source.port), timeout=30) as sock:
            start = time.monotonic()
            sock.settimeout(30)
            got = bytearray()
            while chunk := sock.recv(65536):
                got += chunk
            elapsed = time.monotonic() - start
    finally:
        source.close()
    assert bytes(got) == data
    assert elapsed >= AT_LEAST


def test_udp_follows_the_bandwidth_limit(
    socksd: Callable[..., ServerProcess], tmp_path: Path, users: Path
) -> None:
    """Datagrams over the user's rate are dropped (``bandwidth``), never queued."""
    server, _ = config_server(socksd, tmp_path, f'users = "{users}"\n[bandwidth]\nalice = 5000')
    echo = UdpEchoServer()
    try:
        with create_udp_association(f"socks5://alice:pw-alice@127.0.0.1:{server.port}") as assoc:
            for _ in range(40):  # 40 kB at once, against a 4 kB burst and 5 kB/s
                assoc.sendto(b"x" * 1000, ("127.0.0.1", echo.port))
            answers = 0
            try:
                while answers < 40:
                    assoc.recvfrom(timeout=1.0)
                    answers += 1
            except TimeoutError:
                pass
    finally:
        echo.close()
    line = access_line(server, "UDP_ASSOCIATE")
    assert "bandwidth=" in line, line
    assert answers < 20, line


def test_udp_follows_the_rule_idle_timeout(
    socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server, _ = config_server(
        socksd, tmp_path, '[[rules]]\naction = "allow"\ncommands = ["udp"]\nidle_timeout = 1\n'
    )
    control, udp, _, raw = udp_associate_raw(server)
    with control, udp:
        assert raw[1] == 0
        control.settimeout(10)
        assert control.recv(1) == b""  # socksd ends the association
    assert "idle for 1s" in access_line(server, "UDP_ASSOCIATE")
