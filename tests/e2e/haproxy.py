"""A real HAProxy in TCP mode in front of socksd nodes, for the PROXY protocol tests.

:func:`start_haproxy` writes a haproxy.cfg (one frontend on a free loopback port, one backend
with the given servers, health checks every 200 ms, connections to the nodes from ``source``, so
the nodes see the balancer at an address of its own), starts ``haproxy -f CFG -db`` and waits
until the frontend accepts and every node is UP. :class:`HAProxy` reads the servers' states from
the admin socket and stops the process it started, by PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import wait_for

BALANCER_SOURCE = "127.0.0.9"
"""The address HAProxy connects to the nodes from (the nodes trust it)."""


def haproxy_binary() -> str:
    """The haproxy executable; skip the test when it is missing (scripts/test.sh installs it)."""
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        pytest.skip("haproxy is not installed (Debian package haproxy)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class HAProxy:
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    admin: Path
    log_path: Path

    def states(self) -> dict[str, str]:
        """Server name -> status (UP, DOWN, ...) from ``show stat`` on the admin socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.admin))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        out: dict[str, str] = {}
        lines = data.decode().splitlines()
        if not lines:
            return out
        names = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(names, line.split(","), strict=False))
            if row.get("svname") not in (None, "FRONTEND", "BACKEND"):
                out[row["svname"]] = row.get("status", "")
        return out

    def wait_states(self, expected: dict[str, str], timeout: float = 15.0) -> None:
        def reached() -> bool:
            try:
                states = self.states()
            except OSError:
                return False
            return all(states.get(k, "").startswith(v) for k, v in expected.items())

        wait_for(reached, timeout)
        assert reached(), f"HAProxy states {self.states()}, expected {expected}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_haproxy(
    tmp_path: Path,
    nodes: list[tuple[str, int]],
    *,
    send_proxy: str = "send-proxy-v2",
    source: str = BALANCER_SOURCE,
    bind: str = "127.0.0.1",
) -> HAProxy:
    """HAProxy on ``bind`` and a free port, balancing over ``nodes`` with ``send_proxy``
    (``::`` takes IPv4 too, as IPv4-mapped addresses; clients then use 127.0.0.1)."""
    binary = haproxy_binary()
    port = free_port(bind)
    admin = tmp_path / f"haproxy-{port}.sock"
    servers = "\n".join(
        f"    server n{i} {host}:{node_port}" for i, (host, node_port) in enumerate(nodes, 1)
    )
    cfg = tmp_path / f"haproxy-{port}.cfg"
    cfg.write_text(
        f"""global
    maxconn 200
    stats socket {admin} mode 600 level admin

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 2
    option redispatch

frontend socks
    bind {f"[{bind}]" if ":" in bind else bind}:{port}{" v4v6" if bind == "::" else ""}
    default_backend nodes

backend nodes
    balance roundrobin
    default-server check inter 200ms fall 2 rise 1 {send_proxy} source {source}
{servers}
"""
    )
    log_path = tmp_path / f"haproxy-{port}.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen([binary, "-f", str(cfg), "-db"], stdout=logf, stderr=logf)
    balancer = HAProxy(proc, "127.0.0.1" if bind == "::" else bind, port, admin, log_path)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{balancer.log()}")
        if admin.exists():
            break
        time.sleep(0.05)
    balancer.wait_states({f"n{i}": "UP" for i in range(1, len(nodes) + 1)})
    return balancer
