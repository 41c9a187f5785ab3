"""``limits_store`` for admins: the ``--limits-store`` flag (the config key's validation, one line
naming the key and the fix), what ``check-config`` says of the store (a Redis one asked, bounded:
answers, does not answer, a Cluster refused), and a Redis Cluster node refused by the store."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from socksd.cli import config_from_args, main, make_parser
from socksd.config import ConfigError, build_config
from socksd.limitstore import RedisStore
from tests.helpers import await_for
from tests.servers import RedisServer

BAD_VALUES = [
    ("memcached://x", '\'memcached://x\' is not "local", "host" or a Redis URL'),
    ("redis://127.0.0.1:abc/0", "port 'abc' is not a number from 1 to 65535"),
    ("redis://127.0.0.1:70000/0", "port '70000' is not a number from 1 to 65535"),
    ("redis://:6379/0", "no host in the URL"),
    ("redis://127.0.0.1:6379/x", "database 'x' is not a number"),
    ("redis://127.0.0.1:6379/0?lease=0", "lease=0: expected a positive number of seconds"),
    ("redis://127.0.0.1:6379/0?lease=soon", "lease: expected a number of seconds"),
    ("unix://", "a unix:// URL needs the socket's path"),
]


def test_the_flag_sets_the_key_and_wins_over_the_file(tmp_path: Path) -> None:
    file = tmp_path / "socksd.toml"
    file.write_text('limits_store = "host"\n')
    args = make_parser().parse_args(["serve", "--config", str(file)])
    assert config_from_args(args).limits_store == "host"
    url = "redis://127.0.0.1:6379/2?lease=3"
    args = make_parser().parse_args(["serve", "--config", str(file), "--limits-store", url])
    assert config_from_args(args).limits_store == url
    args = make_parser().parse_args(["serve", "--limits-store", "local"])
    assert config_from_args(args).limits_store == "local"


@pytest.mark.parametrize(("value", "reason"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_key_and_the_fix(
    value: str, reason: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as error:  # the file key: the same check
        build_config({"limits_store": value}, {})
    assert str(error.value).startswith(f"limits_store: {reason}")
    assert main(["serve", "--listen", "127.0.0.1:0", "--limits-store", value]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"socksd: error: limits_store: {reason}")
    assert lines[0].endswith("in limits_store or --limits-store")


def test_good_urls_pass() -> None:
    for url in (
        "redis://127.0.0.1:6379/0",
        "redis://localhost/3",
        "rediss://user:pw@[::1]:6380/1?lease=2.5",
        "unix:///run/redis/redis.sock?db=1",
    ):
        assert build_config({"limits_store": url}, {}).limits_store == url


def _store_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str) -> str:
    file = tmp_path / "socksd.toml"
    file.write_text(body)
    assert main(["check-config", str(file)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("limits store: ")]
    assert len(lines) == 1
    return lines[0].removeprefix("limits store: ")


def test_check_config_shows_local_and_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _store_line(tmp_path, capsys, "").startswith("local (each process counts")
    line = _store_line(tmp_path, capsys, 'limits_store = "host"\nworkers = 3\n')
    assert line == "host (shared by the 3 workers of this host); no limit set that it would count"
    body = (
        'limits_store = "host"\nworkers = 3\nmax_sessions = 90\nmax_sessions_per_ip = 5\n'
        "auth_block = true\n[bandwidth]\nalice = 1000\n"
    )
    assert _store_line(tmp_path, capsys, body) == (
        "host (shared by the 3 workers of this host); counts max_sessions=90 in all, "
        "max_sessions_per_ip, auth_block, [bandwidth]"
    )


def test_check_config_says_redis_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_server: RedisServer
) -> None:
    port = redis_server.port
    body = f'limits_store = "redis://u:secret@127.0.0.1:{port}/0?lease=4"\n'
    line = _store_line(tmp_path, capsys, body.replace("u:secret@", ""))
    assert line.startswith(
        f"redis://127.0.0.1:{port}/0 (shared by every node using it; lease 4s; no limit set"
    )
    assert ": answers (Redis " in line
    line = _store_line(tmp_path, capsys, body)  # the password is not shown (nor accepted here)
    assert line.startswith(f"redis://u:***@127.0.0.1:{port}/0 ") and "secret" not in line


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose connections are queued by the kernel and never answered."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_check_config_is_valid_when_redis_does_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], silent_port: int
) -> None:
    pytest.importorskip("redis")
    line = _store_line(tmp_path, capsys, f'limits_store = "redis://127.0.0.1:{silent_port}/0"\n')
    assert line.endswith(
        ": does not answer now (no answer within 1s); serve admits on local limits until it does"
    )
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        closed = free.getsockname()[1]
    line = _store_line(tmp_path, capsys, f'limits_store = "redis://127.0.0.1:{closed}/0"\n')
    assert ": does not answer now (" in line and "refused" in line


@pytest.fixture
def redis_cluster_node(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server in Cluster mode (one node, no slots: it need not serve keys here)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    nodes = tmp_path / "nodes.conf"
    with socket.socket() as probe:  # the bus port: by default the port + 10000, maybe over 65535
        probe.bind(("127.0.0.1", 0))
        bus = str(probe.getsockname()[1])
    args = ("--cluster-enabled", "yes", "--cluster-config-file", str(nodes), "--cluster-port", bus)
    server = RedisServer(tmp_path, *args)
    yield server
    server.kill()


def test_a_redis_cluster_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    redis_cluster_node: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    file = tmp_path / "socksd.toml"
    file.write_text(f'limits_store = "{redis_cluster_node.url}"\n')
    assert main(["check-config", str(file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        f"socksd: error: limits_store: {redis_cluster_node.url} is a Redis Cluster node: "
        "not supported"
    )
    assert "use a standalone Redis" in captured.err
    with caplog.at_level(logging.WARNING, logger="socksd"):
        assert asyncio.run(asyncio.wait_for(_store_stays_down(redis_cluster_node.url), 30))
    warnings = [r.getMessage() for r in caplog.records if "Redis Cluster" in r.getMessage()]
    assert len(warnings) == 1, warnings


async def _store_stays_down(url: str) -> bool:
    """Serve's store never goes up with a Cluster node (it answers; it is refused)."""
    states: list[bool] = []
    store = RedisStore(url)
    store.start(states.append)
    try:
        assert await await_for(lambda: states == [False], timeout=10)
        assert store.acquire("ip", "10.0.0.1", 1) is None  # local limits decide
        await asyncio.sleep(1.2)  # two more tries (RETRY): still down, no second warning
        return not store.up and states == [False]
    finally:
        await store.close()


def test_no_log_line_shows_the_redis_password(caplog: pytest.LogCaptureFixture) -> None:
    """The store's down warning and a reload's restart-only line mask the password."""
    import dataclasses

    from socksd.server.process.reload import restart_only_changes

    store = RedisStore("redis://admin:s3cret@127.0.0.1:1/0?lease=5")
    with caplog.at_level(logging.WARNING, logger="socksd"):
        store._down(ConnectionRefusedError("refused"))
    assert "redis://admin:***@127.0.0.1:1/0 unreachable" in caplog.text
    old = build_config({"limits_store": "redis://admin:s3cret@127.0.0.1:1/0"}, {})
    new = dataclasses.replace(old, limits_store="redis://admin:n3w@127.0.0.1:1/0")
    assert restart_only_changes(old, new) == [
        "limits_store: redis://admin:***@127.0.0.1:1/0 -> redis://admin:***@127.0.0.1:1/0"
    ]
    assert "s3cret" not in caplog.text
