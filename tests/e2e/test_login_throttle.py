"""The failed-login throttle end to end: a real socksd, python-socks for the logins that must get
in, raw RFC 1929 clients for the guesses (their replies are timed on the client). Client
addresses are distinct loopback addresses (127.0.0.2 guesses, 127.0.0.3 is someone else).

- a flood of simultaneous wrong logins from one address neither delays another address's login
  nor gets more checks counted than ``max_auth_checks_per_ip`` allows;
- behind one address (a NAT), guessing one user's password locks nobody out: another user, and
  the guessed user with the right password, get in at once;
- many connections at once with one login not verified yet share its check and all get in;
- each failure of a (address, user) is answered later than the one before;
- the hard block (``auth_block``) keeps the old semantics: closed at accept, then lifted;
- a reload keeps the counts and applies new throttle settings;
- failed GSSAPI contexts (against a real KDC) are slowed the same way and lock nobody out;
- ``check-config`` shows the settings;
- from TEST-NET clients in a network namespace: a NAT address and an IPv6 /64 (tests.netns).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from python_socks.sync import Proxy

from socksd.client import AuthenticationError, GssapiOptions, create_gssapi_connection
from socksd.client import Proxy as SocksdProxy
from tests.e2e.admin_support import (
    closed_before_negotiation,
    config_server,
    connect_from,
    sleep_until,
    socks_reply,
    wait_log_count,
)
from tests.e2e.support import (
    add_user,
    echo_roundtrip,
    recv_exact,
    socksd_cli,
    userpass,
    wait_for_log,
)
from tests.netns import (
    ADDRESSES,
    CLIENT6,
    CLIENT_A,
    CLIENT_B,
    PROXY,
    PROXY6,
    TARGET,
    network_namespace,
)
from tests.servers import EchoServer, ServerProcess

if TYPE_CHECKING:
    from tests.krb5 import TestRealm

GUESSER = "127.0.0.2"
OTHER = "127.0.0.3"
FLOOD = 30


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("throttle") / "users"
    for name in ("alice", "bob", "carol", "dave", "mallory"):
        add_user(path, name, f"pw-{name}")
    return path


def login(
    server: ServerProcess | str, echo: EchoServer, source: str, user: str, host: str = "127.0.0.1"
) -> float:
    """A correct login of ``user`` from ``source`` with python-socks (to ``server`` or the
    listener ``"HOST:PORT"``), relayed to the echo server on ``host``; returns the seconds it
    took."""
    listener = server if isinstance(server, str) else f"{server.host}:{server.port}"
    proxy = Proxy.from_url(f"socks5://{user}:pw-{user}@{listener}")
    start = time.monotonic()
    sock = proxy.connect(host, echo.port, timeout=30, local_addr=(source, 0))
    elapsed = time.monotonic() - start
    with sock:
        echo_roundtrip(sock, f"{user} from {source}".encode())
    return elapsed


def guess(
    server: ServerProcess | tuple[str, int], source: str, user: str, password: str = "wrong"
) -> float:
    """One wrong login; asserts the failure reply (not a bare close); returns the seconds from
    sending the credentials to the reply."""
    if isinstance(server, tuple):
        family = socket.AF_INET6 if ":" in source else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.connect(server)
    else:
        sock = connect_from(server, source)
    with sock:
        sock.settimeout(30)
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        start = time.monotonic()
        sock.sendall(userpass(user, password))
        assert recv_exact(sock, 2) == b"\x01\x01"
        return time.monotonic() - start


def failures_logged(server: ServerProcess, user: str, source: str) -> int:
    return server.log().count(f"authentication failed for user {user!r} from {source}:")


def test_flood_from_one_address_neither_starves_others_nor_overcounts(
    socksd: Callable[..., ServerProcess], users: Path, echo: EchoServer
) -> None:
    # a failure holds its check for at least 2 s: the whole flood arrives within that. At debug
    # level each refusal has its line, also those beyond the warning budget (refusals.py)
    server = socksd(
        "--users", str(users), "--max-auth-checks-per-ip", "2",
        "--auth-delay", "2", "--max-auth-delay", "4", "--log-level", "debug",
    )  # fmt: skip
    lone = login(server, echo, OTHER, "carol")  # uncached: one bcrypt check

    socks = [connect_from(server, GUESSER) for _ in range(FLOOD)]
    replies: list[bytes] = []
    sent = threading.Barrier(FLOOD + 1, timeout=30)

    def flood(sock: socket.socket, n: int) -> None:
        with sock:
            sock.settimeout(30)
            sock.sendall(b"\x05\x01\x02" + userpass("mallory", f"guess-{n}"))
            sent.wait()
            replies.append(recv_exact(sock, 4))

    threads = [threading.Thread(target=flood, args=(s, n)) for n, s in enumerate(socks)]
    for t in threads:
        t.start()
    sent.wait()
    during = login(server, echo, OTHER, "bob")  # uncached too, while the flood is in
    for t in threads:
        t.join(30)
    assert replies == [b"\x05\x02\x01\x01"] * FLOOD  # every guess answered, none just closed
    assert during < 3 * lone + 0.5, f"{during:.2f}s during the flood, {lone:.2f}s alone"
    counted = failures_logged(server, "mallory", GUESSER)
    refused = server.log().count(f"refusing the login of 'mallory' from {GUESSER}:")
    assert 1 <= counted <= 2, f"{counted} failures counted, 2 checks allowed at once"
    assert counted + refused == FLOOD
    assert "(max_auth_checks_per_ip)" in server.log()


def test_guessing_one_user_locks_nobody_out(
    socksd: Callable[..., ServerProcess], users: Path, echo: EchoServer
) -> None:
    server = socksd("--users", str(users), "--auth-delay", "0.01", "--max-auth-delay", "0.05")
    for n in range(15):  # more than max_auth_failures (10)
        guess(server, GUESSER, "mallory", f"guess-{n}")
    assert failures_logged(server, "mallory", GUESSER) == 15
    # another user behind the same address gets in (uncached: a real check)...
    login(server, echo, GUESSER, "alice")
    # ...and so does the guessed user with the right password: the delays slowed the guesses,
    # nobody is locked out
    login(server, echo, GUESSER, "mallory")
    # a verified login is let in again at once, whatever the address's failures
    for _ in range(3):
        guess(server, GUESSER, "dave")
    login(server, echo, GUESSER, "alice")
    assert "blocking" not in server.log()


def test_many_connections_at_once_with_the_same_login_all_get_in(
    socksd: Callable[..., ServerProcess], users: Path, echo: EchoServer
) -> None:
    """A client opening many connections at once (a browser) with a login not verified yet: the
    identical logins share one check instead of exceeding the address's in-flight bound."""
    server = socksd("--users", str(users), "--max-auth-checks-per-ip", "2")
    start = threading.Barrier(10, timeout=30)
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            start.wait()
            login(server, echo, GUESSER, "alice")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=connect) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert "max_auth_checks_per_ip" not in server.log()


