"""curl through socksd to loopback HTTP servers (IPv4 and IPv6), with and without auth."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from tests.e2e.support import PASSWORD, USER, HttpServer, access_lines, clean_env, wait_for
from tests.servers import ServerProcess, StubDns

CURL = shutil.which("curl") or "/usr/bin/curl"

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run curl quietly with bounded times; never a proxy from the environment."""
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--max-time", "20", "--connect-timeout", "10", *args],
        capture_output=True,
        timeout=40,
        env=clean_env(),
        check=False,
    )


def proxy(server: ServerProcess) -> str:
    return f"{server.host}:{server.port}"


def wait_access_line(server: ServerProcess, needle: str) -> str:
    """The first access-log line containing ``needle`` (lines are written at session end)."""
    wait_for(lambda: any(needle in line for line in access_lines(server)), timeout=10)
    lines = [line for line in access_lines(server) if needle in line]
    assert lines, f"no access-log line with {needle!r}:\n{server.log()}"
    return lines[-1]


def test_socks5_ipv4(open_server: ServerProcess, http4: HttpServer) -> None:
    result = curl("--socks5", proxy(open_server), http4.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body
    line = wait_access_line(open_server, f"CONNECT 127.0.0.1:{http4.port}")
    assert "rep=0x00" in line
    down = int(re.search(r" down=(\d+)", line).group(1))  # type: ignore[union-attr]
    up = int(re.search(r" up=(\d+)", line).group(1))  # type: ignore[union-attr]
    assert down > len(HttpServer.body)  # the body plus the response headers
    assert up > len("GET / HTTP/1.1\r\n\r\n")


def test_socks5_hostname_keeps_the_domain(open_server: ServerProcess, http4: HttpServer) -> None:
    url = f"http://localhost:{http4.port}/"
    result = curl("--socks5-hostname", proxy(open_server), url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body
    line = wait_access_line(open_server, f"CONNECT localhost:{http4.port}")
    assert "rep=0x00" in line
    assert f"-> 127.0.0.1:{http4.port}" in line


def test_fully_qualified_name_connects(
    open_server: ServerProcess,
    http4: HttpServer,
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """``localhost.`` (one trailing dot) is ``localhost``, through getaddrinfo and the hosts map."""
    result = curl("--socks5-hostname", proxy(open_server), f"http://localhost.:{http4.port}/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body
    line = wait_access_line(open_server, f"CONNECT localhost:{http4.port} ")
    assert "rep=0x00" in line
    config = tmp_path / "socksd.toml"
    config.write_text('listen = ["127.0.0.1:0"]\n[hosts]\n"db.internal" = ["127.0.0.1"]\n')
    mapped = socksd("--config", str(config))
    for name in ("db.internal.", "DB.Internal"):
        result = curl("--socks5-hostname", proxy(mapped), f"http://{name}:{http4.port}/")
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout == HttpServer.body


class WebDns(StubDns):
    """Answers ``web.test`` with 127.0.0.1 (an A record, no AAAA); NXDOMAIN for other names."""

    def answer(
        self, query: dns.message.QueryMessage, data: bytes, transport: str, peer: object
    ) -> list[bytes]:
        question = query.question[0]
        if question.name != dns.name.from_text("web.test"):
            return super().answer(query, data, transport, peer)
        reply = dns.message.make_response(query)
        if question.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text("web.test.", 60, "IN", "A", "127.0.0.1"))
        return [reply.to_wire()]


def test_names_from_the_dns_servers(
    socksd: Callable[..., ServerProcess], http4: HttpServer
) -> None:
    """``--dns``: a name answered by the server connects, and the answer is cached; a name that
    does not exist fails, and that is cached too (the second lookups do not reach the server)."""
    stub = WebDns()
    try:
        server = socksd("--dns", f"127.0.0.1:{stub.port}")
        for _ in range(2):
            result = curl("--socks5-hostname", proxy(server), f"http://web.test:{http4.port}/")
            assert result.returncode == 0, result.stderr
            assert result.stdout == HttpServer.body
        line = wait_access_line(server, f"CONNECT web.test:{http4.port}")
        assert f"-> 127.0.0.1:{http4.port}" in line
        assert stub.count("web.test", "A") == 1
        assert stub.count("web.test", "AAAA") == 1
        for _ in range(2):
            result = curl("--socks5-hostname", proxy(server), f"http://gone.test:{http4.port}/")
            assert result.returncode != 0
        assert stub.count("gone.test", "A") == 1
        assert stub.count("gone.test", "AAAA") == 1
    finally:
        stub.close()


def test_socks5h_url_scheme(open_server: ServerProcess, http4: HttpServer) -> None:
    url = f"http://localhost:{http4.port}/"
    result = curl("--proxy", f"socks5h://{proxy(open_server)}", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body


def test_ipv6_target(open_server: ServerProcess, http6: HttpServer) -> None:
    result = curl("--socks5", proxy(open_server), http6.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body
    line = wait_access_line(open_server, f"CONNECT [::1]:{http6.port}")
    assert "rep=0x00" in line


def test_ipv6_target_by_hostname(open_server: ServerProcess, http6: HttpServer) -> None:
    result = curl("--socks5-hostname", proxy(open_server), http6.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body


def test_auth_ok_logs_user_and_domain_never_password(
    auth_server: ServerProcess, http4: HttpServer
) -> None:
    url = f"http://localhost:{http4.port}/auth-ok"
    result = curl("--socks5-hostname", proxy(auth_server), "-U", f"{USER}:{PASSWORD}", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body
    line = wait_access_line(auth_server, f"user={USER} CONNECT localhost:{http4.port}")
    assert "rep=0x00" in line
    assert PASSWORD not in auth_server.log()


def test_auth_ok_ip_target(auth_server: ServerProcess, http4: HttpServer) -> None:
    result = curl("--socks5", proxy(auth_server), "--proxy-user", f"{USER}:{PASSWORD}", http4.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body


def test_wrong_password_fails(auth_server: ServerProcess, http4: HttpServer) -> None:
    wrong = "not-the-password"
    result = curl(
        "--socks5-hostname",
        proxy(auth_server),
        "-U",
        f"{USER}:{wrong}",
        f"http://localhost:{http4.port}/",
    )
    assert result.returncode != 0  # 97: proxy handshake error
    assert HttpServer.body not in result.stdout
    assert result.stdout == b""
    wait_for(lambda: "authentication failed" in auth_server.log(), timeout=10)
    log = auth_server.log()
    assert wrong not in log
    assert PASSWORD not in log


def test_unknown_user_fails(auth_server: ServerProcess, http4: HttpServer) -> None:
    result = curl("--socks5", proxy(auth_server), "-U", f"mallory:{PASSWORD}", http4.url)
    assert result.returncode != 0
    assert result.stdout == b""
    assert PASSWORD not in auth_server.log()


def test_no_credentials_against_auth_server_fails(
    auth_server: ServerProcess, http4: HttpServer
) -> None:
    result = curl("--socks5", proxy(auth_server), http4.url)
    assert result.returncode != 0
    assert result.stdout == b""


def test_refused_target_fails(open_server: ServerProcess) -> None:
    from tests.helpers import refused_port

    port = refused_port()
    result = curl("--socks5", proxy(open_server), f"http://127.0.0.1:{port}/")
    assert result.returncode != 0
    assert result.stdout == b""
    line = wait_access_line(open_server, f"CONNECT 127.0.0.1:{port}")
    assert "rep=0x05" in line


def test_many_sequential_requests(open_server: ServerProcess, http4: HttpServer) -> None:
    """One curl, several URLs: each is a separate SOCKS session; all bodies arrive."""
    urls = [f"http://localhost:{http4.port}/n{i}" for i in range(5)]
    result = curl("--socks5-hostname", proxy(open_server), *urls)
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body * 5
