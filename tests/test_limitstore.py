"""The limit stores (socksd.limitstore): the host store's shared table (across a real fork, a dead
worker's column forgotten, the failed-login block), admission through a shared store (two
processes' limits share one count), and the Redis store against a real redis-server (atomic
check-and-count across nodes, releases flushed, a dead node's lease, Redis away and back)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable

import pytest

from socksd.config import Config, ConfigError, build_config
from socksd.limits import Limits
from socksd.limitstore import (
    ADMIT,
    BLOCKED,
    FULL,
    REFUSE,
    HostStore,
    RedisStore,
    Verdict,
    open_limit_store,
    refresh_shares,
    split_lease,
)
from socksd.rules import RuleSet
from socksd.server.handshake.admission import Admission, Refusal, admit
from socksd.server.handshake.refusals import RefusalLog
from tests.helpers import await_for
from tests.servers import RedisServer

# -- host store -----------------------------------------------------------------------------------


def test_host_store_counts_across_columns_and_forgets_a_dead_column() -> None:
    store = HostStore(2, slots=64)
    for column in (0, 1, 0):
        store.use_column(column)
        assert store.acquire("ip", "10.0.0.1", 3) == ADMIT
    assert store.acquire("ip", "10.0.0.1", 3) == REFUSE  # 3 counted over both workers
    assert store.acquire("ip", "10.0.0.2", 3) == ADMIT  # another key is not affected
    assert store.acquire("user", "10.0.0.1", 3) == ADMIT  # nor the same key of another kind
    store.release("ip", "10.0.0.1")  # column 0 gives one back
    assert store.total("ip", "10.0.0.1") == 2
    assert store.acquire("ip", "10.0.0.1", 3) == ADMIT
    store.forget_column(0)  # worker 0 died: only worker 1's session counts
    assert store.total("ip", "10.0.0.1") == 1
    assert store.acquire("ip", "10.0.0.1", 0) == ADMIT  # no limit: always counted


def test_host_store_is_shared_with_a_forked_worker() -> None:
    store = HostStore(2, slots=64)
    pid = os.fork()
    if pid == 0:
        store.use_column(1)
        ok = all(store.acquire("ip", "192.0.2.7", 10) == ADMIT for _ in range(7))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.total("ip", "192.0.2.7") == 7
    assert [store.acquire("ip", "192.0.2.7", 10) for _ in range(4)] == [ADMIT] * 3 + [REFUSE]


def test_host_store_block_after_failures_then_lifted() -> None:
    store = HostStore(1, slots=64)
    for _ in range(3):
        store.failed("192.0.2.9", 60.0)
    assert store.failures("192.0.2.9") == 3
    block = {"block_key": "192.0.2.9", "max_failures": 4, "block_time": 60.0}
    assert store.acquire("ip", "192.0.2.9", 0, **block) == ADMIT  # type: ignore[arg-type]
    store.failed("192.0.2.9", 60.0)
    assert store.acquire("ip", "192.0.2.9", 0, **block) == BLOCKED  # type: ignore[arg-type]
    # a block time already over: the failures no longer count
    assert (
        store.acquire("ip", "192.0.2.9", 0, block_key="192.0.2.9", max_failures=4, block_time=0.0)
        == ADMIT
    )


def test_host_store_counts_every_session_in_the_same_call() -> None:
    store = HostStore(3, slots=64)
    verdicts = []
    for i in range(6):  # three workers, a different address each time: only the total limits
        store.use_column(i % 3)
        verdicts.append(store.acquire("ip", f"10.0.1.{i}", 0, total=4))
    assert verdicts == [ADMIT] * 4 + [FULL] * 2
    assert store.total("all", "") == 4
    assert store.total("ip", "10.0.1.4") == 0  # a session refused by the total counts nowhere
    assert store.acquire("ip", "10.0.1.0", 1, total=10) == REFUSE  # the address's own limit
    assert store.total("all", "") == 4  # ... counts nothing in the total either
    store.use_column(1)
    store.release("ip", "10.0.1.1", total=True)  # worker 1's session ends
    assert store.total("all", "") == 3
    assert store.acquire("ip", "10.0.1.9", 0, total=4) == ADMIT
    assert store.acquire("ip", "10.0.1.9", 0, total=0) == ADMIT  # no limit: counted
    store.forget_column(1)
    assert store.total("all", "") == 3


def test_host_store_full_table_answers_none() -> None:
    store = HostStore(1, slots=4)
    verdicts = [store.acquire("ip", f"10.0.0.{i}", 5) for i in range(8)]
    assert verdicts[:4] == [ADMIT] * 4
    assert None in verdicts[4:]  # no free slot: the local limits decide


# -- admission through a shared store ---------------------------------------------------------


def _shared_admit(limits: Limits, host: str) -> Admission | Refusal:
    outcome = admit(RuleSet(), limits, host=host, client=f"{host}:1", refusals=RefusalLog())
    if isinstance(outcome, Refusal):
        return outcome
    verdict = outcome.shared_accept()
    assert verdict is None or isinstance(verdict, int)
    refusal = outcome.shared_outcome("ip", verdict)
    if refusal is not None:
        outcome.release()
        return refusal
    return outcome


def test_two_processes_limits_share_one_count() -> None:
    store = HostStore(2, slots=64)
    config = Config(max_sessions_per_ip=3)
    one, two = Limits(config, store), Limits(config, store)
    admitted = []
    for i in range(3):
        store.use_column(i % 2)
        outcome = _shared_admit(one if i % 2 == 0 else two, "10.1.1.1")
        assert isinstance(outcome, Admission)
        admitted.append(outcome)
    store.use_column(1)
    refusal = _shared_admit(two, "10.1.1.1")  # locally two has one session: only the store says no
    assert isinstance(refusal, Refusal) and refusal.limit == "max_sessions_per_ip"
    assert two.per_ip["10.1.1.1"] == 1  # the refused session's local count was given back
    store.use_column(0)
    admitted[0].release()
    assert store.total("ip", "10.1.1.1") == 2
    assert isinstance(_shared_admit(two, "10.1.1.1"), Admission)


def test_max_sessions_counts_every_process_of_the_store() -> None:
    store = HostStore(2, slots=64)
    config = build_config({"max_sessions": 3, "limits_store": "host"}, {})
    one, two = Limits(config, store), Limits(config, store)
    for i in range(3):
        store.use_column(i % 2)
        assert isinstance(_shared_admit(one if i % 2 == 0 else two, f"10.6.6.{i}"), Admission)
    store.use_column(1)
    refusal = _shared_admit(two, "10.6.6.9")  # two holds one session: only the total says no
    assert isinstance(refusal, Refusal) and refusal.limit == "max_sessions"
    assert refusal.reply is None  # closed at accept, as the process's own max_sessions does


def _user_session(limits: Limits, store: HostStore, column: int, user: str) -> Admission:
    """A session of ``user`` admitted and counted (locally and in ``store``) by one process."""
    store.use_column(column)
    admission = _shared_admit(limits, f"10.7.7.{column}")
    assert isinstance(admission, Admission)
    limits.per_user.add(user)
    admission.user = user
    verdict = store.acquire("user", user, 0)
    assert admission.shared_outcome("user", verdict) is None
    return admission


def test_bandwidth_rate_is_shared_by_sessions_over_the_processes() -> None:
    store = HostStore(2, slots=64)
    config = Config(bandwidth={"alice": 800_000, "bob": 100_000})
    one, two = Limits(config, store), Limits(config, store)
    first = _user_session(one, store, 0, "alice")
    buckets = one.buckets_for("alice", 0.0)
    assert buckets is not None and buckets[0].rate == 800_000  # alone: the whole rate
    others = [_user_session(two, store, 1, "alice") for _ in range(3)]
    two_buckets = two.buckets_for("alice", 0.0)
    assert two_buckets is not None and two_buckets[1].rate == 600_000  # 3 of 4 sessions
    assert buckets[0].rate == 800_000  # one learns of two's sessions at its next refresh
    one.share("alice", 0.0)
    assert buckets[0].rate == buckets[1].rate == 200_000
    for admission in others[:2]:
        store.use_column(1)
        admission.release()  # two gives its part back at once
    assert two_buckets[0].rate == 400_000
    one.share("alice", 0.0)
    assert buckets[0].rate == 400_000
    assert one.shared_users() == ["alice"]
    store.use_column(0)
    first.release()
    assert one.shared_users() == []
    two.share("alice", 0.0)
    assert two_buckets[0].rate == 800_000  # alone again


def test_bandwidth_shares_are_refreshed_periodically() -> None:
    store = HostStore(2, slots=64)
    config = Config(bandwidth={"*": 1_000_000})
    one, two = Limits(config, store), Limits(config, store)
    _user_session(one, store, 0, "carol")
    buckets = one.buckets_for("carol", 0.0)
    assert buckets is not None
    _user_session(two, store, 1, "carol")

    async def run() -> None:
        task = asyncio.get_running_loop().create_task(refresh_shares(one, every=0.01))
        try:
            assert await await_for(lambda: buckets[0].rate == 500_000, timeout=5)
        finally:
            task.cancel()

    asyncio.run(run())


def test_failed_logins_block_through_the_store() -> None:
    store = HostStore(2, slots=64)
    config = Config(max_auth_failures=2, auth_block=True)
    one, two = Limits(config, store), Limits(config, store)
    first = _shared_admit(one, "10.2.2.2")
    second = _shared_admit(two, "10.2.2.2")
    assert isinstance(first, Admission) and isinstance(second, Admission)
    first.login_failed("alice")
    second.login_failed("alice")  # each process saw one failure: neither blocks by itself
    assert not one.throttle.blocked("10.2.2.2", time.monotonic())
    refusal = _shared_admit(one, "10.2.2.2")
    assert isinstance(refusal, Refusal) and refusal.limit == "auth_block"


def test_local_store_is_no_store() -> None:
    assert open_limit_store("local") is None
    assert isinstance(open_limit_store("host"), HostStore)


def test_config_key() -> None:
    assert build_config({"limits_store": "host"}, {}).limits_store == "host"
    assert Config().limits_store == "local"
    with pytest.raises(ConfigError, match=r"^limits_store: 'memcached://x' is not"):
        build_config({"limits_store": "memcached://x"}, {})
    with pytest.raises(ConfigError, match=r"^limits_store: lease=0"):
        build_config({"limits_store": "redis://127.0.0.1:1/0?lease=0"}, {})
    assert split_lease("redis://h:1/2?lease=2.5") == ("redis://h:1/2", 2.5)
    assert split_lease("redis://h:1/2")[0] == "redis://h:1/2"


# -- Redis store ------------------------------------------------------------------------------


async def _verdict(result: Verdict | Awaitable[Verdict]) -> Verdict:
    if result is None or isinstance(result, int):
        return result
    return await result


def _redis_total(server: RedisServer, key: str) -> int:
    import redis

    client = redis.Redis(port=server.port)
    try:
        return sum(int(v) for v in client.hgetall(f"socksd:n:ip:{key}").values())
    finally:
        client.close()


def test_redis_store_admits_exactly_the_limit_across_nodes(redis_server: RedisServer) -> None:
    asyncio.run(
        asyncio.wait_for(_redis_store_admits_exactly_the_limit_across_nodes(redis_server), 60)
    )


async def _redis_store_admits_exactly_the_limit_across_nodes(redis_server: RedisServer) -> None:
    nodes = [RedisStore(redis_server.url, lease=5) for _ in range(3)]
    for node in nodes:
        node.start()
    try:
        assert await await_for(lambda: all(n.up for n in nodes))
        tries = [nodes[i % 3].acquire("ip", "10.3.3.3", 10) for i in range(14)]
        verdicts = await asyncio.gather(*(_verdict(t) for t in tries))
        assert sorted(verdicts) == [REFUSE] * 4 + [ADMIT] * 10
        assert _redis_total(redis_server, "10.3.3.3") == 10
        for node in nodes:
            for _ in range(node.held.get("socksd:n:ip:10.3.3.3", 0)):
                node.release("ip", "10.3.3.3")
        assert await await_for(lambda: _redis_total(redis_server, "10.3.3.3") == 0)
    finally:
        for node in nodes:
            await node.close()


def test_redis_store_counts_every_session_and_user_totals(redis_server: RedisServer) -> None:
    asyncio.run(asyncio.wait_for(_redis_store_counts_every_session(redis_server), 60))


async def _redis_store_counts_every_session(redis_server: RedisServer) -> None:
    nodes = [RedisStore(redis_server.url, lease=5) for _ in range(3)]
    for node in nodes:
        node.start()
    try:
        assert await await_for(lambda: all(n.up for n in nodes))
        tries = [nodes[i % 3].acquire("ip", f"10.8.8.{i}", 0, total=7) for i in range(12)]
        verdicts = await asyncio.gather(*(_verdict(t) for t in tries))
        assert sorted(verdicts) == [FULL] * 5 + [ADMIT] * 7  # one call: the total and the address
        ended = next(i for i, v in enumerate(verdicts) if v == ADMIT)
        nodes[ended % 3].release("ip", f"10.8.8.{ended}", total=True)  # batched, as any release
        deadline = time.monotonic() + 5
        while await _verdict(nodes[0].acquire("ip", "10.8.9.9", 0, total=7)) != ADMIT:
            assert time.monotonic() < deadline, "a released session kept counting in the total"
            await asyncio.sleep(0.02)
        # user totals: the acquire answers the fleet's count, a refresh updates it
        for i in range(3):
            assert await _verdict(nodes[i].acquire("user", "alice", 0)) == ADMIT
        assert nodes[2].total("user", "alice") == 3
        assert nodes[0].total("user", "alice") == 1  # as last answered
        pending = nodes[0].refresh("user", ["alice", "nobody"])
        assert pending is not None
        await pending
        assert nodes[0].total("user", "alice") == 3
        assert nodes[0].total("user", "nobody") is None
        nodes[1].release("user", "alice")
        assert nodes[1].total("user", "alice") is None  # no session of alice left on that node
    finally:
        for node in nodes:
            await node.close()


def test_redis_store_dead_node_stops_counting_after_its_lease(redis_server: RedisServer) -> None:
    asyncio.run(
        asyncio.wait_for(_redis_store_dead_node_stops_counting_after_its_lease(redis_server), 60)
    )


async def _redis_store_dead_node_stops_counting_after_its_lease(redis_server: RedisServer) -> None:
    alive, dying = RedisStore(redis_server.url, lease=0.5), RedisStore(redis_server.url, lease=0.5)
    alive.start()
    dying.start()
    try:
        assert await await_for(lambda: alive.up and dying.up)
        for _ in range(3):
            assert await _verdict(dying.acquire("ip", "10.4.4.4", 3)) == ADMIT
        assert await _verdict(alive.acquire("ip", "10.4.4.4", 3)) == REFUSE
        assert dying._task is not None
        dying._task.cancel()  # the node stops renewing its lease, as a killed one would

        async def admitted() -> bool:
            return await _verdict(alive.acquire("ip", "10.4.4.4", 3)) == ADMIT

        deadline = time.monotonic() + 5
        while not await admitted():
            assert time.monotonic() < deadline, "a dead node's sessions kept counting"
            await asyncio.sleep(0.1)
    finally:
        await alive.close()
        await dying.close()


def test_redis_store_down_then_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(asyncio.wait_for(_redis_store_down_then_back(redis_server, caplog), 60))


async def _redis_store_down_then_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    states: list[bool] = []
    store = RedisStore(redis_server.url, lease=1)
    store.start(states.append)
    try:
        assert await await_for(lambda: store.up)
        assert await _verdict(store.acquire("ip", "10.5.5.5", 10)) == ADMIT
        redis_server.kill()
        with caplog.at_level(logging.WARNING, logger="socksd"):
            verdicts = [await _verdict(store.acquire("ip", "10.5.5.5", 10)) for _ in range(20)]
            assert await await_for(lambda: not store.up)
            verdicts += [await _verdict(store.acquire("ip", "10.5.5.5", 10)) for _ in range(5)]
        assert verdicts[-5:] == [None] * 5  # down: answered at once, local limits decide
        assert states[-1] is False
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1  # one warning, not one per session
        admitted = 1 + sum(v in (ADMIT, None) for v in verdicts)
        store.release("ip", "10.5.5.5")
        redis_server.start()  # empty: the node writes its counts again
        assert await await_for(lambda: store.up, timeout=10)
        assert states[-1] is True
        assert await await_for(
            lambda: _redis_total(redis_server, "10.5.5.5") == admitted - 1, timeout=5
        )
    finally:
        await store.close()


def test_changing_the_store_needs_a_restart() -> None:
    from socksd.server.process.reload import restart_only_changes

    assert restart_only_changes(Config(), Config(limits_store="host")) == [
        "limits_store: local -> host"
    ]


def test_a_store_gives_each_worker_all_of_max_sessions() -> None:
    from socksd.server.process.workers import Supervisor, sessions_split

    assert sessions_split(Config(workers=4)) == 4  # no store: each worker its share
    config = build_config({"workers": 4, "max_sessions": 100, "limits_store": "host"}, {})
    assert sessions_split(config) == 1  # the store has the total
    # the default max_sessions (sized from one process's open files) is never a shared total
    default = build_config({"workers": 4, "limits_store": "redis://127.0.0.1:6379/0"}, {})
    assert default.shared_max_sessions == 0 and sessions_split(default) == 4
    assert Limits(default, HostStore(1)).max_total == 0
    supervisor = Supervisor.__new__(Supervisor)  # for_worker only reads config and count
    supervisor.config, supervisor.count = config, 4
    assert supervisor.for_worker(config).max_sessions == 100
    supervisor.config = local = Config(workers=4, max_sessions=100)
    assert supervisor.for_worker(local).max_sessions == 25


def test_a_reload_that_sets_max_sessions_shares_it_between_workers() -> None:
    """Set by a reload (not at start), max_sessions is the store's total too: no split."""
    from socksd.server.process.workers import Supervisor

    started = build_config({"workers": 4, "limits_store": "host"}, {})  # default: split
    supervisor = Supervisor.__new__(Supervisor)  # for_worker only reads config and count
    supervisor.config, supervisor.count = started, 4
    reloaded = build_config({"workers": 4, "max_sessions": 100, "limits_store": "host"}, {})
    assert supervisor.for_worker(reloaded).max_sessions == 100
