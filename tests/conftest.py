"""Shared fixtures: socksd server processes on loopback, loopback targets, a Kerberos realm; and
the hook that marks the end-to-end tests. The helpers they use live in modules (tests/servers.py,
tests/helpers.py), which tests import."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import EchoServer, RedisServer, ServerProcess, start_server

E2E_DIR = Path(__file__).parent / "e2e"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e/ ``e2e``: ``pytest -m "not e2e"`` is the fast unit tier."""
    for item in items:
        if item.path.is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def socksd(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``socksd("--users", path)`` starts a server; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def factory(*args: str, **kwargs: object) -> ServerProcess:
        server = start_server(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL if not server.alive() else signal.SIGTERM)


@pytest.fixture
def server(socksd: Callable[..., ServerProcess]) -> ServerProcess:
    """A no-auth socksd on 127.0.0.1, on the port it bound (port 0)."""
    return socksd()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server on loopback (skipped without ``redis-server`` or the ``redis``
    package: scripts/test.sh installs both)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def krb5_realm() -> Iterator[object]:
    """A throwaway Kerberos realm (tests/krb5.py) used by this process for the whole session."""
    from tests.krb5 import TestRealm

    realm = TestRealm.start()
    try:
        with realm.environment():
            yield realm
    finally:
        realm.stop()
