"""The shared per-address limit as remote clients meet it: in a network namespace whose ``lo``
holds TEST-NET addresses (``tests.netns``), two clients with addresses of their own reach socksd
(``--workers 2``, ``limits_store = "host"``) on 192.0.2.1. Each address is counted on its own,
over both workers; the refusal log names the address."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from tests.e2e.admin_support import config_server
from tests.e2e.test_fleet import _children, _session
from tests.netns import CLIENT_A, CLIENT_B, PROXY, TARGET
from tests.servers import EchoServer, ServerProcess

LIMIT = 3


def test_each_remote_address_has_its_own_shared_count(
    netns: str, socksd: Callable[..., ServerProcess], tmp_path: Path, held: list[socket.socket]
) -> None:
    target = EchoServer(TARGET)
    body = (
        'allow_open = true\nlimits_store = "host"\n'
        f"max_sessions_per_ip = {LIMIT}\n"
        f'[[rules]]\naction = "allow"\nto = ["198.51.100.0/24"]\n'
    )
    try:
        server, _ = config_server(socksd, tmp_path, body, "--workers", "2", listen=f"{PROXY}:0")
        assert len(_children(server.proc.pid)) == 2
        for client in (CLIENT_A, CLIENT_B):
            opened = [_session(server, target.port, client, TARGET) for _ in range(LIMIT + 2)]
            held.extend(sock for sock in opened if sock is not None)
            assert [sock is not None for sock in opened] == [True] * LIMIT + [False] * 2, client
        log = server.log()
        for client in (CLIENT_A, CLIENT_B):
            assert f"refusing {client}:" in log and "(max_sessions_per_ip)" in log, log[-2000:]
    finally:
        target.close()
