"""Helpers of the access-rule, limit and reload tests: config files, clients from chosen source
addresses, servers started from a TOML file. Loopback only; every wait bounded."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.e2e.support import (
    IO_TIMEOUT,
    access_lines,
    addr_bytes,
    read_reply,
    recv_exact,
    userpass,
    wait_for,
)
from tests.servers import ServerProcess

CURL = shutil.which("curl") or "/usr/bin/curl"


def write_config(path: Path, body: str, listen: str = "127.0.0.1:0") -> Path:
    """A TOML config listening on ``listen`` (port 0: a free one) with ``body`` after it."""
    path.write_text(f'listen = ["{listen}"]\n{body}\n')
    return path


def config_server(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    body: str,
    *args: str,
    listen: str = "127.0.0.1:0",
    name: str = "socksd.toml",
) -> tuple[ServerProcess, Path]:
    """Start ``socksd serve --config FILE ARGS`` with ``body`` in FILE; return (server, FILE)."""
    path = write_config(tmp_path / name, body, listen)
    return socksd("--config", str(path), *args), path


def connect_from(server: ServerProcess, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``server`` whose client address is ``source``."""
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    try:
        sock.bind((source, 0))
        sock.connect((server.host, server.port))
    except BaseException:
        sock.close()
        raise
    return sock


def socks_reply(
    server: ServerProcess,
    host: str,
    port: int,
    *,
    source: str = "127.0.0.1",
    user: str | None = None,
    password: str | None = None,
    cmd: int = 1,
) -> tuple[int, socket.socket]:
    """Greeting (+ login) and a request from ``source``; return (REP, socket). Caller closes."""
    sock = connect_from(server, source)
    try:
        if user is None:
            sock.sendall(b"\x05\x01\x00")
            assert recv_exact(sock, 2) == b"\x05\x00"
        else:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exact(sock, 2) == b"\x05\x02"
            sock.sendall(userpass(user, password or ""))
            assert recv_exact(sock, 2) == b"\x01\x00"
        sock.sendall(bytes((5, cmd, 0)) + addr_bytes(host, port))
        raw, _, _ = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return raw[1], sock


def rep(server: ServerProcess, host: str, port: int, **kw: str | int | None) -> int:
    """Only the reply code of a request (the connection is closed)."""
    code, sock = socks_reply(server, host, port, **kw)  # type: ignore[arg-type]
    sock.close()
    return code


def access_line(server: ServerProcess, needle: str, timeout: float = 10.0) -> str:
    """The last access-log line containing ``needle`` (waits until one is written)."""
    wait_for(lambda: any(needle in line for line in access_lines(server)), timeout)
    lines = [line for line in access_lines(server) if needle in line]
    assert lines, f"no access-log line with {needle!r}:\n{server.log()[-3000:]}"
    return lines[-1]


def closed_before_negotiation(sock: socket.socket) -> bool:
    """Send a greeting; True when the server closes without answering it."""
    try:
        sock.sendall(b"\x05\x01\x00")
        sock.settimeout(IO_TIMEOUT)
        return sock.recv(16) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        sock.close()


def wait_log_count(server: ServerProcess, needle: str, count: int, timeout: float = 15.0) -> int:
    """Wait until ``needle`` occurs ``count`` times in the log; return the count then."""
    wait_for(lambda: server.log().count(needle) >= count, timeout)
    return server.log().count(needle)


def run_curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """curl, bounded, without proxy variables from the environment."""
    from tests.e2e.support import clean_env

    return subprocess.run(
        [CURL, "--silent", "--show-error", "--max-time", "20", "--connect-timeout", "10", *args],
        capture_output=True,
        timeout=40,
        env=clean_env(),
        check=False,
    )


def sleep_until(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    if not wait_for(predicate, timeout):
        raise AssertionError("condition not reached in time")
