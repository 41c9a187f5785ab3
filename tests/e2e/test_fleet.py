"""A fleet: two socksd nodes with ``--workers 2`` each, sharing their limits through a real
redis-server on loopback (``limits_store = "redis://..."``; the test starts and kills it by PID).

- a per-address limit of 10 admits exactly 10 sessions across the four workers;
- failed logins count across nodes: two on each node block the address on both (``auth_block``);
- Redis killed mid-run: both nodes keep admitting (on local limits, one warning per worker), and
  once it is back the shared count is each node's sessions again;
- a node killed (SIGKILL): its sessions stop counting within the lease time;
- ``max_sessions = 10`` holds exactly 10 sessions over the fleet (each worker may hold all 10);
- a user's ``[bandwidth]`` rate is the total over two nodes (each node's sessions get their part).

The host store (the workers of one host, no service) is checked the same way for one node:
``max_sessions`` with all 10 sessions held by one of the two workers, and alice's rate over a
download on each worker.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.admin_support import (
    closed_before_negotiation,
    config_server,
    connect_from,
    socks_reply,
)
from tests.e2e.support import SourceServer, add_user, addr_bytes, read_reply, recv_exact, userpass
from tests.helpers import wait_for
from tests.servers import EchoServer, RedisServer, ServerProcess

LEASE = 2
"""Seconds a node's lease lives (``?lease=`` in the store's URL): short, so the test is."""


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _session(
    server: ServerProcess, port: int, source: str = "127.0.0.1", target: str = "127.0.0.1"
) -> socket.socket | None:
    """A CONNECT to the echo server (on ``target``) held open; None when the proxy closed it
    (refused)."""
    sock = connect_from(server, source)
    try:
        sock.sendall(b"\x05\x01\x00")
        greeting = sock.recv(2)
        if greeting == b"":
            sock.close()
            return None
        assert greeting == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00" + addr_bytes(target, port))
        raw, _, _ = read_reply(sock)
        assert raw[1] == 0, raw
        return sock
    except ConnectionResetError:
        sock.close()
        return None


def _node(
    socksd: Callable[..., ServerProcess], tmp_path: Path, name: str, body: str
) -> ServerProcess:
    server, _ = config_server(socksd, tmp_path, body, "--workers", "2", name=f"{name}.toml")
    assert len(_children(server.proc.pid)) == 2
    return server


def _shared_total(redis: RedisServer, key: str) -> int:
    import redis as redis_client

    client = redis_client.Redis(port=redis.port)
    try:
        return sum(int(v) for v in client.hgetall(f"socksd:n:ip:{key}").values())
    finally:
        client.close()


def _refill(node: ServerProcess, port: int, held: list[socket.socket], count: int) -> None:
    """Open sessions through ``node`` until ``count`` are held: a freed slot is given back to the
    store (Redis: within a batch), so it is retried for up to 10 s."""

    def refilled() -> bool:
        sock = _session(node, port)
        if sock is not None:
            held.append(sock)
        return len(held) == count

    assert wait_for(refilled, 10, interval=0.1)


def _open(
    nodes: list[ServerProcess], count: int, port: int, held: list[socket.socket]
) -> tuple[int, int]:
    """``count`` sessions, alternating over ``nodes``; (admitted, refused). Admitted ones are held."""
    admitted = refused = 0
    for i in range(count):
        sock = _session(nodes[i % len(nodes)], port)
        if sock is None:
            refused += 1
        else:
            admitted += 1
            held.append(sock)
    return admitted, refused


def test_per_address_limit_holds_across_the_fleet(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    body = f'limits_store = "{redis_server.url}"\nmax_sessions_per_ip = 10\n'
    nodes = [_node(socksd, tmp_path, n, body) for n in ("a", "b")]
    assert _open(nodes, 14, echo.port, held) == (10, 4)
    assert _shared_total(redis_server, "127.0.0.1") == 10
    held.pop().close()  # one ends: its place is free again, on either node
    assert wait_for(lambda: _shared_total(redis_server, "127.0.0.1") == 9)
    assert _open(nodes[1:], 2, echo.port, held) == (1, 1)


def test_login_throttle_counts_across_nodes(
    socksd: Callable[..., ServerProcess], tmp_path: Path, redis_server: RedisServer
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "right")
    body = (
        f'limits_store = "{redis_server.url}"\nusers = "{users}"\nmethods = ["userpass"]\n'
        "auth_block = true\nmax_auth_failures = 4\nauth_delay = 0\n"
    )
    nodes = [_node(socksd, tmp_path, n, body) for n in ("a", "b")]

    def guess(node: ServerProcess) -> None:
        sock = connect_from(node, "127.0.0.2")
        with sock:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exact(sock, 2) == b"\x05\x02"
            sock.sendall(userpass("alice", "wrong"))
            assert recv_exact(sock, 2) == b"\x01\x01"

    for node in (*nodes, *nodes):  # two failures on each node: no process saw four
        guess(node)
    for node in nodes:  # the address is blocked on both nodes (closed at accept)
        assert wait_for(lambda n=node: closed_before_negotiation(connect_from(n, "127.0.0.2")))
    assert not closed_before_negotiation(connect_from(nodes[0], "127.0.0.3"))  # only that address


def test_redis_away_then_back(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    body = f'limits_store = "{redis_server.url}?lease={LEASE}"\nmax_sessions_per_ip = 10\n'
    nodes = [_node(socksd, tmp_path, n, body) for n in ("a", "b")]
    assert _open(nodes, 6, echo.port, held) == (6, 0)
    redis_server.kill()
    # both nodes keep serving, each on its own limits (bounded: no session waits for Redis)
    assert _open(nodes, 12, echo.port, held) == (12, 0)
    for node in nodes:  # one warning per worker at most, not one per session
        assert 1 <= node.log().count("unreachable") <= 2, node.log()
    for _ in range(3):
        held.pop().close()
    redis_server.start()  # empty: each node writes its own counts again
    assert wait_for(lambda: _shared_total(redis_server, "127.0.0.1") == 15, 15)
    assert _open(nodes, 2, echo.port, held) == (0, 2)  # 15 open: over the limit on both nodes


def test_dead_node_stops_counting_within_the_lease(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    body = f'limits_store = "{redis_server.url}?lease={LEASE}"\nmax_sessions_per_ip = 10\n'
    doomed, survivor = (_node(socksd, tmp_path, n, body) for n in ("a", "b"))
    assert _open([doomed], 6, echo.port, held) == (6, 0)
    assert _open([survivor], 5, echo.port, held) == (4, 1)
    workers = _children(doomed.proc.pid)
    os.kill(doomed.proc.pid, signal.SIGKILL)  # the supervisor first: it restarts no worker
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    doomed.proc.wait(10)
    fresh: list[socket.socket] = []

    def admitted_again() -> bool:
        sock = _session(survivor, echo.port)
        if sock is not None:
            fresh.append(sock)
        return sock is not None

    assert wait_for(admitted_again, 5 * LEASE, interval=0.2)
    held.extend(fresh)
    assert _open([survivor], 6, echo.port, held) == (5, 1)  # the dead node's 6 are free


def test_host_store_shares_the_limit_between_workers(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    body = 'limits_store = "host"\nmax_sessions_per_ip = 10\n'
    node = _node(socksd, tmp_path, "host", body)
    assert _open([node], 14, echo.port, held) == (10, 4)
    for _ in range(2):
        held.pop().close()

    _refill(node, echo.port, held, 10)
    assert _open([node], 2, echo.port, held) == (0, 2)


# -- max_sessions and bandwidth through the store -------------------------------------------------


def _worker_of(server: ServerProcess, sock: socket.socket) -> int:
    """The PID of the worker holding the server's side of ``sock`` (from /proc)."""
    port = sock.getsockname()[1]
    inode = ""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server.port and int(remote.split(":")[1], 16) == port:
            inode = fields[9]
    assert inode, "no server side for the session"
    for pid in _children(server.proc.pid):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the session")


