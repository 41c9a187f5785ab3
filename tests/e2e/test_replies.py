"""Raw-socket tests of every reply code and of method negotiation, byte for byte.

After a failure reply the server must close the connection at once (RFC 1928 section 6: "the
SOCKS server MUST terminate the TCP connection shortly after sending the reply") and keep serving
other clients.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.support import (
    PASSWORD,
    USER,
    access_lines,
    assert_closed,
    connect_proxy,
    echo_roundtrip,
    failure_reply,
    full_backlog_target,
    handshake,
    probe_hangs,
    read_reply,
    recv_exact,
    recv_until_eof,
    request,
    socks_open,
    socks_request,
    userpass,
    wait_for,
    wait_for_log,
)
from tests.helpers import refused_port
from tests.servers import EchoServer, ServerProcess, StubDns


def still_serving(server: ServerProcess, echo: EchoServer) -> None:
    """A fresh session through ``server`` works end to end."""
    with socks_open(server, "127.0.0.1", echo.port) as sock:
        echo_roundtrip(sock, b"still serving")


def expect_failure(
    server: ServerProcess, host: str | bytes, port: int, code: int, cmd: int = 1
) -> None:
    """CONNECT (or ``cmd``) gets exactly the failure reply ``code``, then the server closes."""
    sock, raw, _, _ = socks_request(server, host, port, cmd=cmd)
    with sock:
        assert raw == failure_reply(code), raw.hex()
        assert_closed(sock)


# -- 0x00 ----------------------------------------------------------------------------------------


def test_success_reply_carries_the_outgoing_local_address(open_server: ServerProcess) -> None:
    echo = EchoServer()
    try:
        with connect_proxy(open_server) as sock:
            handshake(sock)
            sock.sendall(request("127.0.0.1", echo.port))
            raw, host, port = read_reply(sock)
            assert raw[:4] == b"\x05\x00\x00\x01", raw.hex()
            assert wait_for(lambda: len(echo.peers) == 1, 10)
            assert (host, port) == echo.peers[0]
            echo_roundtrip(sock, b"ok")
    finally:
        echo.close()


def test_success_reply_ipv6_target_binds_ipv6(
    open_server: ServerProcess, echo6: EchoServer
) -> None:
    with connect_proxy(open_server) as sock:
        handshake(sock)
        sock.sendall(request("::1", echo6.port))
        raw, host, port = read_reply(sock)
        assert raw[:4] == b"\x05\x00\x00\x04", raw.hex()
        assert len(raw) == 22
        assert wait_for(lambda: len(echo6.peers) == 1, 10)
        assert (host, port) == echo6.peers[0]
        echo_roundtrip(sock, b"six")


def test_success_reply_for_a_domain(open_server: ServerProcess, module_echo: EchoServer) -> None:
    before = len(module_echo.peers)
    with connect_proxy(open_server) as sock:
        handshake(sock)
        sock.sendall(request("localhost", module_echo.port))
        raw, host, port = read_reply(sock)
        assert raw[:4] == b"\x05\x00\x00\x01", raw.hex()
        assert wait_for(lambda: len(module_echo.peers) > before, 10)
        assert (host, port) in module_echo.peers[before:]
        echo_roundtrip(sock, b"by name")


# -- 0x05 ----------------------------------------------------------------------------------------


def test_refused(open_server: ServerProcess, module_echo: EchoServer) -> None:
    expect_failure(open_server, "127.0.0.1", refused_port(), 0x05)
    still_serving(open_server, module_echo)


def test_refused_ipv6(open_server: ServerProcess, module_echo: EchoServer) -> None:
    from tests.e2e.support import has_ipv6

    if not has_ipv6():
        pytest.skip("::1 is not available")
    expect_failure(open_server, "::1", refused_port("::1"), 0x05)
    still_serving(open_server, module_echo)


def test_refused_by_name(open_server: ServerProcess, module_echo: EchoServer) -> None:
    expect_failure(open_server, "localhost", refused_port(), 0x05)
    still_serving(open_server, module_echo)


# -- 0x04 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dns_server(
    module_socksd: Callable[..., ServerProcess],
    nx_dns: StubDns,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """socksd with a static hosts map and a stub DNS server (NXDOMAIN for everything)."""
    config = tmp_path_factory.mktemp("dnscfg") / "socksd.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\n'
        f'dns = ["127.0.0.1:{nx_dns.port}"]\n'
        "resolve_timeout = 5\n"
        "[hosts]\n"
        '"good.test" = ["127.0.0.1"]\n'
    )
    return module_socksd("--config", str(config))


def test_nxdomain_is_host_unreachable(
    dns_server: ServerProcess, nx_dns: StubDns, module_echo: EchoServer
) -> None:
    expect_failure(dns_server, "no-such-name.test", 80, 0x04)
    assert any(q.rstrip(".") == "no-such-name.test" for q in nx_dns.questions), nx_dns.questions
    still_serving(dns_server, module_echo)


def test_hosts_map_name_connects(
    dns_server: ServerProcess, nx_dns: StubDns, module_echo: EchoServer
) -> None:
    asked = len(nx_dns.questions)
    with socks_open(dns_server, "good.test", module_echo.port) as sock:
        echo_roundtrip(sock, b"static map")
    with socks_open(dns_server, "GOOD.test.", module_echo.port) as sock:
        echo_roundtrip(sock, b"case and trailing dot")
    assert len(nx_dns.questions) == asked  # the map answered; no DNS query


@pytest.mark.parametrize(
    "name",
    [
        b"localhost\x00junk",
        b"local host",
        b"caf\xc3\xa9.test",
        b"\xff\xfe",
        b"",
        b"a..b",
        b"-leading-hyphen.test",
    ],
    ids=["nul", "space", "utf8", "high-bytes", "empty", "empty-label", "leading-hyphen"],
)
def test_invalid_names_are_host_unreachable(
    open_server: ServerProcess, module_echo: EchoServer, name: bytes
) -> None:
    expect_failure(open_server, name, module_echo.port, 0x04)
    still_serving(open_server, module_echo)


def test_nul_name_does_not_connect_to_the_prefix(open_server: ServerProcess) -> None:
    echo = EchoServer()
    try:
        expect_failure(open_server, b"localhost\x00junk", echo.port, 0x04)
        expect_failure(open_server, b"127.0.0.1\x00junk", echo.port, 0x04)
        assert echo.peers == []
    finally:
        echo.close()


# -- 0x07, 0x08 ----------------------------------------------------------------------------------


def test_unknown_command(open_server: ServerProcess, module_echo: EchoServer) -> None:
    expect_failure(open_server, "127.0.0.1", module_echo.port, 0x07, cmd=0x09)
    still_serving(open_server, module_echo)


@pytest.mark.parametrize("cmd", [0x02, 0x03], ids=["bind", "udp-associate"])
def test_bind_and_udp_succeed(
    open_server: ServerProcess, module_echo: EchoServer, cmd: int
) -> None:
    """BIND's first reply and UDP ASSOCIATE's reply: success, BND = 127.0.0.1 and a real port
    (tests/e2e/test_bind.py and test_udp.py test both commands in depth)."""
    sock, raw, host, port = socks_request(open_server, "127.0.0.1", 0, cmd=cmd)
    with sock:
        assert raw[:4] == b"\x05\x00\x00\x01", raw.hex()
        assert host == "127.0.0.1"
        assert port != 0
    still_serving(open_server, module_echo)


@pytest.mark.parametrize("cmd", [0x01, 0x02, 0x03], ids=["connect", "bind", "udp-associate"])
def test_commands_switched_off_are_0x07(
    socksd: Callable[..., ServerProcess], module_echo: EchoServer, cmd: int
) -> None:
    others = {0x01: "bind,udp", 0x02: "connect,udp", 0x03: "connect,bind"}[cmd]
    server = socksd("--commands", others)
    expect_failure(server, "127.0.0.1", module_echo.port, 0x07, cmd=cmd)


def test_request_with_a_wrong_version_logs_the_reply_sent(
    open_server: ServerProcess, module_echo: EchoServer
) -> None:
    """The access log shows the REP code written to the client, also when the parser raised
    without one (VER != 5 in the request)."""
    with connect_proxy(open_server) as sock:
        handshake(sock)
        sock.sendall(b"\x04" + request("127.0.0.1", module_echo.port)[1:])
        sent = recv_until_eof(sock)
        port = sock.getsockname()[1]
    assert sent == failure_reply(0x01)
    needle = f"127.0.0.1:{port} "
    assert wait_for(lambda: any(needle in line for line in access_lines(open_server)), 10)
    (line,) = [line for line in access_lines(open_server) if needle in line]
    assert " rep=0x01 " in line, line
    still_serving(open_server, module_echo)


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_unknown_address_type(
    open_server: ServerProcess, module_echo: EchoServer, atyp: int
) -> None:
    with connect_proxy(open_server) as sock:
        handshake(sock)
        sock.sendall(bytes((5, 1, 0, atyp)) + b"\x7f\x00\x00\x01" + struct.pack("!H", 80))
        assert recv_until_eof(sock) == failure_reply(0x08)
    still_serving(open_server, module_echo)


# -- 0x06 ----------------------------------------------------------------------------------------


def test_connect_timeout(socksd: Callable[..., ServerProcess], module_echo: EchoServer) -> None:
    server = socksd("--connect-timeout", "1")
    with full_backlog_target() as target:
        if not probe_hangs(target):
            pytest.skip("connects to a full accept queue do not hang on this kernel")
        sock, raw, _, _ = socks_request(server, target[0], target[1])
        with sock:
            assert raw == failure_reply(0x06), raw.hex()
            assert_closed(sock)
    still_serving(server, module_echo)
    assert "connect timeout after 1s" in server.log()


# -- method negotiation --------------------------------------------------------------------------


def test_only_userpass_offered_to_open_server(
    open_server: ServerProcess, module_echo: EchoServer
) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_until_eof(sock) == b"\x05\xff"
    still_serving(open_server, module_echo)


def test_only_noauth_offered_to_auth_server(auth_server: ServerProcess) -> None:
    with connect_proxy(auth_server) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_until_eof(sock) == b"\x05\xff"


def test_gssapi_only_is_refused(open_server: ServerProcess) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\x01\x01")
        assert recv_until_eof(sock) == b"\x05\xff"


def test_no_methods(open_server: ServerProcess, module_echo: EchoServer) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\x00")
        assert recv_until_eof(sock) == b"\x05\xff"
    still_serving(open_server, module_echo)


@pytest.mark.parametrize(
    "greeting", [b"\x04\x01\x00", b"\x00\x01\x00", b"\x06\x01\x00"], ids=["socks4", "zero", "six"]
)
def test_wrong_version_closes(
    open_server: ServerProcess, module_echo: EchoServer, greeting: bytes
) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(greeting)
        # Closed; socksd answers "no acceptable method" first (harmless, documented behaviour).
        assert recv_until_eof(sock) in (b"", b"\x05\xff")
    still_serving(open_server, module_echo)


def test_255_methods_noauth(open_server: ServerProcess, module_echo: EchoServer) -> None:
    methods = bytes(range(0xFE, 0, -1)) + b"\x00"  # 254 useless methods, NO AUTH last
    assert len(methods) == 255
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\xff" + methods)
        assert recv_exact(sock, 2) == b"\x05\x00"
        sock.sendall(request("127.0.0.1", module_echo.port))
        raw, _, _ = read_reply(sock)
        assert raw[:2] == b"\x05\x00"
        echo_roundtrip(sock, b"255")


def test_255_methods_userpass(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    methods = bytes(m for m in range(0xFF) if m != 0x02) + b"\x02"  # 0x00 offered too
    assert len(methods) == 255
    with connect_proxy(auth_server) as sock:
        sock.sendall(b"\x05\xff" + methods)
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(userpass(USER, PASSWORD))
        assert recv_exact(sock, 2) == b"\x01\x00"
        sock.sendall(request("127.0.0.1", module_echo.port))
        raw, _, _ = read_reply(sock)
        assert raw[:2] == b"\x05\x00"
        echo_roundtrip(sock, b"255 auth")


def test_noauth_preferred_when_both_offered(open_server: ServerProcess) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\x02\x02\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"


# -- username/password ---------------------------------------------------------------------------


def _userpass_status(server: ServerProcess, user: bytes, password: bytes) -> socket.socket:
    sock = connect_proxy(server)
    sock.sendall(b"\x05\x01\x02")
    assert recv_exact(sock, 2) == b"\x05\x02"
    sock.sendall(userpass(user, password))
    return sock


def test_password_with_nul_suffix_fails(
    auth_server: ServerProcess, module_echo: EchoServer
) -> None:
    with _userpass_status(auth_server, USER.encode(), PASSWORD.encode() + b"\x00junk") as sock:
        status = recv_exact(sock, 2)
        assert status[0] == 0x01
        assert status[1] != 0x00
        assert_closed(sock)
    with socks_open(
        auth_server, "127.0.0.1", module_echo.port, user=USER, password=PASSWORD
    ) as sock:
        echo_roundtrip(sock, b"after nul")


def test_wrong_password_status_1_and_close(auth_server: ServerProcess) -> None:
    with _userpass_status(auth_server, USER.encode(), b"wrong password") as sock:
        assert recv_exact(sock, 2) == b"\x01\x01"
        assert_closed(sock)


def test_unknown_user_status_1_and_close(auth_server: ServerProcess) -> None:
    with _userpass_status(auth_server, b"mallory", PASSWORD.encode()) as sock:
        assert recv_exact(sock, 2) == b"\x01\x01"
        assert_closed(sock)


def test_password_prefix_and_truncation_fail(auth_server: ServerProcess) -> None:
    for candidate in (PASSWORD[:-1], PASSWORD + "x", PASSWORD.upper(), ""):
        with _userpass_status(auth_server, USER.encode(), candidate.encode()) as sock:
            assert recv_exact(sock, 2) == b"\x01\x01", candidate
            assert_closed(sock)


def test_userpass_wrong_subnegotiation_version(auth_server: ServerProcess) -> None:
    with connect_proxy(auth_server) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(b"\x05" + userpass(USER, PASSWORD)[1:])
        rest = recv_until_eof(sock)
        assert rest in (b"", b"\x01\x01"), rest


def test_correct_password(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    with _userpass_status(auth_server, USER.encode(), PASSWORD.encode()) as sock:
        assert recv_exact(sock, 2) == b"\x01\x00"
        sock.sendall(request("127.0.0.1", module_echo.port))
        raw, _, _ = read_reply(sock)
        assert raw[:4] == b"\x05\x00\x00\x01"
        echo_roundtrip(sock, b"authenticated")


def test_failed_replies_logged(auth_server: ServerProcess) -> None:
    """A failed login leaves an access-log line with the user and no password."""
    with _userpass_status(auth_server, b"eve", b"eve-password-xyz") as sock:
        assert recv_exact(sock, 2) == b"\x01\x01"
        assert_closed(sock)
    assert wait_for(lambda: "user=eve " in auth_server.log(), 10)
    assert "eve-password-xyz" not in auth_server.log()


def test_non_utf8_user_name_is_logged_quoted(
    socksd: Callable[..., ServerProcess], users_file: Path
) -> None:
    """Byte 0xff and the text backslash-x-f-f are different names, and both are quoted."""
    server = socksd("--users", str(users_file))  # its own: the failures count against loopback
    for raw in (b"eve\xff", b"eve\\xff"):
        with _userpass_status(server, raw, b"x") as sock:
            assert recv_exact(sock, 2) == b"\x01\x01"
            assert_closed(sock)
    wait_for_log(server, 'user="eve\\udcff" ')
    wait_for_log(server, 'user="eve\\\\xff" ')


def test_user_name_cannot_forge_access_log_lines(auth_server: ServerProcess) -> None:
    forged = b"2026-01-01T00:00:00.000Z 10.9.8.7:1 user=root CONNECT forged.test:443 rep=0x00"
    with _userpass_status(auth_server, b"eve\n" + forged, b"x") as sock:
        assert recv_exact(sock, 2) == b"\x01\x01"
        assert_closed(sock)
    assert wait_for(lambda: "forged.test" in auth_server.log(), 10)
    for line in auth_server.log().splitlines():
        assert not line.startswith(forged.decode()[:30]), line
