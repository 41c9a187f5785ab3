"""Fixtures of the end-to-end tests: user files, long-lived servers, loopback targets."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    PASSWORD,
    USER,
    HttpServer,
    UdpEchoServer,
    add_user,
    has_ipv6,
)
from tests.netns import network_namespace
from tests.servers import EchoServer, ServerProcess, StubDns, start_server


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An htpasswd file with alice (PASSWORD), made by ``socksd user add --password-stdin``."""
    path = tmp_path_factory.mktemp("users") / "users.htpasswd"
    add_user(path, USER, PASSWORD)
    return path


@pytest.fixture(scope="module")
def module_socksd(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """Like ``socksd`` but the servers live for the whole module (starting one costs time)."""
    tmp = tmp_path_factory.mktemp("socksd")
    started: list[ServerProcess] = []

    def factory(*args: str, **kwargs: object) -> ServerProcess:
        server = start_server(tmp, *args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGTERM if server.alive() else signal.SIGKILL)


@pytest.fixture(scope="module")
def open_server(module_socksd: Callable[..., ServerProcess]) -> ServerProcess:
    """A module-wide no-auth socksd on 127.0.0.1."""
    return module_socksd()


@pytest.fixture(scope="module")
def auth_server(module_socksd: Callable[..., ServerProcess], users_file: Path) -> ServerProcess:
    """A module-wide socksd requiring alice's username/password. Its tests fail logins on
    purpose: short failed-login delays keep them quick (test_login_throttle.py covers those)."""
    return module_socksd(
        "--users", str(users_file), "--auth-delay", "0.01", "--max-auth-delay", "0.1"
    )


@pytest.fixture(scope="module")
def module_echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def echo6() -> Iterator[EchoServer]:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    server = EchoServer("::1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def http4() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def http6() -> Iterator[HttpServer]:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    server = HttpServer("::1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def nx_dns() -> Iterator[StubDns]:
    """A stub DNS server on 127.0.0.1 answering NXDOMAIN to every question."""
    server = StubDns()
    yield server
    server.close()


@pytest.fixture(scope="module")
def udp_echo() -> Iterator[UdpEchoServer]:
    """A UDP echo server on 127.0.0.1, one per test module."""
    server = UdpEchoServer()
    yield server
    server.close()


@pytest.fixture
def held() -> Iterator[list[socket.socket]]:
    """Client connections a test holds open; closed at teardown."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


@pytest.fixture
def netns() -> Iterator[str]:
    """The test runs in its own network namespace with the TEST-NET addresses of
    ``tests.netns`` on its ``lo`` (before any server is started); a module may override it."""
    with network_namespace() as name:
        yield name