def test_host_store_max_sessions_counts_both_workers(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    """All 10 sessions on one worker (without the store each worker holds at most 5), then the
    11th refused on either worker."""
    node = _node(socksd, tmp_path, "host", 'limits_store = "host"\nmax_sessions = 10\n')
    first: int | None = None
    for _ in range(120):  # sessions landing on the other worker are closed again
        sock = _session(node, echo.port)
        if sock is None:
            time.sleep(0.05)  # the other worker's closed sessions are being given back
            continue
        worker = _worker_of(node, sock)
        first = first or worker
        if worker == first:
            held.append(sock)
            if len(held) == 10:
                break
        else:
            sock.close()
    assert len(held) == 10, f"one worker held {len(held)} sessions"
    time.sleep(0.3)  # the other worker's last closed session is given back
    assert _open([node], 6, echo.port, held) == (0, 6)  # either worker: the total is 10
    held.pop().close()

    _refill(node, echo.port, held, 10)
    assert "(max_sessions)" in node.log()


def test_max_sessions_holds_across_the_fleet(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    body = f'limits_store = "{redis_server.url}"\nmax_sessions = 10\n'
    nodes = [_node(socksd, tmp_path, n, body) for n in ("a", "b")]
    assert _open(nodes, 14, echo.port, held) == (10, 4)  # four workers, 10 sessions in all
    held.pop().close()

    _refill(nodes[1], echo.port, held, 10)
    assert _open(nodes, 2, echo.port, held) == (0, 2)


RATE = 200_000
"""alice's ``[bandwidth]`` rate (bytes/s) in the bandwidth test."""


def _shared_rate(socks: list[socket.socket]) -> float:
    """Read every download of ``socks`` at once; their total bytes/s over a window that starts
    once the shares settled (the processes refresh them every second)."""
    settle, window = 1.5, 3.0
    got: list[int] = []
    start = time.monotonic()

    def download(sock: socket.socket) -> None:
        sock.settimeout(10)
        while time.monotonic() < start + settle:
            sock.recv(65536)
        counted = 0
        while time.monotonic() < start + settle + window:
            counted += len(sock.recv(65536))
        got.append(counted)

    threads = [threading.Thread(target=download, args=(sock,)) for sock in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(got) == len(socks)
    return sum(got) / window


def _alice_config(tmp_path: Path, store: str) -> str:
    users = tmp_path / "users"
    add_user(users, "alice", "pw")
    return (
        f'limits_store = "{store}"\nusers = "{users}"\nmethods = ["userpass"]\n'
        f"[bandwidth]\nalice = {RATE}\n"
    )


def _alice_download(node: ServerProcess, source: SourceServer) -> socket.socket:
    code, sock = socks_reply(node, "127.0.0.1", source.port, user="alice", password="pw")
    assert code == 0
    return sock


def test_bandwidth_rate_is_shared_across_nodes(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    held: list[socket.socket],
) -> None:
    """One download of alice on each of two nodes: together about RATE, not 2 * RATE (each
    node alone would give its session all of it). Wide bounds: a check of the sharing, not a
    benchmark."""
    body = _alice_config(tmp_path, redis_server.url)
    nodes = [config_server(socksd, tmp_path, body, name=f"{n}.toml")[0] for n in ("a", "b")]
    source = SourceServer(b"x" * (RATE * 10))
    try:
        held.extend(_alice_download(node, source) for node in nodes)
        rate = _shared_rate(held)
    finally:
        source.close()
    assert 0.5 * RATE < rate <= 1.5 * RATE, f"{rate:.0f} B/s over both nodes for a rate of {RATE}"


def test_bandwidth_rate_is_shared_between_workers(
    socksd: Callable[..., ServerProcess], tmp_path: Path, held: list[socket.socket]
) -> None:
    """The host store: one download of alice on each of the two workers, together about RATE."""
    node = _node(socksd, tmp_path, "host", _alice_config(tmp_path, "host"))
    source = SourceServer(b"x" * (RATE * 10))
    try:
        workers: set[int] = set()
        for _ in range(40):  # until the two downloads are on different workers
            sock = _alice_download(node, source)
            worker = _worker_of(node, sock)
            if worker in workers:
                sock.close()
                continue
            workers.add(worker)
            held.append(sock)
            if len(held) == 2:
                break
        assert len(held) == 2
        rate = _shared_rate(held)
    finally:
        source.close()
    assert 0.5 * RATE < rate <= 1.5 * RATE, f"{rate:.0f} B/s over two workers for a rate of {RATE}"
