"""sd_notify: the datagram systemd reads, the abstract namespace, and never an exception."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from socksd.server.process import notify


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def _fields(sock: socket.socket) -> dict[str, str]:
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().split("\n"))


def test_ready_sends_status_and_mainpid(receiver: socket.socket) -> None:
    assert notify.ready("listening on 127.0.0.1:1080")
    assert _fields(receiver) == {
        "READY": "1",
        "STATUS": "listening on 127.0.0.1:1080",
        "MAINPID": str(os.getpid()),
    }


def test_reloading_carries_the_monotonic_time(receiver: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    fields = _fields(receiver)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_stopping(receiver: socket.socket) -> None:
    assert notify.stopping()
    assert _fields(receiver)["STOPPING"] == "1"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"socksd-unit-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.stopping()
        assert sock.recv(4096).startswith(b"STOPPING=1\n")


@pytest.mark.parametrize("value", [None, "", "relative/path", "vsock:2:1234"])
def test_not_under_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert notify.ready("x") is False


def test_a_socket_nobody_reads_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.ready("x") is False
    (tmp_path / "file").write_text("not a socket")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "file"))
    assert notify.reloading() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + "x" * 200)  # longer than a socket address
    assert notify.stopping() is False
