"""Limits of one server process: sessions per client IP and per user, failed-login throttling, and
per-user bandwidth. Pure bookkeeping: the caller passes the time (``loop.time()``), no I/O. A
shared store (``socksd.limitstore``) can add a second check over all workers or nodes.

- :class:`SessionCounts` counts open sessions per key. Sessions are always counted (a dict update
  per session), so a limit switched on by a reload applies to the sessions already open.
- :class:`LoginThrottle` limits password guessing, not people: failed logins are counted per
  (address, user) and per address, and each failure's reply waits a delay that doubles with the
  failures counted; the login checks one address may have in flight (queued, running, or waiting
  out a failure delay) are bounded, so one address can neither guess fast in parallel nor fill
  the bcrypt pool others need. Successes are never delayed. A hard block of the address (closed
  at accept) is an option, off by default. IPv6 clients are counted per /64 (one host usually
  holds a whole /64). Each table keeps at most ``max_entries`` keys, dropping the least recently
  failed; a quiet table costs one ``if`` per login.
- :class:`TokenBucket`: ``rate`` bytes per second with bursts up to ``capacity``. The relay
  forwards what the bucket allows and holds the rest of a read, with reading paused, until
  ``wait()`` says enough tokens have come (``socksd.server.dataplane.bandwidth``): no polling.
- :class:`Limits` bundles them with the settings; ``configure()`` swaps the settings on reload and
  keeps the counters and buckets (an existing user's buckets take the new rate at once; a limit
  removed is lifted for the running sessions too).

Per-user bandwidth (``[bandwidth]``): a user's own entry wins, else the lowest rate among the
groups holding the user, else ``"*"`` (every authenticated user). All sessions of a user share one
bucket per direction, so the rate is the user's total. 0 means unlimited. With a shared store
the rate is the user's total over every process that shares it: this process's buckets get the
part ``rate * local / total`` (:meth:`Limits.share`), ``local`` the user's sessions here and
``total`` the store's count of them everywhere; the full rate when the store cannot say.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from socket import AF_INET6, inet_pton
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from socksd.limitstore import LimitStore

MIN_BURST = 4096
"""Smallest bucket capacity: a slow rate still moves data in useful pieces."""

LIFTED_RATE = 1e12
"""The rate given to the buckets of running sessions whose user no longer has a limit."""

PRUNE_BUCKETS_AT = 1024
"""Number of users with buckets above which idle buckets are forgotten."""

_K = TypeVar("_K")


class LimitSettings(Protocol):
    """The config keys limits read (``socksd.config.Config`` has them)."""

    @property
    def max_sessions(self) -> int: ...
    @property
    def max_sessions_per_ip(self) -> int: ...
    @property
    def max_sessions_per_user(self) -> int: ...
    @property
    def max_auth_failures(self) -> int: ...
    @property
    def auth_block_time(self) -> float: ...
    @property
    def auth_delay(self) -> float: ...
    @property
    def effective_max_auth_delay(self) -> float: ...
    @property
    def max_auth_checks_per_ip(self) -> int: ...
    @property
    def auth_block(self) -> bool: ...
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


@dataclass(frozen=True, slots=True)
class LoginFailure:
    """What one failed login leads to (:meth:`LoginThrottle.failed`)."""

    delay: float
    """Seconds to wait before the failure reply."""
    address_failures: int
    """Failures counted for the client's address (IPv6: its /64), this one included."""
    user_failures: int
    """Failures counted for the (address, user) pair, this one included; 0 for no user."""
    blocks: bool
    """With the hard block on: this failure starts the block of the address."""


