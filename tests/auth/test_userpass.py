"""Tests of RFC 1929 credential checking."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import bcrypt
import pytest

from socksd.auth.htpasswd import UserFile
from socksd.auth.userpass import HtpasswdStore, UserPassAuthenticator

FAST = 4  # bcrypt cost for tests
LONG = b"L" * 72


def make_users(**passwords: bytes) -> UserFile:
    users = UserFile()
    for name, password in passwords.items():
        users.add(name, password, rounds=FAST)
    return users


def authenticator(users: UserFile, **options: Any) -> UserPassAuthenticator:
    return UserPassAuthenticator(HtpasswdStore(users), **options)


class CheckpwSpy:
    """Counts bcrypt.checkpw calls and records their threads and hashes."""

    def __init__(self) -> None:
        self.calls = 0
        self.threads: list[int] = []
        self.hashes: list[bytes] = []
        self._real: Callable[[bytes, bytes], bool] = bcrypt.checkpw

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls += 1
        self.threads.append(threading.get_ident())
        self.hashes.append(hashed)
        return self._real(password, hashed)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> CheckpwSpy:
    checkpw = CheckpwSpy()
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    return checkpw


@pytest.fixture
def auth() -> Iterator[UserPassAuthenticator]:
    checker = authenticator(make_users(alice=b"wonderland", long=LONG))
    yield checker
    checker.close()


def verify(auth: UserPassAuthenticator, username: bytes, password: bytes) -> bool:
    return bool(asyncio.run(auth.verify(username, password)))


def test_right_and_wrong_password(auth: UserPassAuthenticator) -> None:
    assert verify(auth, b"alice", b"wonderland") is True
    assert verify(auth, b"alice", b"Wonderland") is False
    assert verify(auth, b"alice", b"") is False
    assert verify(auth, b"Alice", b"wonderland") is False


def test_nul_junk_is_not_the_password(auth: UserPassAuthenticator, spy: CheckpwSpy) -> None:
    assert verify(auth, b"alice", b"wonderland\0junk") is False
    assert verify(auth, b"alice", b"wonderland\0") is False
    assert spy.calls == 0  # refused before bcrypt, whatever the user


def test_password_over_72_bytes_fails(auth: UserPassAuthenticator, spy: CheckpwSpy) -> None:
    assert verify(auth, b"long", LONG) is True
    spy.calls = 0
    # bcrypt would only see the first 72 bytes; the login must still fail, not raise.
    assert verify(auth, b"long", LONG + b"x") is False
    assert verify(auth, b"alice", b"w" * 255) is False
    assert spy.calls == 0


def test_unknown_user_costs_one_dummy_check(auth: UserPassAuthenticator, spy: CheckpwSpy) -> None:
    assert verify(auth, b"mallory", b"wonderland") is False
    assert spy.calls == 1
    # The dummy hash has the users' cost, so the check takes as long as a real one.
    assert spy.hashes[0].startswith(b"$2y$04$")
    assert spy.hashes[0] not in (auth._store.token("alice"), auth._store.token("long"))


def test_non_utf8_username(auth: UserPassAuthenticator, spy: CheckpwSpy) -> None:
    assert verify(auth, b"alic\xe9", b"wonderland") is False
    assert spy.calls == 1


def test_utf8_username_exact_bytes() -> None:
    auth = authenticator(make_users(zoë=b"pw"))
    try:
        assert verify(auth, "zoë".encode(), b"pw") is True
        assert verify(auth, "zoë".encode("latin-1"), b"pw") is False
        # "zoë" spelled with a combining diaeresis is a different name.
        assert verify(auth, "zoe\u0308".encode(), b"pw") is False
    finally:
        auth.close()


def test_cache_skips_bcrypt_on_repeat(auth: UserPassAuthenticator, spy: CheckpwSpy) -> None:
    assert verify(auth, b"alice", b"wonderland") is True
    assert spy.calls == 1
    assert verify(auth, b"alice", b"wonderland") is True
    assert spy.calls == 1
    # A wrong password is never served from the cache, and does not evict the good entry.
    assert verify(auth, b"alice", b"wrong") is False
    assert spy.calls == 2
    assert verify(auth, b"alice", b"wonderland") is True
    assert spy.calls == 2


def test_cached_answers_verified_logins_only_without_bcrypt(
    auth: UserPassAuthenticator, spy: CheckpwSpy
) -> None:
    assert auth.cached(b"alice", b"wonderland") is None  # not verified yet
    assert verify(auth, b"alice", b"wonderland") is True
    calls = spy.calls
    assert auth.cached(b"alice", b"wonderland") is not None
    assert auth.cached(b"alice", b"wrong") is None
    assert auth.cached(b"alice", b"wonderland\0junk") is None
    assert auth.cached(b"nobody", b"wonderland") is None
    assert auth.cached(b"\xff", b"wonderland") is None
    assert spy.calls == calls  # never a bcrypt check
    auth.replace_users(HtpasswdStore(make_users(alice=b"changed")))
    assert auth.cached(b"alice", b"wonderland") is None


def test_identical_logins_in_flight_share_one_check(spy: CheckpwSpy) -> None:
    auth = authenticator(make_users(alice=b"wonderland"), cache_size=0)

    async def burst() -> tuple[list[bool], list[bool], bool, bool]:
        first = asyncio.ensure_future(auth.verify(b"alice", b"wrong"))
        await asyncio.sleep(0)
        sharing = auth.checking(b"alice", b"wrong")
        other = auth.checking(b"alice", b"other")
        wrong = [first, *(auth.verify(b"alice", b"wrong") for _ in range(4))]
        right = [auth.verify(b"alice", b"wonderland") for _ in range(5)]
        return (
            [bool(v) for v in await asyncio.gather(*wrong)],
            [bool(v) for v in await asyncio.gather(*right)],
            sharing,
            other,
        )

    try:
        wrong, right, sharing, other = asyncio.run(burst())
    finally:
        auth.close()
    assert wrong == [False] * 5 and right == [True] * 5
    assert (sharing, other) == (True, False)
    assert spy.calls == 2  # one check per distinct login, none cached (cache_size=0)
    assert not auth.checking(b"alice", b"wrong")  # forgotten once answered


def test_a_caller_going_away_leaves_the_shared_check_to_the_others(spy: CheckpwSpy) -> None:
    auth = authenticator(make_users(alice=b"wonderland"))

    async def run() -> bool:
        first = asyncio.ensure_future(auth.verify(b"alice", b"wonderland"))
        await asyncio.sleep(0)
        second = asyncio.ensure_future(auth.verify(b"alice", b"wonderland"))
        await asyncio.sleep(0)
        first.cancel()
        return bool(await second)

    try:
        assert asyncio.run(run()) is True
    finally:
        auth.close()
    assert spy.calls == 1


def test_failures_are_not_cached(auth: UserPassAuthenticator, spy: CheckpwSpy) -> None:
    assert verify(auth, b"alice", b"wrong") is False
    assert verify(auth, b"alice", b"wrong") is False
    assert spy.calls == 2


def test_cache_holds_no_plaintext(auth: UserPassAuthenticator) -> None:
    assert verify(auth, b"alice", b"wonderland") is True
    for hashed, mac, *_ in auth._cache.values():
        assert b"wonderland" not in hashed
        assert b"wonderland" not in mac
        assert len(mac) == 32


def test_replace_users_invalidates_changed_user(
    auth: UserPassAuthenticator, spy: CheckpwSpy
) -> None:
    assert verify(auth, b"alice", b"wonderland") is True
    assert verify(auth, b"long", LONG) is True
    assert spy.calls == 2
    auth.replace_users(HtpasswdStore(make_users(alice=b"looking-glass", long=LONG)))
    assert verify(auth, b"alice", b"wonderland") is False
    assert spy.calls == 3
    assert verify(auth, b"alice", b"looking-glass") is True
    assert spy.calls == 4


def test_replace_users_keeps_unchanged_user_cached(spy: CheckpwSpy) -> None:
    users = make_users(alice=b"wonderland", bob=b"builder")
    auth = authenticator(users)
    try:
        assert verify(auth, b"alice", b"wonderland") is True
        users.remove("bob")
        auth.replace_users(HtpasswdStore(users))
        assert verify(auth, b"alice", b"wonderland") is True
        assert spy.calls == 1
        assert verify(auth, b"bob", b"builder") is False
    finally:
        auth.close()


def test_removed_user_cache_entry_does_not_match(spy: CheckpwSpy) -> None:
    auth = authenticator(make_users(alice=b"wonderland"))
    try:
        assert verify(auth, b"alice", b"wonderland") is True
        auth.replace_users(HtpasswdStore(UserFile()))
        assert verify(auth, b"alice", b"wonderland") is False
    finally:
        auth.close()


def test_caller_snapshot_is_taken() -> None:
    users = make_users(alice=b"wonderland")
    auth = authenticator(users)
    try:
        users.add("bob", b"builder", rounds=FAST)
        assert verify(auth, b"bob", b"builder") is False  # until replace_users
        auth.replace_users(HtpasswdStore(users))
        assert verify(auth, b"bob", b"builder") is True
    finally:
        auth.close()


def test_lru_bound(spy: CheckpwSpy) -> None:
    auth = authenticator(make_users(a=b"1", b=b"2", c=b"3"), cache_size=2)
    try:
        for name, password in [(b"a", b"1"), (b"b", b"2"), (b"a", b"1"), (b"c", b"3")]:
            assert verify(auth, name, password) is True
        assert spy.calls == 3  # the second "a" was a hit
        assert list(auth._cache) == ["a", "c"]  # "b" was least recently used
        assert verify(auth, b"b", b"2") is True
        assert spy.calls == 4
    finally:
        auth.close()


def test_cache_disabled(spy: CheckpwSpy) -> None:
    auth = authenticator(make_users(alice=b"wonderland"), cache_size=0)
    try:
        assert verify(auth, b"alice", b"wonderland") is True
        assert verify(auth, b"alice", b"wonderland") is True
        assert spy.calls == 2
    finally:
        auth.close()


def test_bcrypt_runs_off_the_event_loop_thread(
    auth: UserPassAuthenticator, spy: CheckpwSpy
) -> None:
    async def main() -> int:
        assert await auth.verify(b"alice", b"wonderland")
        assert not await auth.verify(b"nobody", b"x")
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert spy.calls == 2
    assert loop_thread not in spy.threads


def test_given_executor_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="given") as pool:
        names: list[str] = []
        real = bcrypt.checkpw

        def checkpw(password: bytes, hashed: bytes) -> bool:
            names.append(threading.current_thread().name)
            return real(password, hashed)

        auth = authenticator(make_users(alice=b"wonderland"), executor=pool)
        monkeypatch.setattr(bcrypt, "checkpw", checkpw)
        assert verify(auth, b"alice", b"wonderland") is True
        auth.close()  # does not shut down a pool it was given
        assert pool.submit(lambda: 1).result() == 1
    assert names[0].startswith("given")


def test_in_flight_checks_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    running = 0
    peak = 0

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(bcrypt, "checkpw", slow_checkpw)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        auth = authenticator(make_users(alice=b"x"), executor=pool, max_pending=3)

        async def flood() -> list[bool]:
            guesses = (auth.verify(b"alice", b"guess%d" % i) for i in range(20))  # all distinct
            return [bool(v) for v in await asyncio.gather(*guesses)]

        assert asyncio.run(flood()) == [False] * 20
    assert peak == 3


def test_invalid_stored_hash_fails_without_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(password: bytes, hashed: bytes) -> bool:
        raise ValueError("Invalid salt")

    auth = authenticator(make_users(alice=b"wonderland"))
    try:
        monkeypatch.setattr(bcrypt, "checkpw", broken)
        assert verify(auth, b"alice", b"wonderland") is False
    finally:
        auth.close()


def test_constructor_checks_arguments() -> None:
    with pytest.raises(ValueError, match="cache_size"):
        authenticator(UserFile(), cache_size=-1)
    with pytest.raises(ValueError, match="max_pending"):
        authenticator(UserFile(), max_pending=0)


def test_empty_user_file_dummy_uses_default_cost(spy: CheckpwSpy) -> None:
    auth = authenticator(UserFile())
    try:
        assert verify(auth, b"anyone", b"x") is False
        assert spy.hashes[0].startswith(b"$2y$12$")
    finally:
        auth.close()