def test_failures_are_answered_later_and_later(
    socksd: Callable[..., ServerProcess], users: Path
) -> None:
    server = socksd("--users", str(users), "--auth-delay", "0.2", "--max-auth-delay", "4")
    times = [guess(server, GUESSER, "mallory", f"guess-{n}") for n in range(5)]
    assert all(a < b for a, b in itertools.pairwise(times)), times
    assert times[-1] > 2 * times[0], times
    # another user from the same address starts over (below max_auth_failures)
    assert guess(server, GUESSER, "alice") < times[-1]


def test_hard_block_option_closes_the_address_at_accept(
    socksd: Callable[..., ServerProcess], users: Path, echo: EchoServer
) -> None:
    server = socksd(
        "--users", str(users), "--auth-block", "--max-auth-failures", "3",
        "--auth-block-time", "3", "--auth-delay", "0",
    )  # fmt: skip
    for _ in range(3):
        sock = connect_from(server, "127.0.0.1")
        with sock:
            sock.sendall(b"\x05\x01\x02" + userpass("alice", "wrong"))
            assert recv_exact(sock, 4) == b"\x05\x02\x01\x01"
    wait_for_log(server, "blocking 127.0.0.1 for 3s after 3 failed logins (max_auth_failures)")
    blocked_at = time.monotonic()
    # even the right password: closed at accept, before the greeting is answered
    assert closed_before_negotiation(connect_from(server, "127.0.0.1"))
    code, other = socks_reply(
        server, "127.0.0.1", echo.port, source="127.0.0.2", user="alice", password="pw-alice"
    )
    other.close()
    assert code == 0
    assert server.log().count("blocking 127.0.0.1") == 1

    def unblocked() -> bool:
        code, sock = socks_reply(server, "127.0.0.1", echo.port, user="alice", password="pw-alice")
        with sock:
            return code == 0

    time.sleep(max(0.0, 3.2 - (time.monotonic() - blocked_at)))
    sleep_until(unblocked, 10)


def test_reload_keeps_the_counts_and_applies_new_settings(
    socksd: Callable[..., ServerProcess], users: Path, tmp_path: Path, echo: EchoServer
) -> None:
    body = f'users = "{users}"\nauth_delay = 0\nmax_auth_failures = 3\n'
    server, config = config_server(socksd, tmp_path, body)
    for _ in range(3):
        guess(server, GUESSER, "mallory")
    login(server, echo, GUESSER, "alice")  # no block without auth_block
    config.write_text(config.read_text() + "auth_block = true\n")
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_log_count(server, "reloaded configuration", 1)
    # the three failures from before the reload count: the address is now blocked
    assert closed_before_negotiation(connect_from(server, GUESSER))
    login(server, echo, OTHER, "bob")


