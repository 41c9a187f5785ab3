"""Limits bookkeeping: token bucket arithmetic, session counts, failed-login throttle, bandwidth
rates from users and groups, reconfiguration keeping counters and buckets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.limits import (
    MIN_BURST,
    PRUNE_BUCKETS_AT,
    Limits,
    LoginThrottle,
    SessionCounts,
    TokenBucket,
    bandwidth_rates,
    throttle_key,
)


def test_bucket_starts_full_then_refills_at_rate() -> None:
    bucket = TokenBucket(1_000_000, now=0.0)
    assert bucket.capacity == 100_000  # a tenth of a second
    assert bucket.take(250_000, 0.0) == 100_000
    assert bucket.take(10, 0.0) == 0
    assert bucket.wait(50_000, 0.0) == pytest.approx(0.05)
    assert bucket.take(250_000, 0.05) == 50_000
    assert bucket.take(250_000, 10.0) == 100_000  # never more than the capacity


def test_bucket_wait_is_capped_by_capacity_and_zero_when_available() -> None:
    bucket = TokenBucket(10_000, now=0.0)
    assert bucket.capacity == MIN_BURST
    assert bucket.wait(1, 0.0) == 0.0
    bucket.take(MIN_BURST, 0.0)
    assert bucket.wait(10**9, 0.0) == pytest.approx(MIN_BURST / 10_000)


def test_bucket_rate_change() -> None:
    bucket = TokenBucket(1_000_000, now=0.0)
    bucket.set_rate(50_000, now=0.0)
    assert bucket.capacity == 5_000
    assert bucket.tokens <= bucket.capacity
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(1_000, 10_000_000),
    steps=st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 300_000)), min_size=1, max_size=60),
)
def test_bucket_never_grants_more_than_capacity_plus_rate_times_time(
    rate: int, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(rate, now=0.0)
    now = 0.0
    granted = 0
    for dt, wanted in steps:
        now += dt
        got = bucket.take(wanted, now)
        assert 0 <= got <= wanted
        granted += got
        assert granted <= bucket.capacity + rate * now + 1
        assert bucket.wait(wanted, now) >= 0


def test_session_counts() -> None:
    counts = SessionCounts()
    assert counts.add("a") == 1
    assert counts.add("a") == 2
    assert counts.add("b") == 1
    counts.remove("a")
    assert counts["a"] == 1
    counts.remove("a")
    counts.remove("a")  # more removes than adds do not go negative
    assert counts["a"] == 0 and len(counts) == 1


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:0db8:0001:0002::/64"),
        ("2001:db8:1:2::99", "2001:0db8:0001:0002::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("fe80::1%eth0", "fe80:0000:0000:0000::/64"),
        ("not an address", "not an address"),
    ],
)
def test_throttle_key(host: str, key: str) -> None:
    assert throttle_key(host) == key


A = "192.0.2.1"


def delays(throttle: LoginThrottle, host: str, user: str | None, times: list[float]) -> list[float]:
    return [throttle.failed(host, user, t).delay for t in times]


def test_login_throttle_delays_double_per_user_up_to_the_cap() -> None:
    throttle = LoginThrottle(max_failures=100, delay=0.5, max_delay=5.0)
    assert delays(throttle, A, "mallory", [0, 1, 2, 3, 4, 5, 6]) == [
        0.5,
        1.0,
        2.0,
        4.0,
        5.0,
        5.0,
        5.0,
    ]
    failure = throttle.failed(A, "mallory", 7)
    assert (failure.user_failures, failure.address_failures, failure.blocks) == (8, 8, False)
    # another user from the same address starts at the base delay: people are not punished
    # for someone else's failures below max_failures
    assert throttle.failed(A, "alice", 8).delay == 0.5
    assert throttle.failed("192.0.2.2", "mallory", 8).delay == 0.5
    assert not throttle.blocked(A, 8)  # no hard block unless switched on


def test_login_throttle_success_forgets_the_pair_not_the_address() -> None:
    throttle = LoginThrottle(max_failures=100, delay=1.0, max_delay=8.0)
    delays(throttle, A, "alice", [0, 1, 2])
    throttle.succeeded(A, "alice")
    assert throttle.failures(A, "alice", 3) == 0
    assert throttle.failures(A, None, 3) == 3
    assert throttle.failed(A, "alice", 3).delay == 1.0


def test_login_throttle_address_over_max_failures_slows_every_user() -> None:
    throttle = LoginThrottle(max_failures=3, delay=0.25, max_delay=4.0)
    spray = [throttle.failed(A, f"user{i}", i).delay for i in range(8)]
    assert spray == [0.25, 0.25, 0.25, 0.25, 0.5, 1.0, 2.0, 4.0]  # the 4th is 1 over
    assert throttle.failed("192.0.2.2", "user9", 9).delay == 0.25


def test_login_throttle_unknown_user_counts_the_address_only() -> None:
    throttle = LoginThrottle(max_failures=100, delay=0.5, max_delay=3.0)
    assert delays(throttle, A, None, [0, 1, 2, 3]) == [0.5, 1.0, 2.0, 3.0]
    failure = throttle.failed(A, None, 4)
    assert (failure.user_failures, failure.address_failures) == (0, 5)
    assert throttle.failed(A, "alice", 5).delay == 0.5


def test_login_throttle_spaced_failures_do_not_add_up() -> None:
    throttle = LoginThrottle(max_failures=2, block_time=5, block=True, delay=1.0, max_delay=9.0)
    for t in range(0, 100, 6):
        failure = throttle.failed(A, "alice", t)
        assert (failure.delay, failure.address_failures, failure.blocks) == (1.0, 1, False)
    assert not throttle.blocked(A, 100)


def test_login_throttle_no_delay_when_off() -> None:
    throttle = LoginThrottle(max_failures=1, delay=0.0)
    assert delays(throttle, A, "alice", [0, 1, 2]) == [0.0, 0.0, 0.0]


def test_login_throttle_hard_block_is_an_option_with_the_old_semantics() -> None:
    throttle = LoginThrottle(max_failures=3, block_time=60, block=True)
    assert not throttle.blocked(A, 0)
    assert throttle.failed(A, "alice", 0).blocks is False
    assert throttle.failed(A, "bob", 10).blocks is False
    assert not throttle.blocked(A, 10)
    assert throttle.failed(A, None, 20).blocks is True  # the third starts the block
    assert throttle.blocked(A, 21)
    assert not throttle.blocked("192.0.2.2", 21)
    assert throttle.blocked(A, 79.9)
    assert not throttle.blocked(A, 80.0)  # 60 s after the last failure
    assert len(throttle) == 0  # the expired entry is gone
    throttle.block = False  # a reload switching it off lifts running blocks
    delays(throttle, A, "alice", [81, 82, 83])
    assert not throttle.blocked(A, 83)


def test_login_throttle_counts_ipv6_per_64() -> None:
    throttle = LoginThrottle(max_failures=2, block_time=5, block=True, delay=1.0, max_delay=9.0)
    throttle.failed("2001:db8::1", "alice", 0)
    failure = throttle.failed("2001:db8::2", "alice", 1)
    assert (failure.delay, failure.blocks) == (2.0, True)
    assert throttle.blocked("2001:db8::ffff", 1)
    assert not throttle.blocked("2001:db8:0:1::1", 1)
    assert throttle.begin_check("2001:db8::1") and throttle.checks("2001:db8::ffff") == 1


def test_login_throttle_bounds_checks_in_flight_per_address() -> None:
    throttle = LoginThrottle(max_checks=2)
    assert throttle.begin_check(A) and throttle.begin_check(A)
    assert not throttle.begin_check(A)  # refused, not counted
    assert throttle.checks(A) == 2
    assert throttle.begin_check("192.0.2.2")  # other addresses are not affected
    throttle.end_check(A)
    assert throttle.begin_check(A)
    for _ in range(5):
        throttle.end_check(A)  # more ends than begins do not go negative
    assert throttle.checks(A) == 0
    unlimited = LoginThrottle(max_checks=0)
    assert all(unlimited.begin_check(A) for _ in range(1000))


def test_login_throttle_off_and_bounded() -> None:
    off = LoginThrottle(max_failures=0, block=True)
    for _ in range(100):
        assert off.failed(A, "alice", 0).blocks is False
    assert not off.blocked(A, 0)
    small = LoginThrottle(max_failures=2, block_time=60, max_entries=100, block=True)
    for i in range(1000):
        small.failed(f"10.0.{i // 256}.{i % 256}", f"user{i}", i / 1000)
    assert len(small) == 100 and len(small._pairs) == 100
    small.failed("10.0.3.231", "user999", 1.0)  # the most recent entries are the ones kept
    assert small.blocked("10.0.3.231", 1.0)
    assert small.failures("10.0.3.231", "user999", 1.0) == 2
    assert small.failures("10.0.0.0", "user0", 1.0) == 0


def test_bandwidth_rates_precedence() -> None:
    groups = {"ops": ["bob", "carol"], "slow": ["carol", "dave"]}
    rates, default = bandwidth_rates(
        {"@ops": 2_000, "@slow": 1_000, "bob": 5_000, "*": 9_000, "erin": 0}, groups
    )
    assert rates == {"bob": 5_000, "carol": 1_000, "dave": 1_000, "erin": 0}
    assert default == 9_000


@dataclass
class Settings:
    max_sessions: int = 10000
    max_sessions_per_ip: int = 0
    max_sessions_per_user: int = 0
    max_auth_failures: int = 10
    auth_block_time: float = 60.0
    auth_delay: float = 0.5
    effective_max_auth_delay: float = 5.0
    max_auth_checks_per_ip: int = 4
    auth_block: bool = False
    bandwidth: dict[str, int] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)


def test_limits_configure_keeps_buckets_and_applies_new_rates() -> None:
    limits = Limits(Settings(bandwidth={"alice": 1_000_000, "bob": 10_000}))
    assert limits.rate_for(None) == 0 and limits.rate_for("carol") == 0
    assert limits.buckets_for("carol", 0.0) is None
    alice = limits.buckets_for("alice", 0.0)
    assert alice is not None and alice is limits.buckets_for("alice", 1.0)
    bob = limits.buckets_for("bob", 0.0)
    assert bob is not None
    limits.per_ip.add("192.0.2.1")
    limits.throttle.failed("192.0.2.1", "alice", 1.0)
    limits.throttle.begin_check("192.0.2.1")
    limits.configure(
        Settings(
            max_sessions_per_ip=3,
            bandwidth={"alice": 500_000},
            max_auth_failures=4,
            auth_delay=0.1,
            effective_max_auth_delay=2.0,
            max_auth_checks_per_ip=1,
            auth_block=True,
        ),
        2.0,
    )
    assert limits.max_per_ip == 3 and limits.throttle.max_failures == 4
    throttle = limits.throttle
    assert (throttle.delay, throttle.max_delay, throttle.max_checks, throttle.block) == (
        0.1,
        2.0,
        1,
        True,
    )
    # the failures and the checks in flight survive the reload
    assert throttle.failures("192.0.2.1", "alice", 2.0) == 1
    assert not throttle.begin_check("192.0.2.1")
    assert limits.per_ip["192.0.2.1"] == 1  # counters survive
    assert limits.buckets_for("alice", 2.0) is alice  # same buckets, new rate
    assert alice[0].rate == alice[1].rate == 500_000
    assert limits.buckets_for("bob", 2.0) is None  # no longer limited
    assert bob[0].rate >= 1e12  # and the running sessions' buckets are lifted


def test_limits_forget_idle_buckets_of_users_without_sessions() -> None:
    limits = Limits(Settings(bandwidth={"*": 1_000_000}))
    active = limits.buckets_for("active", 0.0)
    assert active is not None
    active[0].take(10, 0.0)
    limits.per_user.add("active")
    for i in range(PRUNE_BUCKETS_AT + 10):
        limits.buckets_for(f"user{i}", 100.0)
    assert limits.buckets_for("active", 100.0) is active  # has a session: kept
    assert len(limits._buckets) <= PRUNE_BUCKETS_AT + 1
