"""The authenticator with a directory of users (what PAM is to it): the cache lifetime, the
timeout, hung checks that keep their threads and slots, and the choice of store by ``users``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from socksd.auth.htpasswd import UserFile
from socksd.auth.pam import PamStore
from socksd.auth.stores import (
    NO_GROUPS,
    WRONG,
    CheckResult,
    UserStoreError,
    is_directory,
    open_user_store,
    unavailable,
)
from socksd.auth.userpass import CheckPool, HtpasswdStore, UserPassAuthenticator
from tests.helpers import FakeClock, await_for, wait_for


class Directory:
    """A directory of users with a check that counts its calls and can hang until released."""

    kind = "directory"
    threads = 2

    def __init__(self, cache_ttl: float = 300.0, timeout: float | None = 5.0) -> None:
        self.cache_ttl = cache_ttl
        self.timeout = timeout
        self.passwords = {"alice": b"wonderland", "slow": b"tortoise", "bob": b"builder"}
        self.hang: set[str] = set()
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self.calls: list[str | None] = []
        self.clients: list[str | None] = []
        self.groups: dict[str, frozenset[str]] = {}
        self.closed = False

    def describe(self) -> str:
        return "a test directory"

    def refuse(self, username: bytes, password: bytes) -> bool:
        return b"\0" in username + password

    def token(self, name: str | None) -> bytes:
        return b"directory"

    def check(
        self, name: str | None, token: bytes | None, password: bytes, client: str | None
    ) -> CheckResult:
        self.calls.append(name)
        self.clients.append(client)
        self.started.release()
        if name in self.hang:
            self.release.wait(30)
        if name == "broken":
            raise OSError("the directory is on fire")
        if name == "down":
            return unavailable("the directory is down")
        if name is not None and self.passwords.get(name) == password:
            return CheckResult(True, self.groups.get(name, NO_GROUPS))
        return WRONG

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def directory() -> Iterator[Directory]:
    store = Directory()
    yield store
    store.release.set()


def verify(auth: UserPassAuthenticator, username: bytes, password: bytes) -> bool:
    return bool(asyncio.run(auth.verify(username, password)))


def test_a_verified_login_is_trusted_for_the_cache_lifetime_only(directory: Directory) -> None:
    clock = FakeClock()
    auth = UserPassAuthenticator(directory, clock=clock)
    try:
        assert verify(auth, b"alice", b"wonderland") is True
        del directory.passwords["alice"]  # removed from the directory
        clock.advance(299)
        assert auth.cached(b"alice", b"wonderland") is not None
        assert verify(auth, b"alice", b"wonderland") is True  # served from the cache
        assert auth.cached(b"alice", b"wrong") is None
        assert directory.calls == ["alice"]
        clock.advance(1)  # 300 s after the check: the lifetime is over
        assert auth.cached(b"alice", b"wonderland") is None
        assert verify(auth, b"alice", b"wonderland") is False  # asked again: refused
        assert directory.calls == ["alice", "alice"]
    finally:
        auth.close()


def test_a_shorter_lifetime_after_a_reload_applies_to_cached_logins(directory: Directory) -> None:
    clock = FakeClock()
    auth = UserPassAuthenticator(directory, clock=clock)
    try:
        assert verify(auth, b"alice", b"wonderland") is True
        clock.advance(20)
        assert auth.cached(b"alice", b"wonderland") is not None
        shorter = Directory(cache_ttl=10)
        auth.replace_users(shorter)
        assert auth.cached(b"alice", b"wonderland") is None
    finally:
        auth.close()


def test_no_caching_with_a_zero_lifetime() -> None:
    store = Directory(cache_ttl=0)
    auth = UserPassAuthenticator(store)
    try:
        assert verify(auth, b"alice", b"wonderland") is True
        assert auth.cached(b"alice", b"wonderland") is None
        assert verify(auth, b"alice", b"wonderland") is True
        assert store.calls == ["alice", "alice"]
    finally:
        auth.close()


def test_a_refused_login_is_not_checked(directory: Directory) -> None:
    auth = UserPassAuthenticator(directory)
    try:
        assert verify(auth, b"alice", b"wonderland\0junk") is False
        assert verify(auth, b"ali\0ce", b"wonderland") is False
        assert directory.calls == []
    finally:
        auth.close()


def test_a_check_that_hangs_fails_at_the_timeout_and_others_go_on(directory: Directory) -> None:
    directory.timeout = 0.3
    directory.hang.add("slow")
    auth = UserPassAuthenticator(directory)

    async def run() -> tuple[CheckResult, CheckResult]:
        slow = asyncio.ensure_future(auth.verify(b"slow", b"tortoise"))
        await asyncio.to_thread(directory.started.acquire)  # the slow check is running
        alice = await auth.verify(b"alice", b"wonderland")  # its thread hangs till the end
        return alice, await slow

    try:
        alice, slow = asyncio.run(run())
        assert alice.ok and not slow.ok
        assert slow.unavailable == "no answer within 0.3s"  # not a wrong password
        assert directory.calls == ["slow", "alice"]
    finally:
        auth.close()


def test_hung_checks_keep_their_slots_until_their_threads_return(directory: Directory) -> None:
    """The slot bound counts checks whose threads are busy, not callers still waiting: checks
    that hang past their timeout cannot pile more work on the pool."""
    directory.timeout = 0.3
    directory.hang.add("slow")
    auth = UserPassAuthenticator(directory, max_pending=2)

    async def run() -> list[bool]:
        slow = [auth.verify(b"slow", b"guess-%d" % n) for n in range(2)]  # distinct: 2 checks
        results = [bool(v) for v in await asyncio.gather(*slow)]  # both time out, threads hang
        results.append(bool(await auth.verify(b"alice", b"wonderland")))  # no slot in time
        calls = list(directory.calls)
        directory.release.set()
        assert await await_for(lambda: not auth._slots.locked(), timeout=30)
        results.append(bool(await auth.verify(b"alice", b"wonderland")))  # slots back: checked
        assert calls == ["slow", "slow"]  # alice's first login never reached the pool
        return results

    try:
        assert asyncio.run(run()) == [False, False, False, True]
    finally:
        auth.close()


def test_a_check_that_raises_is_the_store_unavailable(
    directory: Directory, caplog: pytest.LogCaptureFixture
) -> None:
    auth = UserPassAuthenticator(directory)
    try:
        verdict = asyncio.run(auth.verify(b"broken", b"x"))
        assert not verdict.ok
        assert verdict.unavailable == "the check failed: OSError('the directory is on fire')"
        assert verify(auth, b"alice", b"wonderland") is True
    finally:
        auth.close()
    assert "a test directory: the check of user 'broken' failed" in caplog.text


def test_an_unavailable_answer_is_passed_on_and_never_cached(directory: Directory) -> None:
    auth = UserPassAuthenticator(directory)
    try:
        for _ in range(2):
            verdict = asyncio.run(auth.verify(b"down", b"x"))
            assert (verdict.ok, verdict.unavailable) == (False, "the directory is down")
            assert auth.cached(b"down", b"x") is None
        assert directory.calls == ["down", "down"]
    finally:
        auth.close()


def test_groups_come_with_the_login_and_stay_while_it_is_cached(directory: Directory) -> None:
    """A directory's groups reach the login path with the verdict, and a cached login keeps
    the groups its check found for the cache's lifetime."""
    clock = FakeClock()
    directory.groups["alice"] = frozenset({"ldap:staff"})
    auth = UserPassAuthenticator(directory, clock=clock)
    try:
        verdict = asyncio.run(auth.verify(b"alice", b"wonderland", "192.0.2.7"))
        assert verdict.groups == {"ldap:staff"}
        assert directory.clients == ["192.0.2.7"]  # the client's address reaches the check
        directory.groups["alice"] = frozenset({"ldap:other"})  # changed in the directory
        clock.advance(299)
        cached = auth.cached(b"alice", b"wonderland")
        assert cached is not None and cached.groups == {"ldap:staff"}
        again = asyncio.run(auth.verify(b"alice", b"wonderland"))
        assert again.groups == {"ldap:staff"} and directory.calls == ["alice"]
        clock.advance(1)  # expired: checked again, the new groups
        assert asyncio.run(auth.verify(b"alice", b"wonderland")).groups == {"ldap:other"}
    finally:
        auth.close()


