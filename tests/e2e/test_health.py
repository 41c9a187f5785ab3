"""``socksd health``: healthy against a real server (open or with passwords), unhealthy when the
server is down, silent, or not a SOCKS5 server; one line of output, exit status 0 or 1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.support import HttpServer, SilentServer, has_ipv6, socksd_cli, wait_for
from tests.helpers import refused_port
from tests.servers import EchoServer, ServerProcess


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def _one_line(result: object) -> str:
    out = result.stdout  # type: ignore[attr-defined]
    assert result.stderr == ""  # type: ignore[attr-defined]
    assert out.count("\n") == 1, out
    return str(out.strip())


def test_healthy_open_server(open_server: ServerProcess) -> None:
    result = socksd_cli("health", f"127.0.0.1:{open_server.port}")
    assert result.returncode == 0
    line = _one_line(result)
    assert (
        line == f"healthy: 127.0.0.1:{open_server.port} answers SOCKS5 (selects no authentication)"
    )
    # the check is an ordinary connection: one access-log line, no traceback, server fine
    assert wait_for(lambda: "client closed during handshake" in open_server.log())
    assert "Traceback" not in open_server.log()


def test_healthy_with_passwords_and_no_credentials(auth_server: ServerProcess) -> None:
    result = socksd_cli("health", f"127.0.0.1:{auth_server.port}")
    assert result.returncode == 0
    assert "(selects username/password)" in _one_line(result)


def test_healthy_on_ipv6(module_socksd: object) -> None:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    server = module_socksd("--listen", "[::1]:0")  # type: ignore[operator]
    result = socksd_cli("health", f"[::1]:{server.port}")
    assert result.returncode == 0, result.stdout
    assert _one_line(result).startswith(f"healthy: [::1]:{server.port} answers SOCKS5")


def test_unhealthy_when_down() -> None:
    port = refused_port()
    result = socksd_cli("health", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert _one_line(result) == (
        f"unhealthy: cannot reach proxy 127.0.0.1:{port}: [Errno 111] Connection refused"
    )


def test_unhealthy_when_not_socks() -> None:
    ssh = EchoServer(mode="banner", banner=b"SSH-2.0-OpenSSH_9.2\r\n")  # speaks first
    try:
        result = socksd_cli("health", f"127.0.0.1:{ssh.port}")
    finally:
        ssh.close()
    assert result.returncode == 1
    line = _one_line(result)
    assert line.startswith(
        f"unhealthy: SOCKS5 greeting to 127.0.0.1:{ssh.port}: the proxy broke the protocol: "
    ), line


def test_unhealthy_when_http(http4: HttpServer) -> None:
    """An HTTP server waits for a request line that never comes: unhealthy at the timeout."""
    result = socksd_cli("health", f"127.0.0.1:{http4.port}", "--timeout", "0.5")
    assert result.returncode == 1
    assert _one_line(result) == f"unhealthy: SOCKS5 greeting to 127.0.0.1:{http4.port}: timed out"


def test_unhealthy_when_silent_within_the_timeout(silent: SilentServer) -> None:
    result = socksd_cli("health", f"127.0.0.1:{silent.port}", "--timeout", "0.5")
    assert result.returncode == 1
    assert _one_line(result) == f"unhealthy: SOCKS5 greeting to 127.0.0.1:{silent.port}: timed out"


def test_bad_address_is_a_usage_error() -> None:
    result = socksd_cli("health", "no-port")
    assert result.returncode == 2
    assert result.stderr.startswith("socksd: error: address: 'no-port' is not HOST:PORT")
