"""Where the limits count when more than one process serves: the limit store (``limits_store``).

Every process keeps its own counts (``socksd.limits``) as today; a shared store adds a second
check that sees the other processes' sessions too. Three stores:

- ``local`` (the default): nothing shared, nothing added; :class:`socksd.limits.Limits` has no
  store and the accept path is exactly the single-process one (each worker and each node counts
  for itself).
- ``host``: the workers of one host share a table in shared memory (:class:`HostStore`), created
  by the supervisor before it forks. Each entry holds one count per worker, so the supervisor
  zeroes a dead worker's column when it reaps it; a POSIX record lock (``fcntl.lockf``) guards
  the table and is released by the kernel if its holder dies, so no worker can wedge the others.
  Every call is a few microseconds of work under that lock: the accept path answers at once.
- ``redis://HOST:PORT/DB``: a fleet of nodes (and their workers) share counts in Redis
  (:class:`RedisStore`). See that class for the keys, the leases and what happens when Redis is
  away.

How a session uses a store (``socksd.server.handshake.admission``): at accept the local count
and limit are checked first; a session the local check admits is then checked in the shared
store, with the address's failed-login block in the same call. A synchronous store (host)
answers at once; Redis answers within ``TIMEOUT`` (50 ms), the session's reading paused
meanwhile. A store that cannot answer (Redis down or slow, the host table full) answers
``None``: the session is admitted on the local limits. ``max_sessions``, when the admin set it
(``Config.shared_max_sessions``), is checked in the same call (the store's total of all sessions,
key ``all``, counted always), before the address's count.
``max_sessions_per_user`` is checked the same way at the request. The store's per-user counts
also share a user's ``[bandwidth]`` rate: each process gives its buckets for the user the part
``rate * (its sessions of the user) / (the shared total)`` (``socksd.limits.Limits.share``),
the total read from :meth:`LimitStore.total` (refreshed by :meth:`LimitStore.refresh` about once
a second for the users with a rate and live sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import socket
import struct
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from socksd.limits import Limits

log = logging.getLogger("socksd")

ADMIT = 1
"""Verdict: counted in the shared store."""
REFUSE = 0
"""Verdict: the shared count is at the limit (nothing counted)."""
BLOCKED = -1
"""Verdict: the address is blocked after failed logins (``auth_block``; nothing counted)."""
FULL = -2
"""Verdict: the total of all sessions is at ``max_sessions`` (nothing counted)."""

TOTAL = ("all", "")
"""The (kind, key) under which a store counts every session (``max_sessions``)."""
WANT_TOTAL = frozenset({"user"})
"""The kinds whose shared totals the Redis store's ``acquire`` answers even without a limit
(bandwidth shares)."""

Verdict = int | None
"""ADMIT, REFUSE, BLOCKED, FULL, or None: the store cannot answer now (decide on local limits)."""

READY_TIMEOUT = 2.0
"""Seconds a starting server waits at most for its store to answer before it serves (then on
local limits until the store is reached)."""

TIMEOUT = 0.05
"""Seconds a session waits at most for the Redis store's answer before local limits decide."""

LEASE = 10.0
"""Seconds a Redis node's lease lives unless renewed (every third of it): the sessions of a node
that died stop counting within this time."""

FLUSH_DELAY = 0.005
"""Seconds the Redis store gathers session ends before writing them in one round trip."""

SLOW_LIMIT = 3
"""Redis answers in a row later than ``TIMEOUT`` after which the store counts as down (a
connection error counts at once)."""

RETRY = 0.5
"""Seconds between attempts to reach Redis while it is away."""

SHARE_EVERY = 1.0
"""Seconds between refreshes of the shared bandwidth parts (:func:`refresh_shares`)."""


