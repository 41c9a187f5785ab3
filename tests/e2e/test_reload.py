"""Live reload (SIGHUP): sessions in flight keep flowing with every byte, new sessions see the new
rules and users, a broken config is refused and the running one stays, flags still win, the access
log is reopened, and with several workers every worker reloads."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.admin_support import (
    access_line,
    closed_before_negotiation,
    config_server,
    connect_from,
    rep,
    socks_reply,
    wait_log_count,
    write_config,
)
from tests.e2e.support import (
    HttpServer,
    access_lines,
    add_user,
    echo_roundtrip,
    random_bytes,
    recv_exact,
    socksd_cli,
    wait_for,
)
from tests.servers import EchoServer, ServerProcess

DENY_ECHO = '[[rules]]\naction = "deny"\nports = ["{port}"]\n'


def reload_and_wait(server: ServerProcess, needle: str = "reloaded configuration") -> None:
    """SIGHUP, then wait until ``needle`` has appeared once more in the log."""
    before = server.log().count(needle)
    server.proc.send_signal(signal.SIGHUP)
    assert wait_log_count(server, needle, before + 1) > before, server.log()[-2000:]


@dataclass
class Flow:
    """One session streaming through an echo target until told to stop."""

    sock: socket.socket
    local_port: int
    sent: int = 0
    received: int = 0
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, seed: int) -> None:
        chunk = random_bytes(8192, seed=seed)
        try:
            while not self.stop.is_set():
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                assert recv_exact(self.sock, len(chunk)) == chunk
                self.received += len(chunk)
                time.sleep(0.002)
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(15)
            assert self.sock.recv(1) == b""
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.sock.close()


def test_reload_under_load_keeps_sessions_and_bytes(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, path = config_server(socksd, tmp_path, "")
    flows = []
    threads = []
    for i in range(8):
        code, sock = socks_reply(server, "127.0.0.1", echo.port)
        assert code == 0
        flow = Flow(sock, sock.getsockname()[1])
        flows.append(flow)
        threads.append(threading.Thread(target=flow.run, args=(i,), daemon=True))
    for t in threads:
        t.start()
    try:
        for round_ in range(5):  # deny, allow, deny, ... while the flows go on
            deny = round_ % 2 == 0
            write_config(path, DENY_ECHO.format(port=echo.port) if deny else "")
            marks = [f.received for f in flows]
            reload_and_wait(server)
            assert rep(server, "127.0.0.1", echo.port) == (2 if deny else 0)
            wait_for(lambda m=marks: all(f.received > x for f, x in zip(flows, m, strict=True)), 10)
            assert all(f.received > x for f, x in zip(flows, marks, strict=True)), "a flow stalled"
    finally:
        for f in flows:
            f.stop.set()
        for t in threads:
            t.join(30)
    assert [f.error for f in flows] == [None] * 8
    assert all(f.sent == f.received > 0 for f in flows)
    for f in flows:  # the server counted the same bytes
        line = access_line(server, f"127.0.0.1:{f.local_port} ")
        assert f" rep=0x00 up={f.sent} down={f.received} " in line, line
    assert server.alive()
    assert "Traceback" not in server.log()


def test_broken_config_is_refused_and_the_old_one_stays(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, path = config_server(socksd, tmp_path, DENY_ECHO.format(port=9))
    assert rep(server, "127.0.0.1", 9) == 2
    broken_users = tmp_path / "broken.htpasswd"
    broken_users.write_text("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    for body, reason in (
        ("[[rules]\n", "is not valid TOML"),
        ('[[rules]]\naction = "deny"\nclients = ["10.0.0.1/8"]', "rule 1.clients: '10.0.0.1/8'"),
        ('[[rules]]\naction = "allow"\nusers = ["@missing"]', "'@missing' is not a group"),
        (f'users = "{broken_users}"', "users: "),
        ('access_log = "/nonexistent/dir/access.log"', "access_log: cannot open"),
    ):
        write_config(path, body)
        reload_and_wait(server, "reload failed, keeping the running configuration")
        line = server.log().splitlines()
        last = [x for x in line if "reload failed" in x][-1]
        assert reason in last, last
        assert rep(server, "127.0.0.1", 9) == 2  # the running rules
        code, sock = socks_reply(server, "127.0.0.1", echo.port)
        with sock:
            assert code == 0
            echo_roundtrip(sock, b"still serving")
    write_config(path, "")
    reload_and_wait(server)
    assert rep(server, "127.0.0.1", 9) != 2  # refused by nothing listening, not by a rule
    assert server.alive()


def test_users_are_reloaded(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "pw-alice")
    server, _ = config_server(socksd, tmp_path, f'users = "{users}"')
    code, alice = socks_reply(server, "127.0.0.1", echo.port, user="alice", password="pw-alice")
    assert code == 0
    add_user(users, "bob", "pw-bob")
    assert socksd_cli("user", "del", "alice", "--users", str(users)).returncode == 0
    reload_and_wait(server)
    assert "1 users" in server.log().splitlines()[-1] or "1 users" in server.log()
    code, bob = socks_reply(server, "127.0.0.1", echo.port, user="bob", password="pw-bob")
    with bob:
        assert code == 0
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        from tests.e2e.support import userpass

        sock.sendall(b"\x05\x01\x02" + userpass("alice", "pw-alice"))
        assert recv_exact(sock, 4) == b"\x05\x02\x01\x01"  # alice is gone for new sessions
    with alice:  # the session she had goes on
        echo_roundtrip(alice, b"established before the reload")


def test_flags_still_win_after_reload(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    body = f'default = "allow"\n[[rules]]\naction = "deny"\nports = ["{echo.port}"]\n'
    server, path = config_server(socksd, tmp_path, body, "--default", "deny")
    assert closed_before_negotiation(connect_from(server))  # nothing can be allowed: at accept
    write_config(path, 'default = "allow"')
    reload_and_wait(server)
    # --default deny still holds: refused at accept by the default
    sock = connect_from(server)
    port = sock.getsockname()[1]
    assert closed_before_negotiation(sock)
    assert "denied by default at accept" in access_line(server, f"127.0.0.1:{port} ")


def test_listen_change_needs_a_restart(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, path = config_server(socksd, tmp_path, "")
    write_config(path, "", listen="127.0.0.1:1")
    reload_and_wait(server)
    assert "reload: listen: 127.0.0.1:0 -> 127.0.0.1:1 needs a restart" in server.log()
    code, sock = socks_reply(server, "127.0.0.1", echo.port)  # still on the running address
    with sock:
        assert code == 0


def test_access_log_is_reopened(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    log = tmp_path / "access.log"
    server, _ = config_server(socksd, tmp_path, f'access_log = "{log}"')
    assert rep(server, "127.0.0.1", echo.port) == 0
    wait_for(lambda: log.exists() and "rep=0x00" in log.read_text(), 10)
    rotated = tmp_path / "access.log.1"
    log.rename(rotated)
    reload_and_wait(server)
    assert rep(server, "127.0.0.1", echo.port) == 0
    wait_for(lambda: log.exists() and "rep=0x00" in log.read_text(), 10)
    assert log.read_text().count("\n") == 1
    assert rotated.read_text().count("\n") == 1


def test_workers_reload(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    server, path = config_server(socksd, tmp_path, "", "--workers", "2")
    code, held = socks_reply(server, "127.0.0.1", echo.port)
    assert code == 0
    write_config(path, DENY_ECHO.format(port=echo.port))
    server.proc.send_signal(signal.SIGHUP)
    assert wait_log_count(server, "reloaded configuration", 2) == 2  # each worker
    assert [rep(server, "127.0.0.1", echo.port) for _ in range(12)] == [2] * 12
    # a broken file: one line from the supervisor, the workers are not disturbed
    write_config(path, "[[rules]\n")
    reload_and_wait(server, "reload failed")
    # then a good one: once each worker has logged it, each has handled the signals before it
    write_config(path, DENY_ECHO.format(port=echo.port))
    server.proc.send_signal(signal.SIGHUP)
    assert wait_log_count(server, "reloaded configuration", 4) == 4
    assert server.log().count("reload failed") == 1
    assert [rep(server, "127.0.0.1", echo.port) for _ in range(6)] == [2] * 6
    with held:
        echo_roundtrip(held, b"across reloads")
    lines = [x for x in access_lines(server) if "rep=0x02" in x]
    assert len(lines) == 18 and all(" rule=1 " in x for x in lines)


def _method(server: ServerProcess, offered: bytes) -> int:
    """The method socksd selects for a greeting offering ``offered`` (0xFF: none acceptable)."""
    sock = connect_from(server)
    try:
        sock.sendall(bytes((5, len(offered))) + offered)
        answer = recv_exact(sock, 2)
    finally:
        sock.close()
    assert answer[0] == 5
    return answer[1]


def test_reload_switches_authentication_on_and_off(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer, http4: HttpServer
) -> None:
    """Defect 1 of issue 11: users added by a reload are required at once, methods follow the
    config, and removing users opens the proxy again; curl logs in after the reload."""
    from tests.e2e.admin_support import run_curl

    users = tmp_path / "users"
    add_user(users, "alice", "s3cret")
    server, path = config_server(socksd, tmp_path, "")
    assert _method(server, b"\x00") == 0x00

    write_config(path, f'users = "{users}"')
    reload_and_wait(server)
    assert _method(server, b"\x00") == 0xFF
    assert _method(server, b"\x00\x02") == 0x02
    code, sock = socks_reply(server, "127.0.0.1", echo.port, user="alice", password="s3cret")
    with sock:
        assert code == 0
        echo_roundtrip(sock, b"after the reload")
    proxy = f"127.0.0.1:{server.port}"
    assert run_curl("--socks5", proxy, http4.url).returncode == 97  # no login: refused
    done = run_curl("--socks5", proxy, "-U", "alice:s3cret", http4.url)
    assert done.returncode == 0 and done.stdout == HttpServer.body, done.stderr

    write_config(path, f'users = "{users}"\nmethods = ["none", "userpass"]')
    reload_and_wait(server)
    assert _method(server, b"\x02\x00") == 0x00  # the server's order of preference
    assert _method(server, b"\x02") == 0x02

    write_config(path, "")
    reload_and_wait(server)
    assert _method(server, b"\x02") == 0xFF
    assert _method(server, b"\x00") == 0x00
    assert "methods none" in server.log()


def test_reload_turns_gssapi_on_and_changes_its_service(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer, krb5_realm: Any
) -> None:
    """Defect 1 of issue 11, GSSAPI: a keytab added by a reload is used at once (the client
    library authenticates), a changed service name applies, and removing GSSAPI switches it off."""
    from socksd.client import GssapiOptions, Proxy, create_gssapi_connection
    from tests.krb5 import HOST

    path = write_config(tmp_path / "socksd.toml", "")
    server = socksd("--config", str(path), env=krb5_realm.env)
    assert _method(server, b"\x01") == 0xFF

    write_config(path, f'gssapi_keytab = "{krb5_realm.keytab}"')
    reload_and_wait(server)
    assert _method(server, b"\x00\x01") == 0x01
    proxy = Proxy("127.0.0.1", server.port, gssapi=GssapiOptions(hostname=HOST, level=2))
    with create_gssapi_connection(proxy, ("127.0.0.1", echo.port), timeout=30) as sock:
        sock.settimeout(30)
        sock.sendall(b"kerberos after a reload")
        assert sock.recv(100) == b"kerberos after a reload"

    write_config(path, f'gssapi_keytab = "{krb5_realm.keytab}"\ngssapi_service = "socks"')
    reload_and_wait(server)
    socks = Proxy(
        "127.0.0.1", server.port, gssapi=GssapiOptions(service="socks", hostname=HOST, level=2)
    )
    with create_gssapi_connection(socks, ("127.0.0.1", echo.port), timeout=30) as sock:
        sock.settimeout(30)
        sock.sendall(b"service socks")
        assert sock.recv(100) == b"service socks"
    with pytest.raises(OSError):
        create_gssapi_connection(proxy, ("127.0.0.1", echo.port), timeout=30).close()

    write_config(path, "")
    reload_and_wait(server)
    assert _method(server, b"\x01") == 0xFF
