"""Access rules end to end: curl and python-socks see 0x02, the access log names the rule, each
field allows and denies over the wire (IPv4 and IPv6), names are matched by name and by the
addresses they resolve to, the accept checkpoint closes before negotiation, ``protect_local``
guards the host from other machines (in a network namespace), ``check-config`` prints it all."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from python_socks import ProxyError as PySocksProxyError
from python_socks.async_.asyncio import Proxy as AsyncioProxy

from tests.e2e.admin_support import (
    access_line,
    closed_before_negotiation,
    config_server,
    connect_from,
    rep,
    run_curl,
    socks_reply,
    write_config,
)
from tests.e2e.support import (
    PASSWORD,
    USER,
    HttpServer,
    add_user,
    echo_roundtrip,
    has_ipv6,
    recv_exact,
    socksd_cli,
    wait_for,
)
from tests.servers import EchoServer, ServerProcess, StubDns

# -- real clients ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deny_http(
    module_socksd: Callable[..., ServerProcess],
    http4: HttpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """Rule 1 allows nothing special; rule 2 denies the loopback HTTP server's port."""
    path = write_config(
        tmp_path_factory.mktemp("rules") / "deny.toml",
        f"""
[[rules]]
action = "deny"
ports = ["1-2"]
[[rules]]
action = "deny"
to = ["127.0.0.0/8", "localhost"]
ports = ["{http4.port}"]
""",
    )
    return module_socksd("--config", str(path))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("mode", ["--socks5", "--socks5-hostname"])
def test_curl_gets_not_allowed(deny_http: ServerProcess, http4: HttpServer, mode: str) -> None:
    host = "localhost" if mode == "--socks5-hostname" else "127.0.0.1"
    result = run_curl(mode, f"{deny_http.host}:{deny_http.port}", f"http://{host}:{http4.port}/")
    assert result.returncode == 97, result.stderr  # CURLE_PROXY: the proxy refused
    assert b"(2)" in result.stderr or b"not allowed" in result.stderr, result.stderr
    line = access_line(deny_http, f"CONNECT {host}:{http4.port} ")
    assert " rep=0x02 " in line and " rule=2 error=" in line
    assert 'error="denied by rule 2"' in line


def test_python_socks_gets_not_allowed(deny_http: ServerProcess, http4: HttpServer) -> None:
    async def attempt() -> None:
        proxy = AsyncioProxy.from_url(f"socks5://{deny_http.host}:{deny_http.port}")
        sock = await proxy.connect("127.0.0.1", http4.port, timeout=15)
        sock.close()

    with pytest.raises(PySocksProxyError) as info:
        asyncio.run(attempt())
    assert info.value.error_code == 2


def test_allowed_session_is_not_touched(deny_http: ServerProcess, module_echo: EchoServer) -> None:
    code, sock = socks_reply(deny_http, "127.0.0.1", module_echo.port)
    with sock:
        assert code == 0
        echo_roundtrip(sock, b"allowed")
    line = access_line(deny_http, f"CONNECT 127.0.0.1:{module_echo.port} ")
    assert " rep=0x00 " in line and " rule=" not in line  # the default allowed it


# -- each field over the wire ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_echos() -> Iterator[tuple[EchoServer, EchoServer]]:
    a, b = EchoServer(), EchoServer()
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def matrix_server(
    module_socksd: Callable[..., ServerProcess],
    tmp_path_factory: pytest.TempPathFactory,
    two_echos: tuple[EchoServer, EchoServer],
) -> ServerProcess:
    a, b = two_echos
    tmp = tmp_path_factory.mktemp("matrix")
    users = tmp / "users"
    add_user(users, "alice", "pw-alice")
    add_user(users, "bob", "pw-bob")
    add_user(users, "carol", "pw-carol")
    path = write_config(
        tmp / "matrix.toml",
        f"""
users = "{users}"
default = "deny"
[groups]
ops = ["carol"]
[[rules]]
action = "deny"
clients = ["127.0.0.2/32"]
users = ["alice"]
[[rules]]
action = "deny"
users = ["@ops"]
ports = ["{b.port}"]
[[rules]]
action = "allow"
users = ["alice", "@ops"]
commands = ["connect"]
[[rules]]
action = "allow"
users = ["bob"]
to = ["127.0.0.1/32"]
ports = ["{a.port}"]
""",
    )
    return module_socksd("--config", str(path))


