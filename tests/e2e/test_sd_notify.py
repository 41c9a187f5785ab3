"""systemd's readiness protocol against a fake NOTIFY_SOCKET the test binds: READY=1 once the
server accepts, RELOADING=1 then READY=1 around SIGHUP (a failed reload too), STOPPING=1 on
SIGTERM; with workers, only the supervisor (the main process) speaks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.service_support import FakeNotifySocket, echo_session
from tests.helpers import wait_for
from tests.servers import LISTENING, EchoServer, ServerProcess

SERVE = [sys.executable, "-m", "socksd", "serve"]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[FakeNotifySocket]:
    sock = FakeNotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_reload_and_stop_are_notified(
    tmp_path: Path, notify_socket: FakeNotifySocket, echo: EchoServer, workers: int
) -> None:
    config = tmp_path / "socksd.toml"
    config.write_text('listen = ["127.0.0.1:0"]\n')
    log = tmp_path / "socksd.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*SERVE, "--config", str(config), "--workers", str(workers)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **notify_socket.env},
        )
    try:
        # READY=1 is the first thing systemd hears, and by then the server accepts
        ready = notify_socket.receive(20)
        assert ready.fields["READY"] == "1", ready
        found = LISTENING.findall(log.read_text())
        assert found, log.read_text()
        host, _, port = found[0].rpartition(":")
        server = ServerProcess(proc, host, int(port), log, found)
        assert ready.pid == proc.pid and ready.fields["MAINPID"] == str(proc.pid)
        assert ready.fields["STATUS"].startswith(f"listening on {found[0]}")
        if workers > 1:
            assert len(_children(proc.pid)) == 2  # both workers are up
            assert "(2 workers)" in ready.fields["STATUS"]
        for _ in range(10):
            echo_session(server, echo)

        # SIGHUP: RELOADING=1 with the monotonic time of the reload, then READY=1
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        got = notify_socket.receive_until("READY")
        assert [n.fields.get("RELOADING") for n in got] == ["1", None]
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert before <= int(got[0].fields["MONOTONIC_USEC"]) <= after
        assert "failed" not in got[1].fields["STATUS"]
        assert {n.pid for n in got} == {proc.pid}
        assert wait_for(lambda: log.read_text().count("reloaded configuration") >= workers)

        # a broken config: the reload is refused, the service is ready again with the old one
        config.write_text("listen = [\n")
        proc.send_signal(signal.SIGHUP)
        got = notify_socket.receive_until("READY")
        assert [n.fields.get("RELOADING") for n in got] == ["1", None]
        assert "the last reload failed" in got[1].fields["STATUS"]
        echo_session(server, echo)

        # SIGTERM: STOPPING=1, and nothing from the workers, ever
        proc.send_signal(signal.SIGTERM)
        stopping = notify_socket.receive()
        assert stopping.fields["STOPPING"] == "1" and stopping.pid == proc.pid
        assert proc.wait(20) == 0
        assert notify_socket.nothing_more()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_abstract_notify_socket(tmp_path: Path) -> None:
    """``NOTIFY_SOCKET=@name`` (the abstract namespace, what systemd uses for some services)."""
    name = f"socksd-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(20)
        proc = subprocess.Popen(
            [*SERVE, "--listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": f"@{name}"},
        )
        try:
            assert sock.recv(4096).startswith(b"READY=1\n")
        finally:
            proc.terminate()
            assert proc.wait(20) == 0
