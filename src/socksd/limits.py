"""Limits of one server process: sessions per client IP and per user, failed-login throttling, and
per-user bandwidth. Pure bookkeeping: the caller passes the time (``loop.time()``), no I/O.

- :class:`SessionCounts` counts open sessions per key. Sessions are always counted (a dict update
  per session), so a limit switched on by a reload applies to the sessions already open.
- :class:`LoginThrottle` blocks a client address after ``max_failures`` failed logins, each less
  than ``block_time`` seconds after the previous one, until ``block_time`` has passed since the
  last. IPv6 clients are counted per /64 (one host usually holds a whole /64). The table keeps at
  most ``max_entries`` addresses, dropping the oldest; a quiet table costs one ``if`` per accept.
- :class:`TokenBucket`: ``rate`` bytes per second with bursts up to ``capacity``. The relay
  forwards what the bucket allows and holds the rest of a read, with reading paused, until
  ``wait()`` says enough tokens have come (``socksd.server.bandwidth``): no polling.
- :class:`Limits` bundles them with the settings; ``configure()`` swaps the settings on reload and
  keeps the counters and buckets (an existing user's buckets take the new rate at once; a limit
  removed is lifted for the running sessions too).

Per-user bandwidth (``[bandwidth]``): a user's own entry wins, else the lowest rate among the
groups holding the user, else ``"*"`` (every authenticated user). All sessions of a user share one
bucket per direction, so the rate is the user's total. 0 means unlimited.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from socket import AF_INET6, inet_pton
from typing import Protocol

MIN_BURST = 4096
"""Smallest bucket capacity: a slow rate still moves data in useful pieces."""

LIFTED_RATE = 1e12
"""The rate given to the buckets of running sessions whose user no longer has a limit."""

PRUNE_BUCKETS_AT = 1024
"""Number of users with buckets above which idle buckets are forgotten."""


class LimitSettings(Protocol):
    """The config keys limits read (``socksd.config.Config`` has them)."""

    @property
    def max_sessions_per_ip(self) -> int: ...
    @property
    def max_sessions_per_user(self) -> int: ...
    @property
    def max_auth_failures(self) -> int: ...
    @property
    def auth_block_time(self) -> float: ...
    @property
    def bandwidth(self) -> Mapping[str, int]: ...
    @property
    def groups(self) -> Mapping[str, Sequence[str]]: ...


class TokenBucket:
    """``rate`` bytes/s, holding up to ``capacity`` (default a tenth of a second of rate)."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float, capacity: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity if capacity is not None else max(rate / 10, MIN_BURST))
        self.tokens = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, wanted: int, now: float) -> int:
        """Take up to ``wanted`` tokens (bytes) now; return how many were taken."""
        self._refill(now)
        granted = min(wanted, int(self.tokens))
        if granted <= 0:
            return 0
        self.tokens -= granted
        return granted

    def take_whole(self, size: int, now: float) -> bool:
        """Take ``size`` tokens for one datagram, all or nothing; False when it must be dropped.

        A datagram larger than the bucket passes when the bucket is full and leaves it in
        debt, so a low rate still lets large datagrams through at that rate on average."""
        self._refill(now)
        if self.tokens < min(size, self.capacity):
            return False
        self.tokens -= size
        return True

    def wait(self, wanted: int, now: float) -> float:
        """Seconds until ``min(wanted, capacity)`` tokens are there (0 when they are)."""
        self._refill(now)
        missing = min(wanted, self.capacity) - self.tokens
        return missing / self.rate if missing > 0 else 0.0

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate (and the default capacity) from now on."""
        self._refill(now)
        self.rate = float(rate)
        self.capacity = float(max(rate / 10, MIN_BURST))
        self.tokens = min(self.tokens, self.capacity)


class SessionCounts:
    """Open sessions per key (a client address or a user name)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, key: str) -> int:
        """Count one more session of ``key``; return how many it has now."""
        count = self._counts.get(key, 0) + 1
        self._counts[key] = count
        return count

    def remove(self, key: str) -> None:
        """One session of ``key`` ended."""
        count = self._counts.get(key, 0) - 1
        if count > 0:
            self._counts[key] = count
        else:
            self._counts.pop(key, None)

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