def test_check_config_shows_the_throttle(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "handshake_timeout = 4\nauth_delay = 0.25\nmax_auth_checks_per_ip = 2\nauth_block = true\n"
    )
    result = socksd_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "max_auth_failures=10 auth_block_time=60s auth_delay=0.25s max_auth_delay=2s "
        "max_auth_checks_per_ip=2 auth_block=on" in result.stdout
    )
    path.write_text("max_auth_delay = 20\n")
    result = socksd_cli("check-config", str(path))
    assert result.returncode == 2
    assert "max_auth_delay: must be less than handshake_timeout (10s), got 20" in result.stderr


def test_failed_gssapi_contexts_are_answered_later_and_later(
    socksd: Callable[..., ServerProcess], krb5_realm: TestRealm, echo: EchoServer
) -> None:
    from tests.krb5 import HOST

    realm = krb5_realm
    server = socksd(
        "--gssapi-keytab", str(realm.keytab), "--auth-delay", "0.2", "--max-auth-delay", "5",
        env=realm.env,
    )  # fmt: skip

    def gssapi(service: str) -> SocksdProxy:
        options = GssapiOptions(hostname=HOST, level=2, service=service)
        return SocksdProxy(server.host, server.port, gssapi=options)

    def fail() -> float:
        """A context for a service socksd does not serve: refused; seconds to the abort."""
        start = time.monotonic()
        with pytest.raises(AuthenticationError, match="proxy refused the GSSAPI authentication"):
            create_gssapi_connection(gssapi("host"), ("127.0.0.1", echo.port), timeout=30)
        return time.monotonic() - start

    fail()  # the first also fetches the service ticket
    times = [fail() for _ in range(4)]
    assert all(a < b for a, b in itertools.pairwise(times)), times
    # the right service gets in at once: a failed context never blocks the address
    start = time.monotonic()
    with create_gssapi_connection(gssapi("rcmd"), ("127.0.0.1", echo.port), timeout=30) as sock:
        elapsed = time.monotonic() - start
        echo_roundtrip(sock, b"gssapi after failures")
    assert elapsed < times[0], (elapsed, times)


# -- remote clients (a network namespace with TEST-NET addresses) --------------------------------

SAME_64 = "2001:db8::11"
"""Another host in CLIENT6's /64: counted as the same client address."""


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace((*ADDRESSES, SAME_64)) as name:
        yield name


def test_remote_clients_behind_one_address_and_one_64(
    netns: str, socksd: Callable[..., ServerProcess], users: Path, tmp_path: Path
) -> None:
    """From TEST-NET clients: guesses from one address (a NAT) lock nobody out there; an IPv6
    client's whole /64 is one address for the in-flight bound, another address is not."""
    path = tmp_path / "remote.toml"
    path.write_text(
        f'listen = ["{PROXY}:0", "[{PROXY6}]:0"]\nusers = "{users}"\n'
        "auth_delay = 0.05\nmax_auth_delay = 3\nmax_auth_checks_per_ip = 1\n"
        '[[rules]]\naction = "allow"\nto = ["198.51.100.0/24"]\n'
    )
    server = socksd("--config", str(path))
    v4 = next(a for a in server.addresses if a.startswith(PROXY + ":"))
    v6 = next(a for a in server.addresses if a.startswith(f"[{PROXY6}]:"))
    target = EchoServer(TARGET)
    try:
        for n in range(12):  # more than max_auth_failures (10), names tried one by one
            guess(server, CLIENT_A, f"user{n}")
        login(v4, target, CLIENT_A, "alice", TARGET)
        login(v4, target, CLIENT_B, "bob", TARGET)

        # mallory's 6th failure from CLIENT6 waits 1.6 s: its /64 has its one check in flight
        port6 = int(v6.rpartition(":")[2])
        for n in range(5):
            guess((PROXY6, port6), CLIENT6, "mallory", f"guess-{n}")
        slow = threading.Thread(target=guess, args=((PROXY6, port6), CLIENT6, "mallory"))
        slow.start()
        wait_log_count(server, "authentication failed for user 'mallory' from [2001:db8::10]", 6)
        guess((PROXY6, port6), SAME_64, "carol", "pw-carol")  # refused at once, unchecked
        login(v4, target, CLIENT_A, "dave", TARGET)  # another address is not concerned
        slow.join(30)
        assert (
            "refusing the login of 'carol' from [2001:db8::11]:" in server.log()
            and "(max_auth_checks_per_ip)" in server.log()
        )
        login(v6, target, SAME_64, "carol", TARGET)  # the check is back: carol gets in
    finally:
        target.close()
