"""The per-user session limit (``max_sessions_per_user``) shared across processes, as
tests/e2e/test_fleet.py checks the per-address one:

- two nodes with ``--workers 2`` each and ``limits_store = "redis://..."`` (a real redis-server on
  loopback): a user holds exactly N sessions over the four workers; each further request, on
  either node, gets REP 0x01 and an access-log line naming ``max_sessions_per_user``; a session
  that ends frees its slot, on either node;
- one node with ``--workers 2`` and ``limits_store = "host"``: the same over its two workers.

Without the shared check each worker would admit N sessions of its own (4N over the fleet).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.admin_support import access_line, socks_reply
from tests.e2e.support import access_lines, add_user
from tests.e2e.test_fleet import _node
from tests.helpers import wait_for
from tests.servers import EchoServer, RedisServer, ServerProcess

N = 5
"""Alice's ``max_sessions_per_user``: more than the workers of one node, fewer than their sum
times N, so only the shared count refuses the sixth."""


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(path, "alice", "pw-alice")
    add_user(path, "bob", "pw-bob")
    return path


def _body(store: str, users: Path) -> str:
    return (
        f'limits_store = "{store}"\nusers = "{users}"\nmethods = ["userpass"]\n'
        f"max_sessions_per_user = {N}\n"
    )


def _open(
    nodes: list[ServerProcess], count: int, port: int, held: list[socket.socket], user: str
) -> list[int]:
    """``count`` CONNECTs of ``user``, alternating over ``nodes``; their reply codes. Admitted
    sessions (REP 0) are held open, refused ones closed."""
    codes = []
    for i in range(count):
        code, sock = socks_reply(
            nodes[i % len(nodes)], "127.0.0.1", port, user=user, password=f"pw-{user}"
        )
        codes.append(code)
        if code == 0:
            held.append(sock)
        else:
            sock.close()
    return codes


def _refused_lines(node: ServerProcess) -> list[str]:
    return [line for line in access_lines(node) if "max_sessions_per_user" in line]


def _check_user_limit(nodes: list[ServerProcess], port: int, held: list[socket.socket]) -> None:
    """Alice holds exactly N sessions over ``nodes``; the next ones are refused on every node;
    one that ends frees its slot (on either node); bob is not limited by alice's count."""
    assert _open(nodes, N, port, held, "alice") == [0] * N
    assert _open(nodes, 2 * len(nodes), port, held, "alice") == [1] * 2 * len(nodes)
    for node in nodes:  # each refusal has its access-log line, with its reply code
        line = access_line(node, "max_sessions_per_user")
        assert "user=alice" in line and "rep=0x01" in line, line
        assert wait_for(lambda n=node: len(_refused_lines(n)) == 2)
    assert _open(nodes, len(nodes), port, held, "bob") == [0] * len(nodes)  # per user
    for _ in range(2):  # two of alice's end: two places free, on any node
        held.pop(0).close()

    def one_more() -> bool:
        codes = _open(nodes[-1:], 1, port, held, "alice")
        return codes == [0]

    assert wait_for(one_more, 10, interval=0.1)
    assert wait_for(one_more, 10, interval=0.1)
    assert _open(nodes, len(nodes), port, held, "alice") == [1] * len(nodes)


def _shared_user_total(redis: RedisServer, user: str) -> tuple[int, int]:
    """(alice's sessions counted in Redis, processes that count them)."""
    import redis as redis_client

    client = redis_client.Redis(port=redis.port)
    try:
        counts = [int(v) for v in client.hgetall(f"socksd:n:user:{user}").values()]
        return sum(counts), len([c for c in counts if c])
    finally:
        client.close()


def test_per_user_limit_holds_across_the_fleet(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    redis_server: RedisServer,
    users: Path,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    nodes = [_node(socksd, tmp_path, n, _body(redis_server.url, users)) for n in ("a", "b")]
    _check_user_limit(nodes, echo.port, held)
    total, processes = _shared_user_total(redis_server, "alice")
    assert total == N and processes >= 2  # both nodes hold some (a node's workers: the kernel's)


def test_per_user_limit_holds_across_the_workers_of_a_host(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    users: Path,
    echo: EchoServer,
    held: list[socket.socket],
) -> None:
    node = _node(socksd, tmp_path, "host", _body("host", users))
    _check_user_limit([node], echo.port, held)