def throttle_key(host: str) -> str:
    """The unit failed logins are counted in: an IPv4 address, or an IPv6 address's /64."""
    if ":" not in host:
        return host
    try:
        packed = inet_pton(AF_INET6, host.partition("%")[0])
    except OSError:
        return host
    if packed[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped: the IPv4 address
        return ".".join(str(b) for b in packed[12:])
    return packed[:8].hex(":", 2) + "::/64"


@dataclass(slots=True)
class _Failures:
    count: int
    last: float


class LoginThrottle:
    """Blocks client addresses after repeated failed logins (a brute-force guard)."""

    __slots__ = ("_table", "block_time", "max_entries", "max_failures")

    def __init__(
        self, max_failures: int = 10, block_time: float = 60.0, max_entries: int = 65536
    ) -> None:
        self.max_failures = max_failures
        self.block_time = block_time
        self.max_entries = max_entries
        self._table: OrderedDict[str, _Failures] = OrderedDict()

    def blocked(self, host: str, now: float) -> bool:
        """True when ``host`` is blocked now."""
        if not self._table or self.max_failures <= 0:
            return False
        entry = self._table.get(throttle_key(host))
        if entry is None:
            return False
        if now - entry.last >= self.block_time:
            del self._table[throttle_key(host)]
            return False
        return entry.count >= self.max_failures

    def failed(self, host: str, now: float) -> bool:
        """Record a failed login from ``host``; True when this failure starts a block."""
        if self.max_failures <= 0:
            return False
        key = throttle_key(host)
        entry = self._table.pop(key, None)
        if entry is None or now - entry.last >= self.block_time:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        self._table[key] = entry  # most recent last
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)
        return entry.count == self.max_failures

    def __len__(self) -> int:
        return len(self._table)


def bandwidth_rates(
    bandwidth: Mapping[str, int], groups: Mapping[str, Sequence[str]]
) -> tuple[dict[str, int], int]:
    """Per-user rates from ``[bandwidth]`` (groups expanded) and the ``"*"`` rate (0: none)."""
    rates: dict[str, int] = {}
    for key, rate in bandwidth.items():
        if key.startswith("@"):
            for user in groups.get(key[1:], ()):
                if user not in bandwidth:
                    old = rates.get(user)
                    rates[user] = rate if old is None else min(old, rate)
        elif key != "*":
            rates[key] = rate
    return rates, bandwidth.get("*", 0)


class Limits:
    """Session counters, login throttle and bandwidth buckets of one server process."""

    __slots__ = (
        "_buckets",
        "_default_rate",
        "_rates",
        "max_per_ip",
        "max_per_user",
        "per_ip",
        "per_user",
        "throttle",
    )

    def __init__(self, settings: LimitSettings | None = None) -> None:
        self.per_ip = SessionCounts()
        self.per_user = SessionCounts()
        self.throttle = LoginThrottle()
        self.max_per_ip = 0
        self.max_per_user = 0
        self._rates: dict[str, int] = {}
        self._default_rate = 0
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        if settings is not None:
            self.configure(settings, 0.0)

    def configure(self, settings: LimitSettings, now: float) -> None:
        """Take new settings (a reload); counters and buckets of current users stay."""
        self.max_per_ip = settings.max_sessions_per_ip
        self.max_per_user = settings.max_sessions_per_user
        self.throttle.max_failures = settings.max_auth_failures
        self.throttle.block_time = settings.auth_block_time
        self._rates, self._default_rate = bandwidth_rates(settings.bandwidth, settings.groups)
        for user, buckets in list(self._buckets.items()):
            rate = self.rate_for(user)
            for bucket in buckets:  # running sessions keep their buckets: lift or change them
                bucket.set_rate(rate or LIFTED_RATE, now)
            if not rate:
                del self._buckets[user]

    def rate_for(self, user: str | None) -> int:
        """The bandwidth limit of ``user`` in bytes/s; 0 when unlimited."""
        if user is None:
            return 0
        return self._rates.get(user, self._default_rate)

    def buckets_for(self, user: str | None, now: float) -> tuple[TokenBucket, TokenBucket] | None:
        """The (client to target, target to client) buckets of ``user``, None when unlimited.

        A user's pair is kept while the user has a rate; when ``PRUNE_BUCKETS_AT`` users have
        one, the full pairs of users with no open session are forgotten, so the table stays
        bounded by the users active at the time.
        """
        buckets = self._buckets.get(user) if user is not None else None
        if buckets is not None:
            return buckets
        rate = self.rate_for(user)
        if not rate or user is None:
            return None
        if len(self._buckets) >= PRUNE_BUCKETS_AT:
            self._prune(now)
        buckets = (TokenBucket(rate, now), TokenBucket(rate, now))
        self._buckets[user] = buckets
        return buckets

    def _prune(self, now: float) -> None:
        """Forget the buckets of users with no session whose buckets are full (no state lost)."""
        for user, buckets in list(self._buckets.items()):
            if self.per_user[user] == 0 and all(b.wait(int(b.capacity), now) == 0 for b in buckets):
                del self._buckets[user]