class LimitStore:
    """The interface every shared store offers (a base: the local store is no store at all).

    ``acquire`` counts one session of ``key`` (``kind`` "ip" or "user") if the shared total is
    below ``limit`` (0: no limit, always counted) and, for an address, if ``block_key`` is not
    blocked after ``max_failures`` failed logins within ``block_time`` (0: no block check).
    With ``total`` (not None) the session is also counted in the store's total of all sessions
    (``TOTAL``), which must be below ``total`` (0: no limit; FULL otherwise), checked first. It
    returns a verdict, or an awaitable of one for a store on the network. ``release`` gives a
    session back (never waits; ``total``: from the total too), ``failed`` counts a failed login
    of ``block_key``. ``total`` says the shared count of a key as last known (None: unknown,
    the store is down); ``refresh`` updates what ``total`` knows of some keys.
    """

    name = "local"

    def acquire(
        self,
        kind: str,
        key: str,
        limit: int,
        *,
        block_key: str | None = None,
        max_failures: int = 0,
        block_time: float = 0.0,
        total: int | None = None,
    ) -> Verdict | Awaitable[Verdict]:
        raise NotImplementedError

    def release(self, kind: str, key: str, *, total: bool = False) -> None:
        raise NotImplementedError

    def total(self, kind: str, key: str) -> int | None:
        raise NotImplementedError

    def refresh(self, kind: str, keys: list[str]) -> Awaitable[None] | None:
        """Bring what :meth:`total` knows of ``keys`` up to date (bounded); None: nothing to
        wait for (the host store reads its table at each ``total``)."""
        return None

    def failed(self, block_key: str, block_time: float) -> None:
        raise NotImplementedError

    def start(self, on_state: Callable[[bool], None] | None = None) -> None:
        """Begin background work (in the running event loop); ``on_state(up)`` on changes."""

    async def close(self) -> None:
        """Stop background work and close connections."""

    async def ready(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the store answers; whether it does."""
        return True


def open_limit_store(spec: str) -> LimitStore | None:
    """The store a ``limits_store`` value names; None for ``local``. ``host`` in a single
    process is a table with one column (the supervisor makes the real one for ``--workers``)."""
    if spec == "local":
        return None
    if spec == "host":
        return HostStore(1)
    return RedisStore(spec)


async def refresh_shares(limits: Limits, every: float = SHARE_EVERY) -> None:
    """Until cancelled: every ``every`` seconds, bring the store's totals of the users whose
    rate is shared here up to date (one call, bounded by the store) and give each user's
    buckets this process's part (``Limits.share``): sessions of the user that began or ended
    in other processes change it within ``every``."""
    store = limits.store
    assert store is not None
    while True:
        await asyncio.sleep(every)
        users = limits.shared_users()
        if not users:
            continue
        pending = store.refresh("user", users)
        if pending is not None:
            await pending
        now = time.monotonic()
        for user in users:
            limits.share(user, now)


# -- host: shared memory ----------------------------------------------------------------------

_EMPTY = 0
_TOMB = 1
_HEAD = struct.Struct("=QIId")  # key hash, failures, (pad), time of the last failure
PROBES = 32
"""Slots looked at for one key before the table counts as full (the store then says None)."""


def _key_hash(kind: str, key: str) -> int:
    digest = hashlib.blake2b(f"{kind}\0{key}".encode(errors="surrogateescape"), digest_size=8)
    value = int.from_bytes(digest.digest(), "little")
    return value if value > _TOMB else value + 2


_TOTAL_HASH = _key_hash(*TOTAL)
"""The host table's key of the total of all sessions (hashed once)."""


class HostStore(LimitStore):
    """Counts shared by the workers of one host, in a shared memory table (see the module).

    ``slots`` entries (open addressing, ``PROBES`` deep), each one count per worker for a key
    and the failed logins of an address. Made before the workers are forked; each worker then
    calls :meth:`use_column` with its index.
    """

    name = "host"

    def __init__(self, workers: int, slots: int = 16384) -> None:
        self.workers = workers
        self.slots = slots
        self._counts = struct.Struct(f"={workers}i")
        self.slot_size = _HEAD.size + self._counts.size
        self._fd = os.memfd_create("socksd-limits", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, slots * self.slot_size)
        self._map = mmap.mmap(self._fd, slots * self.slot_size)  # MAP_SHARED: seen after fork
        self.column = 0

    def start(self, on_state: Callable[[bool], None] | None = None) -> None:
        if on_state is not None:
            on_state(True)  # shared memory: always there

    def use_column(self, index: int) -> None:
        """This process counts in column ``index`` (its worker index)."""
        self.column = index

    @contextlib.contextmanager
    def _locked(self) -> Any:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _find(self, h: int, create: bool) -> int | None:
        """The offset of ``h``'s slot (a new one if ``create``); None when absent or full."""
        size, m = self.slot_size, self._map
        start = h % self.slots
        free = None
        for i in range(PROBES):
            offset = ((start + i) % self.slots) * size
            slot_hash = int.from_bytes(m[offset : offset + 8], "little")
            if slot_hash == h:
                return offset
            if slot_hash == _TOMB and free is None:
                free = offset
            elif slot_hash == _EMPTY:
                if free is None:
                    free = offset
                break
        if not create or free is None:
            return None
        _HEAD.pack_into(m, free, h, 0, 0, 0.0)
        self._counts.pack_into(m, free + _HEAD.size, *([0] * self.workers))
        return free

    def _blocked(self, block_key: str, max_failures: int, block_time: float) -> bool:
        offset = self._find(_key_hash("fail", block_key), False)
        if offset is None:
            return False
        _, failures, _, last = _HEAD.unpack_from(self._map, offset)
        if time.monotonic() - last >= block_time:  # expired: the slot is free again
            self._map[offset : offset + 8] = _TOMB.to_bytes(8, "little")
            return False
        return bool(failures >= max_failures)

    def acquire(
        self,
        kind: str,
        key: str,
        limit: int,
        *,
        block_key: str | None = None,
        max_failures: int = 0,
        block_time: float = 0.0,
        total: int | None = None,
    ) -> Verdict:
        with self._locked():
            blocking = block_key is not None and max_failures > 0
            if blocking and self._blocked(str(block_key), max_failures, block_time):
                return BLOCKED
            all_at = None
            if total is not None:
                all_at = self._find(_TOTAL_HASH, True)
                if all_at is None:
                    return None
                all_counts = list(self._counts.unpack_from(self._map, all_at + _HEAD.size))
                if total and sum(all_counts) >= total:
                    return FULL
            offset = self._find(_key_hash(kind, key), True)
            if offset is None:
                return None
            counts = list(self._counts.unpack_from(self._map, offset + _HEAD.size))
            if limit and sum(counts) >= limit:
                return REFUSE
            counts[self.column] += 1
            self._counts.pack_into(self._map, offset + _HEAD.size, *counts)
            if all_at is not None:
                all_counts[self.column] += 1
                self._counts.pack_into(self._map, all_at + _HEAD.size, *all_counts)
            return ADMIT

    def release(self, kind: str, key: str, *, total: bool = False) -> None:
        with self._locked():
            self._release(_key_hash(kind, key))
            if total:
                self._release(_TOTAL_HASH)

    def _release(self, h: int) -> None:
        offset = self._find(h, False)
        if offset is None:
            return
        counts = list(self._counts.unpack_from(self._map, offset + _HEAD.size))
        counts[self.column] = max(0, counts[self.column] - 1)
        self._counts.pack_into(self._map, offset + _HEAD.size, *counts)
        if not any(counts):
            self._map[offset : offset + 8] = _TOMB.to_bytes(8, "little")

    def failed(self, block_key: str, block_time: float) -> None:
        now = time.monotonic()
        with self._locked():
            offset = self._find(_key_hash("fail", block_key), True)
            if offset is None:
                return
            h, failures, _, last = _HEAD.unpack_from(self._map, offset)
            if now - last >= block_time:
                failures = 0
            _HEAD.pack_into(self._map, offset, h, failures + 1, 0, now)

    def total(self, kind: str, key: str) -> int:
        """The shared count of ``key`` (all workers)."""
        with self._locked():
            offset = self._find(_key_hash(kind, key), False)
            if offset is None:
                return 0
            return sum(self._counts.unpack_from(self._map, offset + _HEAD.size))

    def failures(self, block_key: str) -> int:
        """Failed logins counted for ``block_key`` (expired or not)."""
        with self._locked():
            offset = self._find(_key_hash("fail", block_key), False)
            return 0 if offset is None else int(_HEAD.unpack_from(self._map, offset)[1])

    def forget_column(self, index: int) -> None:
        """Worker ``index`` died: its sessions stop counting (called by the supervisor)."""
        size, m = self.slot_size, self._map
        at = _HEAD.size + 4 * index
        with self._locked():
            for slot in range(self.slots):
                offset = slot * size
                if int.from_bytes(m[offset : offset + 8], "little") > _TOMB:
                    m[offset + at : offset + at + 4] = b"\0\0\0\0"


# -- Redis ------------------------------------------------------------------------------------

# The live total of a count hash: the counts of live nodes (their lease key exists), dropping
# dead nodes' fields.
_LIVE = """
local function live(key, leases)
  local total = 0
  local h = redis.call('HGETALL', key)
  for i = 1, #h, 2 do
    if redis.call('EXISTS', leases .. h[i]) == 1 then
      total = total + tonumber(h[i + 1])
    else
      redis.call('HDEL', key, h[i])
    end
  end
  return total
end
"""

# KEYS[1]: the count hash of a key; KEYS[2]: the failure counter of the address (or "");
# KEYS[3]: the total of all sessions (or "": not counted).
# ARGV: node, limit, lease key prefix, max_failures (0: no block check), hash ttl (ms),
# limit of the total (0: none), whether to answer the key's total (1) even without a limit.
# Answers {verdict, the key's live total after this session (0 unless a limit or ARGV[7])}.
_ACQUIRE = (
    _LIVE
    + """
local maxf = tonumber(ARGV[4])
if maxf > 0 then
  local f = tonumber(redis.call('GET', KEYS[2]) or '0')
  if f >= maxf then return {-1, 0} end
end
local all = KEYS[3] ~= ''
local most = tonumber(ARGV[6])
if all and most > 0 and live(KEYS[3], ARGV[3]) >= most then return {-2, 0} end
local limit = tonumber(ARGV[2])
local total = 0
if limit > 0 or ARGV[7] == '1' then
  total = live(KEYS[1], ARGV[3])
  if limit > 0 and total >= limit then return {0, total} end
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if all then
  redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return {1, total + 1}
"""
)

# KEYS: count hashes; ARGV[1]: lease key prefix. Answers their live totals.
_TOTALS = (
    _LIVE
    + """
local out = {}
for i = 1, #KEYS do out[i] = live(KEYS[i], ARGV[1]) end
return out
"""
)

# KEYS[1]: a count hash; ARGV: node, delta, hash ttl (ms).
_ADD = """
local v = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return v
"""

# KEYS[1]: a count hash; ARGV: node, count (absolute), hash ttl (ms).
_SET = """
if tonumber(ARGV[2]) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]); redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS[1]: an address's failure counter; ARGV: its lifetime (ms).
_FAILED = """
local v = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v
"""


def split_lease(url: str) -> tuple[str, float]:
    """``url`` without its ``lease=SECONDS`` query parameter, and that lease (``LEASE`` if
    none); ValueError when it is not a positive number."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    lease = LEASE
    rest = []
    for name, value in query:
        if name == "lease":
            lease = float(value)
            if not lease > 0:
                raise ValueError(f"lease={value}: expected a positive number of seconds")
        else:
            rest.append((name, value))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(rest))), lease


