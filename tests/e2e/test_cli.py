"""The ``socksd`` command line: version, help, safety checks, config files, users, log formats."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    PASSWORD,
    USER,
    add_user,
    assert_closed,
    connect_proxy,
    echo_roundtrip,
    has_ipv6,
    recv_exact,
    recv_until_eof,
    socks_open,
    socks_request,
    socksd_cli,
    userpass,
    wait_for,
)
from tests.helpers import refused_port
from tests.servers import EchoServer, ServerProcess


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 2 and exactly one ``socksd: error: ...`` line on stderr (no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("socksd: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def serve_fails(*args: str) -> str:
    """``socksd serve ARGS`` must refuse to start; return its one error line."""
    return one_error_line(socksd_cli("serve", *args, timeout=30))


# -- basics --------------------------------------------------------------------------------------


def test_version() -> None:
    from socksd import __version__

    result = socksd_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"socksd {__version__}"


def test_console_script_version() -> None:
    script = Path(sys.executable).parent / "socksd"
    if not script.exists():
        pytest.skip("the socksd console script is not installed next to python")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("socksd ")


def test_serve_help() -> None:
    result = socksd_cli("serve", "--help")
    assert result.returncode == 0
    for flag in (
        "--listen",
        "--users",
        "--allow-open",
        "--config",
        "--handshake-timeout",
        "--connect-timeout",
        "--idle-timeout",
        "--shutdown-timeout",
        "--log-format",
    ):
        assert flag in result.stdout, flag


def test_no_command_is_a_usage_error() -> None:
    result = socksd_cli()
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()


# -- open proxy refusal --------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_open_proxy_refused(listen: str) -> None:
    line = serve_fails("--listen", listen)
    assert "--allow-open" in line


def test_open_proxy_refused_mixed_listens() -> None:
    line = serve_fails("--listen", "127.0.0.1:0", "--listen", "0.0.0.0:0")
    assert "0.0.0.0:0" in line
    assert "--allow-open" in line


def test_allow_open_starts(socksd: Callable[..., ServerProcess], module_echo: EchoServer) -> None:
    server = socksd("--listen", "0.0.0.0:0", "--allow-open")
    assert server.host == "0.0.0.0"
    server.host = "127.0.0.1"  # reach it via loopback only
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"allowed open")


def test_exposed_listen_with_users_starts(
    socksd: Callable[..., ServerProcess], users_file: Path, module_echo: EchoServer
) -> None:
    server = socksd("--listen", "0.0.0.0:0", "--users", str(users_file))
    server.host = "127.0.0.1"
    with socks_open(server, "127.0.0.1", module_echo.port, user=USER, password=PASSWORD) as sock:
        echo_roundtrip(sock, b"exposed with auth")


# -- config file ---------------------------------------------------------------------------------


def test_config_file_keys(
    socksd: Callable[..., ServerProcess], tmp_path: Path, users_file: Path, module_echo: EchoServer
) -> None:
    users = tmp_path / "users.htpasswd"
    users.write_bytes(users_file.read_bytes())
    config = tmp_path / "socksd.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\n'
        'users = "users.htpasswd"  # relative to the config file\n'
        "handshake_timeout = 1\n"
        "connect_timeout = 5\n"
        "idle_timeout = 0\n"
        "shutdown_timeout = 5\n"
        'log_level = "info"\n'
        "max_sessions = 100\n"
    )
    server = socksd("--config", str(config))
    # users from the file: no-auth is refused, alice works.
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_until_eof(sock) == b"\x05\xff"
    with socks_open(server, "127.0.0.1", module_echo.port, user=USER, password=PASSWORD) as sock:
        echo_roundtrip(sock, b"configured")
    # handshake_timeout = 1 from the file.
    with connect_proxy(server) as sock:
        assert recv_until_eof(sock, 10) == b""
    assert "handshake not done within 1s" in server.log()


def test_flags_override_config(socksd: Callable[..., ServerProcess], tmp_path: Path) -> None:
    unused = refused_port()
    config = tmp_path / "socksd.toml"
    config.write_text(f'listen = ["127.0.0.1:{unused}"]\nhandshake_timeout = 60\n')
    server = socksd("--config", str(config), "--listen", "127.0.0.1:0", "--handshake-timeout", "1")
    assert server.port != unused
    with connect_proxy(server) as sock:
        assert recv_until_eof(sock, 10) == b""
    assert "handshake not done within 1s" in server.log()


def test_config_allow_open_key(
    socksd: Callable[..., ServerProcess], tmp_path: Path, module_echo: EchoServer
) -> None:
    config = tmp_path / "socksd.toml"
    config.write_text('listen = "0.0.0.0:0"\nallow_open = true\n')
    server = socksd("--config", str(config))
    server.host = "127.0.0.1"
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"open by config")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("foo = 1\n", "foo"),
        ('listen = ["127.0.0.1:0"]\nhandshake_timeout = "ten"\n', "handshake_timeout"),
        ('listen = ["127.0.0.1:0"]\nconnect_timeout = -1\n', "connect_timeout"),
        ('listen = ["127.0.0.1:0"]\nmax_sessions = 1.5\n', "max_sessions"),
        ('listen = ["127.0.0.1:0"]\nallow_open = "yes"\n', "allow_open"),
        ('listen = ["127.0.0.1:0"]\nlog_format = "xml"\n', "log_format"),
        ('listen = ["nohost"]\n', "listen"),
        ('listen = ["127.0.0.1:99999"]\n', "listen"),
        ("listen = 5\n", "listen"),
        ('listen = ["127.0.0.1:0"]\n[hosts]\n"a.test" = ["not-an-ip"]\n', "hosts"),
        ("listen = [\n", "TOML"),
        ("= 1\n", "TOML"),
    ],
    ids=[
        "unknown-key",
        "wrong-type",
        "negative",
        "float-int",
        "bool",
        "choice",
        "listen-syntax",
        "listen-port",
        "listen-type",
        "hosts-ip",
        "toml-unclosed",
        "toml-no-key",
    ],
)
def test_bad_config(tmp_path: Path, content: str, needle: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    line = serve_fails("--config", str(config))
    assert needle in line, line


@pytest.mark.parametrize("source", ["flag", "file"])
def test_bad_dns_server(tmp_path: Path, source: str) -> None:
    if source == "flag":
        line = serve_fails("--listen", "127.0.0.1:0", "--dns", "not-an-ip")
    else:
        config = tmp_path / "bad.toml"
        config.write_text('listen = ["127.0.0.1:0"]\ndns = ["not-an-ip"]\n')
        line = serve_fails("--config", str(config))
    assert "dns" in line


def test_bad_hosts_empty_list(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('listen = ["127.0.0.1:0"]\n[hosts]\n"a.test" = []\n')
    line = serve_fails("--config", str(config))
    assert "hosts" in line


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    line = serve_fails("--config", str(missing))
    assert str(missing) in line


def test_bad_flag_values() -> None:
    line = serve_fails("--listen", "127.0.0.1:0", "--handshake-timeout", "0")
    assert "handshake_timeout" in line
    line = serve_fails("--listen", "127.0.0.1")
    assert "listen" in line


# -- users ---------------------------------------------------------------------------------------


def test_users_file_with_sha_hash(tmp_path: Path) -> None:
    users = tmp_path / "users.htpasswd"
    users.write_text("# comment\nalice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    line = serve_fails("--listen", "127.0.0.1:0", "--users", str(users))
    assert str(users) in line
    assert "line 2" in line
    assert "W6ph5Mm5Pz8GgiULbPgzG37mj9g" not in line


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("alice\n", "line 1"),
        ("alice:\n", "line 1"),
        ("a:$2y$12$short\n", "line 1"),
        ("alice:plaintext\nalice:plaintext\n", "line 1"),
    ],
    ids=["no-separator", "no-hash", "bad-bcrypt", "plaintext"],
)
def test_users_file_bad_lines(tmp_path: Path, content: str, needle: str) -> None:
    users = tmp_path / "users.htpasswd"
    users.write_text(content)
    line = serve_fails("--listen", "127.0.0.1:0", "--users", str(users))
    assert str(users) in line
    assert needle in line


def test_users_file_missing(tmp_path: Path) -> None:
    users = tmp_path / "nope.htpasswd"
    line = serve_fails("--listen", "127.0.0.1:0", "--users", str(users))
    assert str(users) in line


def test_user_add_del_list_round_trip(
    socksd: Callable[..., ServerProcess], tmp_path: Path, module_echo: EchoServer
) -> None:
    users = tmp_path / "users.htpasswd"
    add_user(users, "alice", "first-password")
    add_user(users, "bob", "bob-password")
    assert os.stat(users).st_mode & 0o777 == 0o600
    listed = socksd_cli("user", "list", "--users", str(users))
    assert listed.returncode == 0
    assert listed.stdout.split() == ["alice", "bob"]
    text = users.read_text()
    assert "first-password" not in text
    assert re.fullmatch(
        r"alice:\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\nbob:\$2[aby]\$\d\d\$"
        r"[./A-Za-z0-9]{53}\n",
        text,
    ), text

    # Change alice's password, delete bob.
    changed = socksd_cli(
        "user", "add", "alice", "--users", str(users), "--password-stdin", stdin="second-password\n"
    )
    assert changed.returncode == 0, changed.stderr
    assert "updated" in changed.stdout
    deleted = socksd_cli("user", "del", "bob", "--users", str(users))
    assert deleted.returncode == 0, deleted.stderr
    listed = socksd_cli("user", "list", "--users", str(users))
    assert listed.stdout.split() == ["alice"]
    again = socksd_cli("user", "del", "bob", "--users", str(users))
    assert "bob" in one_error_line(again)

    # The server uses the file as it is now.
    server = socksd("--users", str(users))
    with socks_open(
        server, "127.0.0.1", module_echo.port, user="alice", password="second-password"
    ) as sock:
        echo_roundtrip(sock, b"new password")
    for name, password in (("alice", "first-password"), ("bob", "bob-password")):
        with connect_proxy(server) as sock:
            sock.sendall(b"\x05\x01\x02" + userpass(name, password))
            assert recv_exact(sock, 4) == b"\x05\x02\x01\x01", name
            assert_closed(sock)


@pytest.mark.parametrize(
    ("name", "password"),
    [("alice", ""), ("a:b", "pw"), ("alice", "x" * 73)],
    ids=["empty-password", "colon-in-name", "password-too-long"],
)
def test_user_add_rejects(tmp_path: Path, name: str, password: str) -> None:
    users = tmp_path / "users.htpasswd"
    result = socksd_cli(
        "user", "add", name, "--users", str(users), "--password-stdin", stdin=password + "\n"
    )
    one_error_line(result)
    assert not users.exists() or name not in users.read_text()


# -- log formats ---------------------------------------------------------------------------------


@pytest.fixture
def json_server(tmp_path: Path, users_file: Path) -> Iterator[ServerProcess]:
    """socksd with --log-format json (the shared starter expects text log lines)."""
    log_path = tmp_path / "json.log"
    with log_path.open("w") as logf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "socksd",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--users",
                str(users_file),
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = ServerProcess(proc, "127.0.0.1", 0, log_path)
    try:
        found = wait_for(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", server.log()), 15)
        assert found, server.log()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", server.log())
        assert match is not None
        server.port = int(match.group(1))
        yield server
    finally:
        server.stop()


def test_json_log_format(json_server: ServerProcess, module_echo: EchoServer) -> None:
    with socks_open(
        json_server, "localhost", module_echo.port, user=USER, password=PASSWORD
    ) as sock:
        echo_roundtrip(sock, b"12345")
    refused = refused_port()
    sock, raw, _, _ = socks_request(json_server, "127.0.0.1", refused, user=USER, password=PASSWORD)
    sock.close()
    assert raw[1] == 5, raw.hex()

    def records() -> list[dict[str, object]]:
        out = []
        for line in json_server.log().splitlines():
            obj = json.loads(line)  # every line is JSON, server logs included
            if "command" in obj:
                out.append(obj)
        return out

    assert wait_for(lambda: len(records()) >= 2, 10), json_server.log()
    ok, failed = records()[:2]
    for rec in (ok, failed):
        for key in (
            "client",
            "user",
            "command",
            "target",
            "reply",
            "bytes_up",
            "bytes_down",
            "duration",
        ):
            assert key in rec, (key, rec)
    assert ok["user"] == USER
    assert ok["command"] == "CONNECT"
    assert ok["target"] == f"localhost:{module_echo.port}"
    assert ok["reply"] == 0
    assert ok["bytes_up"] == 5
    assert ok["bytes_down"] == 5
    assert isinstance(ok["duration"], int | float)
    assert str(ok["client"]).startswith("127.0.0.1:")
    assert failed["reply"] == 5
    assert failed["target"] == f"127.0.0.1:{refused}"
    assert PASSWORD not in json_server.log()


def test_access_log_to_file(
    socksd: Callable[..., ServerProcess], tmp_path: Path, module_echo: EchoServer
) -> None:
    access = tmp_path / "access.log"
    server = socksd("--access-log", str(access))
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"to a file")
    assert wait_for(lambda: access.exists() and "rep=0x00" in access.read_text(), 10)
    assert f"CONNECT 127.0.0.1:{module_echo.port}" in access.read_text()
    assert "rep=" not in server.log()


def test_access_log_off(socksd: Callable[..., ServerProcess], module_echo: EchoServer) -> None:
    server = socksd("--access-log", "off")
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"not logged")
    assert server.stop() == 0  # a clean stop: every line the session had to log is written
    assert "stopped" in server.log()
    assert "rep=" not in server.log()


# -- several listen addresses --------------------------------------------------------------------


def _nofile(soft: int, hard: int) -> tuple[str, ...]:
    """Run under these open-files limits (util-linux prlimit)."""
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    return ("prlimit", f"--nofile={soft}:{hard}", "--")


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


def test_default_max_sessions_fits_a_stock_open_files_limit(
    socksd: Callable[..., ServerProcess],
) -> None:
    """Soft 1024, hard 20000 (a stock machine): the soft limit is raised to the hard one, the
    default max_sessions is lowered to what that holds, with an info line and no warning."""
    server = socksd(launcher=_nofile(1024, 20000))
    assert _soft_nofile(server.proc.pid) == 20000
    log = server.log()
    assert "WARNING" not in log, log
    assert "max_sessions 9968: what the open-files limit 20000 holds" in log, log


def test_explicit_max_sessions_beyond_the_limit_warns(
    socksd: Callable[..., ServerProcess],
) -> None:
    server = socksd("--max-sessions", "10000", launcher=_nofile(1024, 20000))
    assert "max_sessions 10000 needs about 20064 open files per process" in server.log()


def test_two_listen_addresses(
    socksd: Callable[..., ServerProcess], module_echo: EchoServer
) -> None:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    server = socksd("--listen", "127.0.0.1:0", "--listen", "[::1]:0")
    lines = re.findall(r"listening on (\S+)", server.log())
    assert len(lines) == 2, server.log()
    v4 = next(a for a in lines if a.startswith("127.0.0.1:"))
    v6 = next(a for a in lines if a.startswith("[::1]:"))
    for host, port in (
        ("127.0.0.1", int(v4.rpartition(":")[2])),
        ("::1", int(v6.rpartition(":")[2])),
    ):
        server.host, server.port = host, port
        with socks_open(server, "127.0.0.1", module_echo.port) as sock:
            echo_roundtrip(sock, host.encode())


def test_listen_port_in_use(socksd: Callable[..., ServerProcess]) -> None:
    first = socksd()
    result = socksd_cli("serve", "--listen", f"127.0.0.1:{first.port}", timeout=30)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("socksd: error: "), last
    assert "in use" in last
    assert first.alive()


def test_sigint_exits_cleanly(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(15) == 0
    assert "Traceback" not in server.log()