@pytest.mark.parametrize(
    ("source", "user", "which", "expected", "rule"),
    [
        ("127.0.0.1", "alice", "a", 0, "3"),
        ("127.0.0.2", "alice", "a", 2, "1"),  # clients
        ("127.0.0.2", "carol", "a", 0, "3"),  # users: rule 1 is alice's only
        ("127.0.0.1", "carol", "b", 2, "2"),  # @group and ports
        ("127.0.0.1", "carol", "a", 0, "3"),
        ("127.0.0.1", "bob", "a", 0, "4"),  # to and ports
        ("127.0.0.1", "bob", "b", 2, "default"),
    ],
)
def test_field_matrix(
    matrix_server: ServerProcess,
    two_echos: tuple[EchoServer, EchoServer],
    source: str,
    user: str,
    which: str,
    expected: int,
    rule: str,
) -> None:
    target = two_echos[0] if which == "a" else two_echos[1]
    code, sock = socks_reply(
        matrix_server, "127.0.0.1", target.port, source=source, user=user, password=f"pw-{user}"
    )
    local_port = sock.getsockname()[1]
    with sock:
        assert code == expected
        if code == 0:
            echo_roundtrip(sock, b"through")
    line = access_line(matrix_server, f"{source}:{local_port} user={user} ")
    assert f" rule={rule}" in f"{line} ", line