def without_password(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: how a store's URL is logged."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


CLUSTER_UNSUPPORTED = (
    "a Redis Cluster node: not supported (the counting script reads keys it learns as it runs, "
    "which a Cluster may keep on other nodes); use a standalone Redis"
)


def is_cluster(info: dict[str, Any]) -> bool:
    """Whether Redis's ``INFO cluster`` answer says it runs in Cluster mode."""
    return str(info.get("cluster_enabled", 0)) == "1"


class RedisStore(LimitStore):
    """Counts shared by a fleet, in Redis (``redis://HOST:PORT/DB``; the ``redis`` package).

    Keys (prefix ``socksd:``): ``n:KIND:KEY`` a hash of this key's open sessions per node;
    ``lease:NODE`` exists while node ``NODE`` (one serving process) lives, renewed every
    ``LEASE``/3; ``f:ADDRESS`` the failed logins of an address, expiring ``auth_block_time``
    after the last. A session is counted by a Lua script that sums the fields of live nodes
    (dropping dead nodes' fields) and increments this node's field only below the limit: the
    check and the increment are one atomic step, so N processes admit exactly the limit.
    Session ends are gathered for ``FLUSH_DELAY`` and written in one round trip.

    ``?lease=SECONDS`` in the URL sets the lease (default ``LEASE``).

    This node's own counts are also kept here (``held``). When Redis does not answer within
    ``TIMEOUT`` (or at all), the store goes down: one warning, ``on_state(False)``, and every
    session is admitted on local limits without waiting, counted in ``held`` only. A background
    task retries every ``RETRY`` seconds; once Redis answers it renews the lease and writes this
    node's counts again (absolute values: Redis may have restarted empty), then the store is up
    again. An answer later than ``TIMEOUT`` lets the local limits decide that session;
    ``SLOW_LIMIT`` in a row count as down. Failed logins counted while it is down stay local.
    Each lease renewal writes this node's counts again (absolute), so a count that drifted (an
    answer that came after its timeout) is right again within ``LEASE``/3; hashes expire
    ``3 * LEASE`` after their last write.
    """

    name = "redis"

    def __init__(self, url: str, *, lease: float | None = None, timeout: float = TIMEOUT) -> None:
        self.url, url_lease = split_lease(url)
        self.shown = without_password(self.url)
        """The URL as logs show it (no password)."""
        self.lease = lease or url_lease
        self.timeout = timeout
        self.node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.prefix = "socksd:"
        self._total_key = self._hash_key(*TOTAL)
        self.held: dict[str, int] = {}
        """This node's open sessions per count hash key."""
        self.totals: dict[str, int] = {}
        """The fleet's total of a count hash key as last answered (``WANT_TOTAL`` kinds only)."""
        self.up = False
        self._deltas: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._on_state: Callable[[bool], None] | None = None
        self._warned = False
        self._slow = 0
        """Answers in a row that came later than ``timeout`` (``SLOW_LIMIT`` of them: down)."""
        self._pending: set[asyncio.Task[Any]] = set()

    @property
    def lease_key(self) -> str:
        return f"{self.prefix}lease:{self.node}"

    def _hash_key(self, kind: str, key: str) -> str:
        return f"{self.prefix}n:{kind}:{key}"

    def start(self, on_state: Callable[[bool], None] | None = None) -> None:
        import redis.asyncio as aioredis

        self._on_state = on_state
        self._client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
            health_check_interval=0,
        )
        for name, text in (
            ("acquire", _ACQUIRE),
            ("add", _ADD),
            ("set", _SET),
            ("totals", _TOTALS),
            ("failed", _FAILED),
        ):
            self._scripts[name] = self._client.register_script(text)
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def ready(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.up and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self.up

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.delete(self.lease_key), self.timeout * 4)
            with contextlib.suppress(Exception):
                await self._client.aclose()

    def _down(self, error: BaseException) -> None:
        if self.up or not self._warned:
            self._warned = True
            log.warning(
                "limits store %s unreachable (%s): admitting on local limits until it is back",
                self.shown,
                str(error) or type(error).__name__,
            )
            if self._on_state is not None:
                self._on_state(False)
        self.up = False
        self._dirty.update(self._deltas)
        self._deltas.clear()
        if self._wake is not None:
            self._wake.set()

    def acquire(
        self,
        kind: str,
        key: str,
        limit: int,
        *,
        block_key: str | None = None,
        max_failures: int = 0,
        block_time: float = 0.0,
        total: int | None = None,
    ) -> Verdict | Awaitable[Verdict]:
        hkey = self._hash_key(kind, key)
        akey = self._total_key if total is not None else ""
        if not self.up:
            for counted in (hkey, akey) if akey else (hkey,):
                self.held[counted] = self.held.get(counted, 0) + 1
                self._dirty.add(counted)
            return None
        return self._acquire(
            hkey,
            akey,
            limit=limit,
            most=total or 0,
            want_total=kind in WANT_TOTAL,
            block_key=block_key,
            max_failures=max_failures,
        )

    async def _acquire(
        self,
        hkey: str,
        akey: str,
        *,
        limit: int,
        most: int,
        want_total: bool,
        block_key: str | None,
        max_failures: int,
    ) -> Verdict:
        fkey = f"{self.prefix}f:{block_key}" if block_key is not None and max_failures else ""
        args = (self.node, limit, f"{self.prefix}lease:", max_failures if fkey else 0)
        counted = (hkey, akey) if akey else (hkey,)
        try:
            answer = await asyncio.wait_for(
                self._scripts["acquire"](
                    keys=[hkey, fkey or hkey, akey],
                    args=[*args, int(self.lease * 3000), most, int(want_total)],
                ),
                self.timeout,
            )
            verdict, total = int(answer[0]), int(answer[1])
        except Exception as e:  # local limits decide
            # The script may have run: this node's counts are written again (absolute).
            for k in counted:
                self.held[k] = self.held.get(k, 0) + 1
                self._dirty.add(k)
            self._slow = slow = self._slow + 1 if isinstance(e, TimeoutError) else SLOW_LIMIT
            if slow >= SLOW_LIMIT:
                self._down(e)
            elif self._wake is not None:
                self._wake.set()
            return None
        self._slow = 0
        if want_total and total:
            self.totals[hkey] = total
        if verdict == ADMIT:
            for k in counted:
                self.held[k] = self.held.get(k, 0) + 1
        return verdict

    def release(self, kind: str, key: str, *, total: bool = False) -> None:
        self._release(self._hash_key(kind, key))
        if total:
            self._release(self._total_key)
        if self._wake is not None:
            self._wake.set()

    def _release(self, hkey: str) -> None:
        count = self.held.get(hkey, 0) - 1
        if count > 0:
            self.held[hkey] = count
        else:
            self.held.pop(hkey, None)
        known = self.totals.get(hkey)
        if known is not None:  # this node's end is in the total at once (written within 5 ms)
            if count > 0:
                self.totals[hkey] = max(count, known - 1)
            else:
                del self.totals[hkey]
        if self.up:
            self._deltas[hkey] = self._deltas.get(hkey, 0) - 1
        else:
            self._dirty.add(hkey)

    def total(self, kind: str, key: str) -> int | None:
        """The fleet's count of ``key`` as last answered (None: not known, or the store is down)."""
        if not self.up:
            return None
        return self.totals.get(self._hash_key(kind, key))

    def refresh(self, kind: str, keys: list[str]) -> Awaitable[None] | None:
        if not self.up or not keys:
            return None
        return self._refresh([self._hash_key(kind, key) for key in keys])

    async def _refresh(self, hkeys: list[str]) -> None:
        """One round trip for all of ``hkeys``, bounded by ``timeout`` (a late answer is
        dropped: the totals known stay)."""
        try:
            answer = await asyncio.wait_for(
                self._scripts["totals"](keys=hkeys, args=[f"{self.prefix}lease:"]), self.timeout
            )
        except Exception as e:
            if not isinstance(e, TimeoutError):
                self._down(e)
            return
        for hkey, total in zip(hkeys, answer, strict=True):
            if int(total) > 0:
                self.totals[hkey] = int(total)
            else:
                self.totals.pop(hkey, None)

    def failed(self, block_key: str, block_time: float) -> None:
        if not self.up or self._client is None:
            return
        task = asyncio.get_running_loop().create_task(self._failed(block_key, block_time))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _failed(self, block_key: str, block_time: float) -> None:
        try:
            await asyncio.wait_for(
                self._scripts["failed"](
                    keys=[f"{self.prefix}f:{block_key}"], args=[max(1, int(block_time * 1000))]
                ),
                self.timeout * 4,
            )
        except Exception as e:
            self._down(e)

    async def _run(self) -> None:
        assert self._wake is not None
        renew_every = self.lease / 3
        next_renew = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if not self.up:
                try:
                    await self._reconnect()
                except Exception as e:
                    self._down(e)
                    await asyncio.sleep(RETRY)
                    continue
                next_renew = loop.time() + renew_every
                continue
            if not self._deltas and not self._dirty:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0, next_renew - loop.time()))
            self._wake.clear()
            try:
                if self._deltas or self._dirty:
                    await asyncio.sleep(FLUSH_DELAY)  # gather the ends that come meanwhile
                    await self._flush()
                if loop.time() >= next_renew:
                    await self._renew()
                    next_renew = loop.time() + renew_every
            except Exception as e:
                self._down(e)

    async def _flush(self) -> None:
        deltas, self._deltas = self._deltas, {}
        dirty, self._dirty = self._dirty, set()
        ttl = int(self.lease * 3000)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for hkey in dirty:
                    await self._scripts["set"](
                        keys=[hkey], args=[self.node, self.held.get(hkey, 0), ttl], client=pipe
                    )
                for hkey, delta in deltas.items():
                    if hkey not in dirty and delta:
                        await self._scripts["add"](
                            keys=[hkey], args=[self.node, delta, ttl], client=pipe
                        )
                await asyncio.wait_for(pipe.execute(), 1.0)
        except BaseException:
            self._dirty |= dirty | set(deltas)  # written again, as absolute counts
            raise

    async def _renew(self) -> None:
        ms = int(self.lease * 1000)
        alive = await asyncio.wait_for(self._client.pexpire(self.lease_key, ms), 1.0)
        if not alive:  # Redis restarted, or this node was away longer than its lease
            await self._reconnect()
            return
        self._dirty |= set(self.held)  # counts written again: their keys live on, drift ends
        await self._flush()

    async def _reconnect(self) -> None:
        """Take the lease and write all of this node's counts (absolute), then go up (never
        with a Redis Cluster: see ``CLUSTER_UNSUPPORTED``)."""
        if is_cluster(await asyncio.wait_for(self._client.info("cluster"), 1.0)):
            raise RuntimeError(CLUSTER_UNSUPPORTED)
        await asyncio.wait_for(
            self._client.set(self.lease_key, "1", px=int(self.lease * 1000)), 1.0
        )
        self._dirty |= set(self.held)
        await self._flush()
        was_down = self._warned and not self.up
        self.up = True
        if was_down:
            log.warning("limits store %s is back: sharing counts again", self.shown)
        if self._on_state is not None:
            self._on_state(True)
