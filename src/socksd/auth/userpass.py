# RFC 1929 username/password checking against an htpasswd user file (``socksd.auth.htpasswd``).
#
# The RFC's fields are opaque bytes, so the exact bytes sent are compared: the user name must be
# UTF-8 and equal a name in the file, the password goes to bcrypt unchanged. A password bcrypt
# cannot take whole (a NUL byte, more than 72 bytes) fails at once instead of being cut, so
# ``password\0junk`` is never ``password``. Those checks do not depend on the user name.
#
# bcrypt costs tens to hundreds of milliseconds of CPU by design, so it never runs on the event
# loop: checks go to a small dedicated thread pool (bcrypt releases the GIL), and a semaphore
# bounds how many are submitted at once, so a flood of logins cannot grow the pool's queue without
# bound; the coroutines waiting for a slot are bounded by the listener's connection limit and
# handshake timeout. An unknown name still costs one bcrypt check against a dummy hash of the
# users' usual cost, so response time does not tell which names exist.
#
# A successful check is cached per user as HMAC-SHA256(per-instance random key, password) next
# to the stored hash it was checked against. A later login with the same password matches the
# HMAC (constant-time compare) and skips bcrypt, as long as the user's stored hash is unchanged:
# after a reload that changes or removes the user, the entry no longer matches. The key never
# leaves the process and the plaintext password is never stored; failures are never cached.
# ``cached()`` answers that check alone, without the pool, so the session can let a verified
# login in before any failed-login throttling of its address applies.
#
# Identical logins arriving while one is being checked (a client opening many connections at
# once) share that check instead of queuing their own (``checking()`` tells the session so, and
# it does not count them against the address's in-flight checks): one bcrypt check per distinct
# login in flight.

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import secrets
from collections import Counter, OrderedDict

import bcrypt

from socksd.auth.htpasswd import DEFAULT_ROUNDS, MAX_PASSWORD_BYTES, UserFile

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


class UserPassAuthenticator:
    """Checks RFC 1929 credentials against a UserFile, off the event loop, with a safe cache."""

    def __init__(
        self,
        users: UserFile,
        *,
        executor: concurrent.futures.Executor | None = None,
        cache_size: int = 10000,
        max_pending: int = 64,
    ) -> None:
        """Use ``users`` (a snapshot is taken); bcrypt runs on ``executor`` or 2 own threads."""
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="socksd-bcrypt"
        )
        self._slots = asyncio.Semaphore(max_pending)
        self._key = secrets.token_bytes(32)
        self._cache_size = cache_size
        # user name -> (stored hash checked against, HMAC of the password that matched it)
        self._cache: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()
        # keyed hash of (user name, password) -> the check in flight for that login
        self._pending: dict[bytes, asyncio.Future[bool]] = {}
        self._users: dict[str, bytes] = {}
        self._dummy = b""
        self.replace_users(users)

    def replace_users(self, users: UserFile) -> None:
        """Switch to a new user set (live reload); cache entries of changed users stop matching."""
        self._users = dict(users.users)
        self._dummy = _dummy_hash(self._users)
        # Matching would fail anyway; dropping stale entries just frees their memory.
        for name, (hashed, _) in list(self._cache.items()):
            if self._users.get(name) != hashed:
                del self._cache[name]

    def cached(self, username: bytes, password: bytes) -> bool:
        """True if the login matches one verified before (no bcrypt: answered at once)."""
        if len(password) > MAX_PASSWORD_BYTES or b"\0" in password:
            return False
        name, hashed = self._lookup(username)
        return name is not None and hashed is not None and self._cache_hit(name, hashed, password)

    def checking(self, username: bytes, password: bytes) -> bool:
        """True if the same login is being checked now: ``verify`` shares that check's result."""
        return bool(self._pending) and self._pending_key(username, password) in self._pending

    async def verify(self, username: bytes, password: bytes) -> bool:
        """True if ``username``/``password`` (raw RFC 1929 fields) are a valid login."""
        if len(password) > MAX_PASSWORD_BYTES or b"\0" in password:
            return False
        name, hashed = self._lookup(username)
        if name is not None and hashed is not None and self._cache_hit(name, hashed, password):
            return True
        key = self._pending_key(username, password)
        task = self._pending.get(key)
        if task is None:
            task = asyncio.ensure_future(self._verify(name, hashed, password))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # shielded: a caller that goes away leaves the check to those sharing it
        return await asyncio.shield(task)

    def _pending_key(self, username: bytes, password: bytes) -> bytes:
        """A keyed hash of the login (no plaintext kept for the checks in flight)."""
        login = len(username).to_bytes(2, "big") + username + password
        return hmac.new(self._key, login, hashlib.sha256).digest()

    async def _verify(self, name: str | None, hashed: bytes | None, password: bytes) -> bool:
        """One bcrypt check (against the dummy hash for an unknown user); caches a success."""
        if name is None or hashed is None:
            await self._check(password, self._dummy)
            return False
        mac = hmac.new(self._key, password, hashlib.sha256).digest()
        if not await self._check(password, hashed):
            return False
        if self._cache_size:
            self._cache[name] = (hashed, mac)
            self._cache.move_to_end(name)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return True

    def _lookup(self, username: bytes) -> tuple[str | None, bytes | None]:
        """The user's name and stored hash; (None, None) for a name that is not UTF-8."""
        try:
            name = username.decode("utf-8")
        except UnicodeDecodeError:
            return None, None
        return name, self._users.get(name)

    def _cache_hit(self, name: str, hashed: bytes, password: bytes) -> bool:
        """True when ``password`` is the one last verified against ``hashed`` for ``name``."""
        cached = self._cache.get(name)
        if cached is None or cached[0] != hashed:
            return False
        mac = hmac.new(self._key, password, hashlib.sha256).digest()
        if not hmac.compare_digest(cached[1], mac):
            return False
        self._cache.move_to_end(name)
        return True

    async def _check(self, password: bytes, hashed: bytes) -> bool:
        """Run one bcrypt check on the executor, at most ``max_pending`` submitted at a time."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, _checkpw, password, hashed)

    def close(self) -> None:
        """Shut down the thread pool if this authenticator created it."""
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