def test_command_field(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, _ = config_server(
        socksd,
        tmp_path,
        '[[rules]]\naction = "deny"\ncommands = ["connect"]\nports = ["1-1023"]\n'
        '[[rules]]\naction = "deny"\ncommands = ["bind", "udp"]',
    )
    assert rep(server, "127.0.0.1", echo.port) == 0  # rule 2 is for other commands
    assert rep(server, "127.0.0.1", 80) == 2  # rule 1


@pytest.mark.skipif(not has_ipv6(), reason="::1 is not available")
def test_ipv6_client_and_target(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo6: EchoServer
) -> None:
    server, _ = config_server(
        socksd,
        tmp_path,
        f'default = "deny"\n[[rules]]\naction = "deny"\nto = ["::1/128"]\nports = ["1-1023"]\n'
        f'[[rules]]\naction = "allow"\nclients = ["::1/128"]\nto = ["::/0"]\nports = ["{echo6.port}"]',
        listen="[::1]:0",
    )
    code, sock = socks_reply(server, "::1", echo6.port, source="::1")
    with sock:
        assert code == 0
        echo_roundtrip(sock, b"v6")
    assert rep(server, "::1", 80, source="::1") == 2
    assert access_line(server, "CONNECT [::1]:80 ").count("rule=1") == 1
    # an IPv4 target does not match ::/0, and the default denies
    assert rep(server, "127.0.0.1", echo6.port, source="::1") == 2


# -- accept checkpoint -------------------------------------------------------------------------------


def test_denied_client_is_closed_before_negotiation(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, _ = config_server(
        socksd,
        tmp_path,
        '[[rules]]\naction = "deny"\nclients = ["127.0.0.2/32", "127.0.0.3"]\n'
        '[[rules]]\naction = "allow"\nclients = ["127.0.0.4/32"]\nusers = ["nobody"]',
        "--default",
        "deny",
    )
    assert closed_before_negotiation(connect_from(server, "127.0.0.2"))
    assert closed_before_negotiation(connect_from(server, "127.0.0.3"))
    line = access_line(server, "127.0.0.2:")
    assert " rule=1 " in line and "denied by rule 1 at accept" in line and "rep=-" in line
    # 127.0.0.4 might be allowed for a user: negotiation goes on, the request is denied
    code, sock = socks_reply(server, "127.0.0.1", echo.port, source="127.0.0.4")
    sock.close()
    assert code == 2
    # 127.0.0.5 matches no rule and the default denies: closed at accept
    assert closed_before_negotiation(connect_from(server, "127.0.0.5"))
    assert "denied by default at accept" in access_line(server, "127.0.0.5:")


# -- names and addresses ---------------------------------------------------------------------------


@pytest.fixture
def same_port_pair() -> Iterator[tuple[int, list[bytes]]]:
    """Listeners on 127.0.0.1:P and 127.0.0.3:P that answer with their address and close."""
    listeners = []
    first = socket.socket()
    first.bind(("127.0.0.1", 0))
    port = first.getsockname()[1]
    second = socket.socket()
    second.bind(("127.0.0.3", port))
    seen: list[bytes] = []
    for sock in (first, second):
        sock.listen(16)
        sock.settimeout(0.2)
        listeners.append(sock)
    stop = threading.Event()

    def serve(sock: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                name = sock.getsockname()[0].encode()
                seen.append(name)
                conn.sendall(name)

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
    for t in threads:
        t.start()
    yield port, seen
    stop.set()
    for t in threads:
        t.join(2)
    for s in listeners:
        s.close()


def test_name_is_checked_against_its_addresses(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    same_port_pair: tuple[int, list[bytes]],
) -> None:
    port, seen = same_port_pair
    server, _ = config_server(
        socksd,
        tmp_path,
        '[[rules]]\naction = "deny"\nto = ["127.0.0.3/32"]\n'
        '[hosts]\n"both.test" = ["127.0.0.3", "127.0.0.1"]\n"three.test" = ["127.0.0.3"]',
    )
    # the denied address is dropped: the connection goes to the other one, never to 127.0.0.3
    for _ in range(3):
        code, sock = socks_reply(server, "both.test", port)
        with sock:
            assert code == 0
            assert recv_exact(sock, 9) == b"127.0.0.1"
    assert b"127.0.0.3" not in seen
    assert "-> 127.0.0.1:" in access_line(server, f"CONNECT both.test:{port} ")
    # no address left: denied, by the rule that denied the address
    assert rep(server, "three.test", port) == 2
    line = access_line(server, f"CONNECT three.test:{port} ")
    assert " rule=1 " in line and "denied by rule 1" in line
    # the address itself
    assert rep(server, "127.0.0.3", port) == 2


def test_domain_patterns(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, _ = config_server(
        socksd,
        tmp_path,
        'default = "deny"\n[[rules]]\naction = "allow"\nto = ["*.ok.test", "exact.test"]\n'
        '[hosts]\n"a.ok.test" = ["127.0.0.1"]\n"ok.test" = ["127.0.0.1"]\n'
        '"exact.test" = ["127.0.0.1"]\n"sub.exact.test" = ["127.0.0.1"]',
    )
    results = {
        name: rep(server, name, echo.port)
        for name in ("a.ok.test", "A.OK.TEST.", "ok.test", "exact.test", "sub.exact.test")
    }
    assert results == {
        "a.ok.test": 0,
        "A.OK.TEST.": 0,
        "ok.test": 2,  # *.ok.test is below ok.test only
        "exact.test": 0,
        "sub.exact.test": 2,
    }
    # names never match an address: the same target by address is denied by default
    assert rep(server, "127.0.0.1", echo.port) == 2


def test_name_denied_before_any_lookup(
    socksd: Callable[..., ServerProcess], tmp_path: Path, nx_dns: StubDns
) -> None:
    server, _ = config_server(
        socksd,
        tmp_path,
        f'dns = ["127.0.0.1:{nx_dns.port}"]\n'
        '[[rules]]\naction = "deny"\nto = [".blocked.test"]\n'
        '[[rules]]\naction = "deny"\nto = ["10.0.0.0/8"]',
    )
    assert rep(server, "x.blocked.test", 443) == 2
    assert rep(server, "blocked.test", 443) == 2
    assert rep(server, "other.test", 443) == 4  # looked up (NXDOMAIN): a network rule needed it
    wait_for(lambda: any("other.test" in q for q in nx_dns.questions), 10)
    assert any("other.test" in q for q in nx_dns.questions)
    assert not any("blocked.test" in q for q in nx_dns.questions)


def test_rule_idle_timeout(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, _ = config_server(
        socksd,
        tmp_path,
        f'[[rules]]\naction = "allow"\nto = ["127.0.0.1"]\nports = ["{echo.port}"]\n'
        "idle_timeout = 0.4\n",
    )
    code, sock = socks_reply(server, "127.0.0.1", echo.port)
    with sock:
        assert code == 0
        echo_roundtrip(sock, b"then silence")
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the rule's idle timeout
    assert "idle for 0.4s" in access_line(server, f"CONNECT 127.0.0.1:{echo.port} ")


def test_json_access_log_has_the_rule(socksd: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server, _ = config_server(
        socksd, tmp_path, 'log_format = "json"\n[[rules]]\naction = "deny"\nports = ["9"]'
    )
    assert rep(server, "127.0.0.1", 9) == 2
    wait_for(lambda: '"rule":"1"' in server.log(), 10)
    record = next(json.loads(line) for line in server.log().splitlines() if '"rule":"1"' in line)
    assert record["reply"] == 2 and record["error"] == "denied by rule 1"


# -- check-config ------------------------------------------------------------------------------------


def test_check_config_prints_the_effective_rules(tmp_path: Path, users_file: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f"""
users = "{users_file}"
default = "deny"
max_sessions_per_ip = 8
[groups]
ops = ["bob", "carol"]
[bandwidth]
"@ops" = 500000
[[rules]]
action = "deny"
clients = ["10.0.0.0/8"]
users = ["{USER}", "@ops"]
commands = ["connect", "bind", "udp"]
to = ["192.168.0.0/16", "*.example.com", "example.org"]
ports = ["80", "443", "8000-8999"]
[[rules]]
action = "allow"
idle_timeout = 30
"""
    )
    result = socksd_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{path}: valid" in out
    assert "authentication: username/password, 1 users" in out
    assert "max_sessions_per_ip=8" in out and "max_sessions_per_user=none" in out
    assert "bandwidth: @ops 500000 bytes/s each way" in out
    assert (
        f"  rule 1: deny clients=10.0.0.0/8 users={USER},@ops commands=connect,bind,udp "
        "to=192.168.0.0/16,*.example.com,example.org ports=80,443,8000-8999\n" in out
    )
    assert "  rule 2: allow idle_timeout=30\n" in out
    assert "  protect_local: for clients outside 127.0.0.0/8, ::1/128, deny 0.0.0.0/8" in out
    assert out.endswith("  default: deny\n")
    assert PASSWORD not in out


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            '[[rules]]\naction = "allow"\nclients = ["10.0.0.1/8"]',
            "rule 1.clients: '10.0.0.1/8' has host bits set; write 10.0.0.0/8",
        ),
        ('[[rules]]\naction = "allow"\nusers = ["@nope"]', "rule 1.users: '@nope' is not a group"),
        ("[[rules]]\nclients = []", 'rule 1: missing action = "allow" or "deny"'),
        ('default = "block"', 'default: expected "allow" or "deny", got \'block\''),
        ('[bandwidth]\nalice = "fast"', "bandwidth.alice: expected bytes per second"),
        ('[bandwidth]\n"@x" = 5', "bandwidth: '@x' is not a group in [groups]"),
        ("max_sessions_per_ip = -1", "max_sessions_per_ip: must be at least 0"),
        ('users = "/nonexistent/users"', "users: cannot read /nonexistent/users: No such file"),
        ("rules = [", "is not valid TOML"),
    ],
)
def test_check_config_errors(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body + "\n")
    result = socksd_cli("check-config", str(path))
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("socksd: error: "), result.stderr
    assert message in lines[0]
    # serve refuses the same file with the same line
    served = socksd_cli("serve", "--config", str(path), timeout=30)
    assert served.returncode == 2 and served.stderr.strip() == lines[0]
