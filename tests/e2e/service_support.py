"""Helpers of the service tests (log files, systemd notification): a server whose log is a file
it opens itself (``--log-file``), sessions through it, and a fake systemd notification socket."""

from __future__ import annotations

import array
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import socksd.client
from tests.servers import LISTENING, EchoServer, ServerProcess

START_TIMEOUT = 20.0


def launch(
    tmp_path: Path,
    *args: str,
    log_file: Path,
    env: dict[str, str] | None = None,
    listeners: int = 1,
    flag: bool = True,
) -> ServerProcess:
    """Start ``socksd serve --listen 127.0.0.1:0 --log-file LOG_FILE ARGS`` and wait for its
    "listening on" line in LOG_FILE. The returned server's ``log()`` reads LOG_FILE; what the
    process writes to its console goes to ``console.txt`` beside it. ``flag=False``: no
    ``--log-file`` (the config file in ARGS names LOG_FILE)."""
    argv = [sys.executable, "-m", "socksd", "serve", *args]
    if flag:
        argv += ["--log-file", str(log_file)]
    if "--listen" not in args and "--config" not in args:
        argv += ["--listen", "127.0.0.1:0"]
    console = (tmp_path / "console.txt").open("a")
    proc = subprocess.Popen(
        argv,
        stdout=console,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    console.close()
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        found = LISTENING.findall(text)
        if len(found) >= listeners:
            host, _, port = found[0].rpartition(":")
            return ServerProcess(proc, host.strip("[]"), int(port), log_file, found)
        if proc.poll() is not None:
            raise RuntimeError(
                f"socksd exited with {proc.returncode}:\n{(tmp_path / 'console.txt').read_text()}"
            )
        time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    raise RuntimeError(f"socksd did not start:\n{(tmp_path / 'console.txt').read_text()}")


def echo_session(server: ServerProcess, echo: EchoServer, payload: bytes = b"ping") -> None:
    """One CONNECT session through ``server`` to ``echo``, run to its end."""
    with socksd.client.create_connection(
        f"{server.host}:{server.port}", (echo.host, echo.port), timeout=15
    ) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data == payload


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@dataclass
class Notification:
    """One datagram systemd would have received: its fields and the sender's pid."""

    fields: dict[str, str]
    pid: int


class FakeNotifySocket:
    """A Unix datagram socket standing in for systemd's ``NOTIFY_SOCKET``; like systemd it asks
    the kernel for each sender's credentials (SO_PASSCRED), so a test sees which process sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def receive(self, timeout: float = 15.0) -> Notification:
        """The next notification; TimeoutError when none comes within ``timeout``."""
        self.sock.settimeout(timeout)
        creds = struct.calcsize("3i")
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = array.array("i", payload[:creds])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        return Notification(fields, pid)

    def receive_until(self, key: str, timeout: float = 15.0) -> list[Notification]:
        """Notifications up to and including the first that has ``key``."""
        out: list[Notification] = []
        deadline = time.monotonic() + timeout
        while not out or key not in out[-1].fields:
            out.append(self.receive(max(0.01, deadline - time.monotonic())))
        return out

    def nothing_more(self, wait: float = 0.3) -> bool:
        """True when no further notification arrives within ``wait`` seconds."""
        try:
            self.receive(wait)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()
