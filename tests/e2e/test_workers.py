"""Several worker processes: they share the port, all serve, a dead one is replaced, SIGTERM stops all."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import socksd.client
from tests.helpers import wait_for
from tests.servers import EchoServer, ServerProcess


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def _echo_through(server: ServerProcess, echo: EchoServer, payload: bytes) -> bytes:
    with socksd.client.create_connection(
        f"127.0.0.1:{server.port}", ("127.0.0.1", echo.port), timeout=10
    ) as sock:
        sock.sendall(payload)
        sock.shutdown(1)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_workers_serve_restart_and_stop(
    socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    server = socksd("--workers", "2")
    assert "listening on" in server.log() and "(2 workers)" in server.log()
    workers = _children(server.proc.pid)
    assert len(workers) == 2
    for i in range(40):  # connections are spread over both workers by the kernel
        assert _echo_through(server, echo, b"hello %d" % i) == b"hello %d" % i

    os.kill(workers[0], signal.SIGKILL)

    def replaced() -> bool:
        now = _children(server.proc.pid)
        return len(now) == 2 and workers[0] not in now

    assert wait_for(replaced, 15), f"worker not replaced: {server.log()}"
    assert "exited with" in server.log()
    for i in range(40):
        assert _echo_through(server, echo, b"again %d" % i) == b"again %d" % i

    assert server.stop(signal.SIGTERM) == 0
    assert server.log().count("stopped") == 2