class LoginThrottle:
    """Slows down password guessing: failure delays, in-flight checks per address, hard block.

    Failures are counted per (address, user) and per address; a count starts over
    ``block_time`` seconds after its last failure, and a successful login forgets its pair. The
    n-th failure of a pair waits ``delay * 2**(n-1)`` before its reply; once an address has more
    than ``max_failures``, each further failure from it waits at least ``delay * 2**k`` (k
    failures over); a failure without a user (GSSAPI) counts the address only and waits as the
    address's n-th failure. Delays never exceed ``max_delay``. Successes are never delayed.

    ``begin_check``/``end_check`` bound the checks one address may have in flight (queued,
    running, or waiting out a failure delay) to ``max_checks``: a guesser gets at most
    ``max_checks`` answers per delay, and cannot fill the shared bcrypt pool.

    With ``block`` on (off by default), an address with ``max_failures`` failures is also
    blocked: :meth:`blocked` is True until ``block_time`` after its last failure.
    """

    __slots__ = (
        "_addresses",
        "_checks",
        "_pairs",
        "block",
        "block_time",
        "delay",
        "max_checks",
        "max_delay",
        "max_entries",
        "max_failures",
    )

    def __init__(
        self,
        max_failures: int = 10,
        block_time: float = 60.0,
        max_entries: int = 65536,
        *,
        delay: float = 0.5,
        max_delay: float = 5.0,
        max_checks: int = 4,
        block: bool = False,
    ) -> None:
        self.max_failures = max_failures
        self.block_time = block_time
        self.max_entries = max_entries
        self.delay = delay
        self.max_delay = max_delay
        self.max_checks = max_checks
        self.block = block
        self._addresses: OrderedDict[str, _Failures] = OrderedDict()
        self._pairs: OrderedDict[tuple[str, str], _Failures] = OrderedDict()
        self._checks: dict[str, int] = {}

    def blocked(self, host: str, now: float) -> bool:
        """True when ``host`` is under a hard block now (only with ``block`` on)."""
        if not self.block or not self._addresses or self.max_failures <= 0:
            return False
        entry = self._current(self._addresses, throttle_key(host), now)
        return entry is not None and entry.count >= self.max_failures

    def begin_check(self, host: str) -> bool:
        """Count one more login check of ``host``; False (nothing counted) when it has
        ``max_checks`` in flight already."""
        key = throttle_key(host)
        count = self._checks.get(key, 0)
        if self.max_checks and count >= self.max_checks:
            return False
        self._checks[key] = count + 1
        return True

    def end_check(self, host: str) -> None:
        """A check counted by :meth:`begin_check` is over (answered, or its session ended)."""
        key = throttle_key(host)
        count = self._checks.get(key, 0) - 1
        if count > 0:
            self._checks[key] = count
        else:
            self._checks.pop(key, None)

    def checks(self, host: str) -> int:
        """Login checks of ``host`` in flight."""
        return self._checks.get(throttle_key(host), 0)

    def failed(self, host: str, user: str | None, now: float) -> LoginFailure:
        """Count a failed login of ``user`` (None: unknown) from ``host``; how to answer it."""
        key = throttle_key(host)
        address = self._count(self._addresses, key, now)
        pair = self._count(self._pairs, (key, user), now) if user is not None else 0
        delay = 0.0
        if self.delay > 0:
            steps = pair if user is not None else address
            over = address - self.max_failures if self.max_failures > 0 else 0
            exponent = max(steps - 1, over - 1)
            delay = min(self.max_delay, self.delay * 2.0 ** min(exponent, 64))
        blocks = self.block and self.max_failures > 0 and address == self.max_failures
        return LoginFailure(delay, address, pair, blocks)

    def succeeded(self, host: str, user: str | None) -> None:
        """``user`` logged in from ``host``: forget the pair's failures (not the address's)."""
        if user is not None and self._pairs:
            self._pairs.pop((throttle_key(host), user), None)

    def failures(self, host: str, user: str | None, now: float) -> int:
        """Failures counted now for (``host``, ``user``), or for ``host`` when ``user`` is None."""
        key = throttle_key(host)
        entry = (
            self._current(self._addresses, key, now)
            if user is None
            else self._current(self._pairs, (key, user), now)
        )
        return entry.count if entry is not None else 0

    def _current(self, table: OrderedDict[_K, _Failures], key: _K, now: float) -> _Failures | None:
        entry = table.get(key)
        if entry is not None and now - entry.last >= self.block_time:
            del table[key]
            return None
        return entry

    def _count(self, table: OrderedDict[_K, _Failures], key: _K, now: float) -> int:
        entry = table.pop(key, None)
        if entry is None or now - entry.last >= self.block_time:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        table[key] = entry  # most recent last
        while len(table) > self.max_entries:
            table.popitem(last=False)
        return entry.count

    def __len__(self) -> int:
        return len(self._addresses)


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
        "max_total",
        "per_ip",
        "per_user",
        "store",
        "throttle",
    )

    def __init__(
        self, settings: LimitSettings | None = None, store: LimitStore | None = None
    ) -> None:
        self.store = store
        """The shared store sessions are also counted in (``socksd.limitstore``); None: the
        limits are this process's own (``limits_store = "local"``)."""
        self.per_ip = SessionCounts()
        self.per_user = SessionCounts()
        self.throttle = LoginThrottle()
        self.max_per_ip = 0
        self.max_per_user = 0
        self.max_total = 0
        """``max_sessions``, checked in the shared store over every process that shares it."""
        self._rates: dict[str, int] = {}
        self._default_rate = 0
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        if settings is not None:
            self.configure(settings, 0.0)

    def configure(self, settings: LimitSettings, now: float) -> None:
        """Take new settings (a reload); counters and buckets of current users stay."""
        self.max_total = settings.max_sessions
        self.max_per_ip = settings.max_sessions_per_ip
        self.max_per_user = settings.max_sessions_per_user
        self.throttle.max_failures = settings.max_auth_failures
        self.throttle.block_time = settings.auth_block_time
        self.throttle.delay = settings.auth_delay
        self.throttle.max_delay = settings.effective_max_auth_delay
        self.throttle.max_checks = settings.max_auth_checks_per_ip
        self.throttle.block = settings.auth_block
        self._rates, self._default_rate = bandwidth_rates(settings.bandwidth, settings.groups)
        for user, buckets in list(self._buckets.items()):
            rate = self.shared_rate(user)
            for bucket in buckets:  # running sessions keep their buckets: lift or change them
                bucket.set_rate(rate or LIFTED_RATE, now)
            if not rate:
                del self._buckets[user]

    def rate_for(self, user: str | None) -> int:
        """The bandwidth limit of ``user`` in bytes/s; 0 when unlimited."""
        if user is None:
            return 0
        return self._rates.get(user, self._default_rate)

    def shared_rate(self, user: str | None) -> float:
        """This process's part of ``user``'s rate (0: unlimited): all of it without a store or
        when the store cannot say, else ``rate * local / total`` (sessions here, everywhere)."""
        rate = self.rate_for(user)
        if not rate or self.store is None or user is None:
            return rate
        local = self.per_user[user]
        total = self.store.total("user", user)
        if not local or total is None or total <= local:
            return rate
        return rate * local / total

    def share(self, user: str, now: float) -> None:
        """Give ``user``'s buckets this process's part of the rate now (a session of the user
        began or ended here, or the totals were refreshed)."""
        buckets = self._buckets.get(user)
        if buckets is None:
            return
        rate = self.shared_rate(user)
        if rate and abs(rate - buckets[0].rate) > buckets[0].rate / 100:
            for bucket in buckets:
                bucket.set_rate(rate, now)

    def shared_users(self) -> list[str]:
        """The users whose rate is shared now: with buckets and sessions here (``share``)."""
        return [user for user in self._buckets if self.per_user[user]]

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
        share = self.shared_rate(user)
        buckets = (TokenBucket(share, now), TokenBucket(share, now))
        self._buckets[user] = buckets
        return buckets

    def _prune(self, now: float) -> None:
        """Forget the buckets of users with no session whose buckets are full (no state lost)."""
        for user, buckets in list(self._buckets.items()):
            if self.per_user[user] == 0 and all(b.wait(int(b.capacity), now) == 0 for b in buckets):
                del self._buckets[user]
