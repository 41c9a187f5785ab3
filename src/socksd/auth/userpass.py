# RFC 1929 username/password checking (and HTTP Basic, through the same login path:
# ``socksd.server.handshake.login``) against a user store (``socksd.auth.stores``): an htpasswd
# file (bcrypt, ``HtpasswdStore`` below), PAM (``socksd.auth.pam``) or LDAP (``socksd.auth.ldap``).
#
# The RFC's fields are opaque bytes, so the exact bytes sent are checked. The store first says
# which logins fail at once, without a check (``refuse``): for htpasswd, a password bcrypt cannot
# take whole (a NUL byte, more than 72 bytes) instead of being cut, so ``password\0junk`` is never
# ``password``. Those checks do not depend on the user name.
#
# Checks block (bcrypt costs tens to hundreds of milliseconds of CPU by design; a PAM module may
# wait on a file, a helper process or the network), so they never run on the event loop: they go
# to a small pool of the store's threads (``CheckPool``), and a semaphore bounds how many are
# submitted at once, so a flood of logins cannot grow the pool's queue without bound; the
# coroutines waiting for a slot are bounded by the listener's connection limit and handshake
# timeout. A store may give a timeout (PAM, LDAP). A blocking call cannot be interrupted, so a
# slot is released when its thread returns, not when its caller stops waiting: checks that hang
# keep their threads and slots, and new checks wait for a slot (within their timeout) instead of
# queuing behind them without bound. The pool's threads are daemon threads, so a hung check does
# not hold up the process's exit.
#
# A check not answered within the store's timeout is answered "the store is unavailable" (a
# ``CheckResult`` with ``unavailable`` set, as a store answers itself when its directory is down), and
# so is a check that raises (a bug, a surprise of a client library): neither says anything of the
# password, and the login path refuses such a login without counting it as a failed login.
#
# An unknown htpasswd user still costs one bcrypt check against a dummy hash of the users' usual
# cost, so response time does not tell which names exist.
#
# A successful check is cached per user as HMAC-SHA256(per-instance random key, password) next
# to the store's token for the user (htpasswd: the stored hash; PAM: the service) and the time of
# the check, with the user's directory groups (LDAP) the check found: a cached login brings the
# same groups to the rules for the cache's lifetime. A later login with the same password matches the HMAC (constant-time compare) and
# skips the check while the token is unchanged and the check is younger than the store's cache
# lifetime: for htpasswd unlimited, since a reload that changes or removes the user changes the
# token; for PAM ``users_cache_ttl``, since PAM cannot say that a password changed. The key never
# leaves the process and the plaintext password is never stored; failures are never cached.
# ``cached()`` answers that check alone, without the pool, so the session can let a verified
# login in before any failed-login throttling of its address applies.
#
# Identical logins arriving while one is being checked (a client opening many connections at
# once) share that check instead of queuing their own (``checking()`` tells the session so, and
# it does not count them against the address's in-flight checks): one check per distinct login
# in flight.

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import bcrypt

from socksd.auth.htpasswd import DEFAULT_ROUNDS, MAX_PASSWORD_BYTES, UserFile
from socksd.auth.stores import RIGHT, WRONG, CheckResult, unavailable

if TYPE_CHECKING:
    from socksd.auth.stores import UserStore

log = logging.getLogger("socksd.auth")

P = ParamSpec("P")
T = TypeVar("T")

# A well-formed bcrypt hash of a random password; its cost digits are replaced as needed.
_DUMMY_TAIL = b"$4bhBD7fzc3F.dy.t/B.u0..T0phnFFvGsL3CTsAKp1lm6HkwdvkRO"


def _dummy_hash(users: dict[str, bytes]) -> bytes:
    """A hash no password matches, with the cost most of ``users`` have."""
    costs = Counter(int(hashed[4:6]) for hashed in users.values())
    cost = costs.most_common(1)[0][0] if costs else DEFAULT_ROUNDS
    return b"$2y$%02d" % cost + _DUMMY_TAIL


def _checkpw(password: bytes, hashed: bytes) -> bool:
    """bcrypt check that answers False instead of raising (runs in a worker thread)."""
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False