def test_a_replaced_store_is_handed_back_and_closing_closes_the_store(
    directory: Directory,
) -> None:
    auth = UserPassAuthenticator(directory)
    newer = Directory()
    assert auth.replace_users(newer) is directory
    auth.close()
    assert newer.closed and not directory.closed


def test_pool_threads_are_daemons_and_queued_calls_can_be_cancelled() -> None:
    pool = CheckPool(1, "test-pool")
    gate = threading.Event()
    try:
        first = pool.submit(gate.wait, 30)
        second = pool.submit(lambda: 2)
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("test-pool"))
    finally:
        gate.set()
    assert first.result(30) is True
    assert second.result(30) == 2
    blocker = threading.Event()
    busy = pool.submit(blocker.wait, 30)
    assert wait_for(busy.running)
    queued = pool.submit(lambda: 3)
    pool.shutdown(wait=False, cancel_futures=True)
    blocker.set()
    assert busy.result(30) is True
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: 4)


def test_the_kind_of_store_names_the_authenticator(directory: Directory) -> None:
    auth = UserPassAuthenticator(HtpasswdStore(UserFile(), source="f"))
    try:
        assert auth.kind == "htpasswd"
    finally:
        auth.close()
    auth = UserPassAuthenticator(directory)
    try:
        assert auth.kind == "directory"
        assert verify(auth, b"alice", b"wonderland") is True
        assert any(t.name.startswith("socksd-directory") for t in threading.enumerate())
    finally:
        auth.close()


def test_open_user_store_picks_the_store_by_the_users_value(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("")
    store = open_user_store(users, cache_ttl=300, timeout=5)
    assert isinstance(store, HtpasswdStore)
    assert store.describe() == f"0 users in {users}"
    with pytest.raises(UserStoreError, match="cannot read"):
        open_user_store(tmp_path / "missing", cache_ttl=300, timeout=5)
    with pytest.raises(UserStoreError, match=r"no PAM service file /etc/pam\.d/socksd-no-such"):
        open_user_store("pam:socksd-no-such", cache_ttl=300, timeout=5)
    assert is_directory("pam:socksd") and not is_directory("/etc/socksd/users")


def test_pam_store_from_users(tmp_path: Path) -> None:
    (tmp_path / "socksd").write_text("auth required pam_deny.so\n")
    store = PamStore("socksd", cache_ttl=60, timeout=2, pam_dir=tmp_path)
    assert store.describe() == f"PAM service socksd ({tmp_path / 'socksd'})"
    assert (store.kind, store.cache_ttl, store.timeout) == ("pam", 60, 2)


def test_a_store_fits_an_authenticator_of_its_kind_and_pool_size(directory: Directory) -> None:
    """A reload keeps the authenticator (its pool, its cache) only for a store of the same kind
    and number of threads (LDAP's pool_size): otherwise the server makes a new one."""
    auth = UserPassAuthenticator(directory)
    try:
        assert auth.fits(Directory())
        bigger = Directory()
        bigger.threads = 3
        assert not auth.fits(bigger)
        assert not auth.fits(HtpasswdStore(UserFile(), source="f"))
    finally:
        auth.close()