class HtpasswdStore:
    """The users of an htpasswd file (a snapshot of ``users``), checked with bcrypt."""

    kind = "htpasswd"
    threads = 2
    timeout: float | None = None
    cache_ttl: float = math.inf

    def __init__(self, users: UserFile, source: str = "<user file>") -> None:
        self.users = dict(users.users)
        self.source = source
        self._dummy = _dummy_hash(self.users)

    def describe(self) -> str:
        """``N users in PATH``."""
        return f"{len(self.users)} users in {self.source}"

    def refuse(self, username: bytes, password: bytes) -> bool:
        """A password bcrypt cannot take whole: a NUL byte, more than 72 bytes."""
        return len(password) > MAX_PASSWORD_BYTES or b"\0" in password

    def token(self, name: str | None) -> bytes | None:
        """The user's stored hash."""
        return None if name is None else self.users.get(name)

    def check(
        self, name: str | None, token: bytes | None, password: bytes, client: str | None
    ) -> CheckResult:
        """bcrypt against ``token`` (the dummy hash for an unknown user: the same cost)."""
        if token is None:
            _checkpw(password, self._dummy)
            return WRONG
        return RIGHT if _checkpw(password, token) else WRONG

    def close(self) -> None:
        """Nothing held open."""


class CheckPool(concurrent.futures.Executor):
    """``threads`` daemon threads running the calls submitted, in order.

    ``ThreadPoolExecutor`` joins its threads at interpreter exit, so one call that never returns
    (a PAM module waiting on a dead server) would hold the process up; daemon threads do not.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[[], Any]] | None
        ] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
            for n in range(threads)
        ]
        self._started = False  # on the first call, as ThreadPoolExecutor does

    def submit(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Run ``fn(*args, **kwargs)`` on one of the threads."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((future, lambda: fn(*args, **kwargs)))
        if not self._started:
            self._started = True
            for thread in self._threads:
                thread.start()
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the threads once the calls submitted are done (cancelled, if asked)."""
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        if not self._started:
            return
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class UserPassAuthenticator:
    """Checks username/password logins against a user store, off the event loop, with a safe
    cache."""

    def __init__(
        self,
        users: UserStore,
        *,
        executor: concurrent.futures.Executor | None = None,
        cache_size: int = 10000,
        max_pending: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Check logins against ``users``; checks run on ``executor`` or the store's number of own
        threads. ``clock`` times the cache lifetime."""
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._own_executor = executor is None
        self._executor = executor or CheckPool(users.threads, f"socksd-{users.kind}")
        self._slots = asyncio.Semaphore(max_pending)
        self._key = secrets.token_bytes(32)
        self._cache_size = cache_size
        self._clock = clock
        # user name -> (token checked against, HMAC of the password that matched, time of the
        # check, its verdict: right, with the user's groups)
        self._cache: OrderedDict[str, tuple[bytes, bytes, float, CheckResult]] = OrderedDict()
        # keyed hash of (user name, password) -> the check in flight for that login
        self._pending: dict[bytes, asyncio.Future[CheckResult]] = {}
        self._store = users

    @property
    def kind(self) -> str:
        """The kind of store this authenticator checks against (its pool is sized for it)."""
        return self._store.kind

    def fits(self, users: UserStore) -> bool:
        """True if ``users`` can replace the store (``replace_users``): the same kind, and the
        same number of threads as the pool was made for."""
        return users.kind == self._store.kind and users.threads == self._store.threads

    def describe(self) -> str:
        """The store checked against, for log lines."""
        return self._store.describe()

    def replace_users(self, users: UserStore) -> UserStore:
        """Switch to a new store of the same kind (live reload); cache entries whose token changed
        stop matching. Returns the store replaced (close it once checks in flight are done)."""
        old, self._store = self._store, users
        # Matching would fail anyway; dropping stale entries just frees their memory.
        for name, (token, *_) in list(self._cache.items()):
            if users.token(name) != token:
                del self._cache[name]
        return old

    def cached(self, username: bytes, password: bytes) -> CheckResult | None:
        """The verdict of a login that matches one verified before (no check: answered at
        once), with the groups found then; None if it does not."""
        if self._store.refuse(username, password):
            return None
        name, token = self._lookup(username)
        if name is None or token is None:
            return None
        return self._cache_hit(name, token, password)

    def checking(self, username: bytes, password: bytes) -> bool:
        """True if the same login is being checked now: ``verify`` shares that check's result."""
        return bool(self._pending) and self._pending_key(username, password) in self._pending

    async def verify(
        self, username: bytes, password: bytes, client: str | None = None
    ) -> CheckResult:
        """Whether ``username``/``password`` (raw RFC 1929 fields) are a valid login, asked from
        ``client`` (its address; a check shared by identical logins has the first one's)."""
        store = self._store
        if store.refuse(username, password):
            return WRONG
        name, token = self._lookup(username)
        if name is not None and token is not None:
            hit = self._cache_hit(name, token, password)
            if hit is not None:
                return hit
        key = self._pending_key(username, password)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._verify(store, name, token, password, client))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # shielded: a caller that goes away leaves the check to those sharing it
        return await asyncio.shield(task)

    def _lookup(self, username: bytes) -> tuple[str | None, bytes | None]:
        """The user name (None: not UTF-8) and what a verified login of it is cached against."""
        name = _name(username)
        return name, self._store.token(name)

    def _pending_key(self, username: bytes, password: bytes) -> bytes:
        """A keyed hash of the login (no plaintext kept for the checks in flight)."""
        login = len(username).to_bytes(2, "big") + username + password
        return hmac.new(self._key, login, hashlib.sha256).digest()

    async def _verify(
        self,
        store: UserStore,
        name: str | None,
        token: bytes | None,
        password: bytes,
        client: str | None,
    ) -> CheckResult:
        """One check by ``store``; caches a success."""
        verdict = await self._check(store, name, token, password, client)
        if verdict.ok and self._cache_size and name is not None and token is not None:
            mac = hmac.new(self._key, password, hashlib.sha256).digest()
            self._cache[name] = (token, mac, self._clock(), verdict)
            self._cache.move_to_end(name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return verdict

    def _cache_hit(self, name: str, token: bytes, password: bytes) -> CheckResult | None:
        """The verdict (right, with its groups) when ``password`` is the one last verified
        against ``token`` for ``name``, less than the store's cache lifetime ago; else None."""
        cached = self._cache.get(name)
        if cached is None or cached[0] != token:
            return None
        if not self._clock() - cached[2] < self._store.cache_ttl:
            del self._cache[name]  # expired: the next login is checked again
            return None
        mac = hmac.new(self._key, password, hashlib.sha256).digest()
        if not hmac.compare_digest(cached[1], mac):
            return None
        self._cache.move_to_end(name)
        return cached[3]

    async def _check(
        self,
        store: UserStore,
        name: str | None,
        token: bytes | None,
        password: bytes,
        client: str | None,
    ) -> CheckResult:
        """Run one check on the executor, at most ``max_pending`` submitted at a time, within
        the store's timeout; a check that raises or times out is the store unavailable."""
        try:
            async with asyncio.timeout(store.timeout):
                await self._slots.acquire()
                try:
                    future = self._executor.submit(store.check, name, token, password, client)
                except BaseException:
                    self._slots.release()
                    raise
                # the slot is the thread's until the check returns, even if nobody waits for it
                loop = asyncio.get_running_loop()
                future.add_done_callback(lambda _: _release(loop, self._slots))
                return await asyncio.wrap_future(future)
        except TimeoutError:
            return unavailable(f"no answer within {store.timeout:g}s")
        except Exception as e:
            log.exception("%s: the check of user %r failed", store.describe(), name)
            return unavailable(f"the check failed: {e!r}")

    def close(self) -> None:
        """Close the store; shut down the thread pool if this authenticator created it."""
        self._store.close()
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _name(username: bytes) -> str | None:
    """The user name as text; None when it is not UTF-8."""
    try:
        return username.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _release(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore) -> None:
    """Give a check's slot back, from whichever thread it ended on."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for slots any more
        loop.call_soon_threadsafe(slots.release)
