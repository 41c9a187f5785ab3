"""Users from LDAP end to end: a real slapd (``tests.e2e.ldap``) on loopback, socksd with
``users = "ldap://..."``, and real clients (curl, python-socks, raw RFC 1929 bytes).

- the right password gets in (curl, python-socks, HTTP CONNECT with Basic); a wrong password, an
  unknown user and filter metacharacters in the name do not;
- groups from the directory in rules: ``@ldap:NAME`` from a group search (``group_base``) and
  from ``memberOf``; a valid user outside the group is denied by the rules, not the login;
- StartTLS and ldaps with a self-signed CA given in ``ca_file``; without it the certificate
  check fails and the login is refused with a clear error;
- the directory down (killed): a clear error, the login refused at once, sessions already open
  unaffected, a cached login still let in; the directory hung (SIGSTOP): refused after
  ``[ldap] timeout``, well before the handshake timeout;
- a user deleted with ldapdelete is refused once ``users_cache_ttl`` has passed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from python_socks.sync import Proxy

from tests.e2e.admin_support import config_server
from tests.e2e.ldap import (
    GROUPS,
    SERVICE_DN,
    SERVICE_PASSWORD,
    TEAMS,
    Slapd,
    missing,
    slapd_port,
)
from tests.e2e.support import (
    HttpServer,
    clean_env,
    connect_proxy,
    echo_roundtrip,
    read_reply,
    recv_exact,
    request,
    userpass,
    wait_for,
)
from tests.e2e.test_metrics import key, metrics_url, scrape
from tests.servers import EchoServer, ServerProcess

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

PASSWORD = "ldap-Pass.word"
OTHER_PASSWORD = "other-Pass"
CURL = shutil.which("curl") or "/usr/bin/curl"


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """slapd on 21975 (ldaps 21976): alice in proxy-users, carol in the team staff (outside
    group_base: only memberOf knows), bob in no group; dave and erin to be deleted."""
    slapd = Slapd(tmp_path_factory.mktemp("slapd"), slapd_port())
    slapd.start()
    try:
        slapd.load_base()
        dns = {uid: slapd.add_user(uid, PASSWORD) for uid in ("alice", "bob", "carol", "dave")}
        dns["erin"] = slapd.add_user("erin", PASSWORD)
        slapd.add_group("proxy-users", [dns["alice"], dns["dave"], dns["erin"]])
        slapd.add_group("staff", [dns["carol"]], branch=TEAMS)
        yield slapd
    finally:
        slapd.stop()


@pytest.fixture
def lone_directory(tmp_path: Path) -> Iterator[Slapd]:
    """A slapd of the test's own (21977, ldaps 21978), to be killed or paused: alice only."""
    slapd = Slapd(tmp_path / "slapd", slapd_port())
    slapd.start()
    try:
        slapd.load_base()
        alice = slapd.add_user("alice", PASSWORD)
        slapd.add_group("proxy-users", [alice])
        yield slapd
    finally:
        slapd.stop()


def ldap_config(
    slapd: Slapd,
    tmp: Path,
    *,
    url: str | None = None,
    ttl: float = 300,
    ldap: str = "",
    rules: str = "",
) -> str:
    """A config body: users from ``slapd`` (searched as the service account), quick failure
    replies, and ``rules``."""
    password_file = tmp / "bind.pw"
    password_file.write_text(SERVICE_PASSWORD + "\n")
    url = url or f"{slapd.url}/ou=people,dc=example,dc=test?uid?sub?(objectClass=inetOrgPerson)"
    return (
        f'users = "{url}"\n'
        f"users_cache_ttl = {ttl}\n"
        "auth_delay = 0.01\nmax_auth_delay = 0.1\n"
        f"{rules}\n"
        "[ldap]\n"
        f'bind_dn = "{SERVICE_DN}"\n'
        f'bind_password_file = "{password_file}"\n'
        f'group_base = "{GROUPS}"\n'
        f"{ldap}\n"
    )


def login(server: ServerProcess, user: str | bytes, password: str) -> bytes:
    """An RFC 1929 login; the server's 2-byte answer (``b"\\x01\\x00"``: in)."""
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(userpass(user, password))
        return recv_exact(sock, 2)


def connect_reply(server: ServerProcess, user: str, password: str, target: EchoServer) -> int:
    """Log in and CONNECT to ``target``: the reply code."""
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(userpass(user, password))
        assert recv_exact(sock, 2) == b"\x01\x00"
        sock.sendall(request("127.0.0.1", target.port))
        raw, _, _ = read_reply(sock)
    return raw[1]


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CURL, "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=40,
        env=clean_env(),
        check=False,
    )


@pytest.fixture(scope="module")
def ldap_server(
    module_socksd: Callable[..., ServerProcess],
    directory: Slapd,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """socksd with users from ``directory``; SOCKS5 and HTTP CONNECT."""
    tmp = tmp_path_factory.mktemp("ldap-socksd")
    path = tmp / "socksd.toml"
    body = ldap_config(directory, tmp)
    path.write_text(f'listen = ["127.0.0.1:0"]\nprotocols = ["socks5", "http"]\n{body}')
    return module_socksd("--config", str(path))


# -- logins ---------------------------------------------------------------------------------------


def test_curl_logs_in(ldap_server: ServerProcess, http4: HttpServer) -> None:
    result = curl("-x", f"socks5h://alice:{PASSWORD}@127.0.0.1:{ldap_server.port}", http4.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == http4.body
    assert PASSWORD not in ldap_server.log()


def test_http_connect_basic_logs_in(ldap_server: ServerProcess, http4: HttpServer) -> None:
    proxy = f"http://alice:{PASSWORD}@127.0.0.1:{ldap_server.port}"
    result = curl("-p", "-x", proxy, http4.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout == http4.body


def test_python_socks_logs_in(ldap_server: ServerProcess, module_echo: EchoServer) -> None:
    proxy = Proxy.from_url(f"socks5://bob:{PASSWORD}@127.0.0.1:{ldap_server.port}")
    with proxy.connect("127.0.0.1", module_echo.port, timeout=15) as sock:
        echo_roundtrip(sock, b"through ldap")


def test_wrong_password_is_refused(ldap_server: ServerProcess) -> None:
    assert login(ldap_server, "alice", "not-the-password") == b"\x01\x01"
    assert wait_for(lambda: "authentication failed for user 'alice'" in ldap_server.log())


def test_unknown_user_is_refused(ldap_server: ServerProcess) -> None:
    assert login(ldap_server, "mallory", PASSWORD) == b"\x01\x01"
    assert wait_for(lambda: "authentication failed for user 'mallory'" in ldap_server.log())


@pytest.mark.parametrize("name", ["*", "a*", "alice)(uid=*", "*)(|(uid=*", "alice\\2a"])
def test_filter_metacharacters_match_nothing(ldap_server: ServerProcess, name: str) -> None:
    """Escaped: a name with ``*`` or parentheses is looked up literally, so it finds no entry
    (unescaped, ``*`` or ``a*`` would find alice and her password would let it in)."""
    assert login(ldap_server, name, PASSWORD) == b"\x01\x01"


@pytest.mark.parametrize("name", ["ALICE", " alice", "alice "])
def test_name_must_be_as_in_the_directory(ldap_server: ServerProcess, name: str) -> None:
    """slapd finds alice for these (uid ignores case and surrounding spaces), but a session as
    ``ALICE`` would escape rules naming ``alice``: refused."""
    assert login(ldap_server, name, PASSWORD) == b"\x01\x01"


def test_empty_password_is_refused(ldap_server: ServerProcess) -> None:
    """An LDAP bind with a DN and no password is an unauthenticated bind slapd may accept."""
    assert login(ldap_server, "alice", "") == b"\x01\x01"


# -- groups in rules ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def group_server(
    module_socksd: Callable[..., ServerProcess],
    directory: Slapd,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """Only @ldap:proxy-users (group search) and @ldap:staff (memberOf) may connect."""
    tmp = tmp_path_factory.mktemp("ldap-groups")
    rules = 'default = "deny"\n[[rules]]\naction = "allow"\nusers = ["@ldap:proxy-users", "@ldap:Staff"]\n'
    path = tmp / "socksd.toml"
    path.write_text(f'listen = ["127.0.0.1:0"]\n{ldap_config(directory, tmp, rules=rules)}')
    return module_socksd("--config", str(path))


def test_group_from_group_search_allows(
    group_server: ServerProcess, module_echo: EchoServer
) -> None:
    assert connect_reply(group_server, "alice", PASSWORD, module_echo) == 0


def test_group_from_member_of_allows(group_server: ServerProcess, module_echo: EchoServer) -> None:
    """carol's group is outside group_base: only the memberof overlay's memberOf names it."""
    assert connect_reply(group_server, "carol", PASSWORD, module_echo) == 0


def test_user_outside_the_groups_is_denied(
    group_server: ServerProcess, module_echo: EchoServer
) -> None:
    """bob logs in (the directory knows him) but no rule allows him: REP 0x02."""
    assert connect_reply(group_server, "bob", PASSWORD, module_echo) == 2


# -- TLS ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["starttls", "ldaps"])
def test_tls_with_the_directory_ca(
    socksd: Callable[..., ServerProcess],
    directory: Slapd,
    tmp_path: Path,
    module_echo: EchoServer,
    scheme: str,
) -> None:
    base = "ou=people,dc=example,dc=test"
    if scheme == "ldaps":
        url, extra = f"ldaps://127.0.0.1:{directory.tls_port}/{base}", ""
    else:
        url, extra = f"{directory.url}/{base}", "starttls = true\n"
    body = ldap_config(directory, tmp_path, url=url, ldap=f'{extra}ca_file = "{directory.cert}"')
    server, _ = config_server(socksd, tmp_path, body)
    assert connect_reply(server, "alice", PASSWORD, module_echo) == 0


def test_tls_certificate_not_trusted_refuses(
    socksd: Callable[..., ServerProcess], directory: Slapd, tmp_path: Path
) -> None:
    """Without ca_file the self-signed certificate fails the check: no login, a clear error."""
    url = f"{directory.url}/ou=people,dc=example,dc=test"
    server, _ = config_server(
        socksd, tmp_path, ldap_config(directory, tmp_path, url=url, ldap="starttls = true")
    )
    assert login(server, "alice", PASSWORD) == b"\x01\x01"
    assert wait_for(lambda: "the user store is unavailable" in server.log())


# -- the directory down ---------------------------------------------------------------------------


def test_directory_down_refuses_logins_not_sessions(
    socksd: Callable[..., ServerProcess],
    lone_directory: Slapd,
    tmp_path: Path,
    module_echo: EchoServer,
) -> None:
    body = ldap_config(lone_directory, tmp_path, ttl=300)
    body = "max_auth_failures = 2\nauth_block_time = 600\n" + body
    server, _ = config_server(socksd, tmp_path, body, "--metrics", "127.0.0.1:0")
    proxy = Proxy.from_url(f"socks5://alice:{PASSWORD}@127.0.0.1:{server.port}")
    with proxy.connect("127.0.0.1", module_echo.port, timeout=15) as open_session:
        lone_directory.kill()
        # a session already relaying does not depend on the directory
        echo_roundtrip(open_session, b"still here")
        # alice's login was verified less than users_cache_ttl ago: let in from the cache
        assert login(server, "alice", PASSWORD) == b"\x01\x00"
        # logins that need the directory: refused at once, with the reason in the log; more
        # of them than max_auth_failures
        for n in range(4):
            assert login(server, "alice", f"another password {n}") == b"\x01\x01"
        assert wait_for(lambda: "the user store is unavailable" in server.log())
        assert "not counted as a failed login" in server.log()
        assert "Connection refused" in server.log()
        assert wait_for(
            lambda: 'error="login refused: the user store is unavailable"' in server.log()
        )
        echo_roundtrip(open_session, b"and still here")
    # not counted as wrong passwords: no failed-login line, the address is not blocked
    assert "authentication failed for user 'alice'" not in server.log()
    assert "blocking" not in server.log()
    samples = scrape(metrics_url(server))  # counted as the store's outage, not as failures
    assert samples[key("socksd_user_store_unavailable_total", store="ldap")] == 4
    assert samples.get(key("socksd_auth_failures_total", method="userpass"), 0) == 0
    lone_directory.start()  # back: the next wrong password is checked, not refused as blocked
    assert login(server, "alice", "wrong") == b"\x01\x01"
    assert wait_for(lambda: "authentication failed for user 'alice'" in server.log())
    assert "auth_block" not in server.log()


def test_directory_hung_refuses_after_its_timeout(
    socksd: Callable[..., ServerProcess], lone_directory: Slapd, tmp_path: Path
) -> None:
    """slapd stopped (SIGSTOP): connections are accepted, nothing answers. The login is
    refused after [ldap] timeout (1 s) with a reply; the handshake timeout (10 s) would close
    the connection without one."""
    body = ldap_config(lone_directory, tmp_path, ldap="timeout = 1")
    server, _ = config_server(socksd, tmp_path, body)
    lone_directory.pause()
    try:
        assert login(server, "alice", PASSWORD) == b"\x01\x01"
        assert wait_for(lambda: "no answer within 1s" in server.log())
    finally:
        lone_directory.resume()
    assert login(server, "alice", PASSWORD) == b"\x01\x00"  # back: a new connection is made


def test_directory_restart_is_survived(
    socksd: Callable[..., ServerProcess], lone_directory: Slapd, tmp_path: Path
) -> None:
    """The pooled search connection dies with the directory; the next login's search fails on
    it and is retried once on a new connection (users_cache_ttl 0: every login asks)."""
    server, _ = config_server(socksd, tmp_path, ldap_config(lone_directory, tmp_path, ttl=0))
    assert login(server, "alice", PASSWORD) == b"\x01\x00"
    lone_directory.stop()
    lone_directory.start()
    assert login(server, "alice", PASSWORD) == b"\x01\x00"
    assert login(server, "alice", "wrong") == b"\x01\x01"
    assert "unavailable" not in server.log()


def test_reload_keeps_the_cache_of_an_unchanged_directory(
    socksd: Callable[..., ServerProcess], lone_directory: Slapd, tmp_path: Path
) -> None:
    """SIGHUP with the same directory settings keeps the verified logins (alice gets in with
    the directory down); a changed setting starts a new checker whose cache is empty."""
    server, path = config_server(socksd, tmp_path, ldap_config(lone_directory, tmp_path))
    assert login(server, "alice", PASSWORD) == b"\x01\x00"
    lone_directory.kill()

    def reload() -> None:
        before = server.log().count("reloaded configuration")
        server.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: server.log().count("reloaded configuration") > before)

    reload()
    assert login(server, "alice", PASSWORD) == b"\x01\x00"
    assert f"users from {lone_directory.url}/ou=people" in server.log()
    path.write_text(path.read_text().replace("[ldap]\n", "[ldap]\ntimeout = 2\n"))
    reload()
    assert login(server, "alice", PASSWORD) == b"\x01\x01"
    assert wait_for(lambda: "the user store is unavailable" in server.log())


def test_deleted_user_refused_after_the_cache_lifetime(
    socksd: Callable[..., ServerProcess], directory: Slapd, tmp_path: Path
) -> None:
    server, _ = config_server(socksd, tmp_path, ldap_config(directory, tmp_path, ttl=0.5))
    assert login(server, "dave", PASSWORD) == b"\x01\x00"
    directory.delete("uid=dave,ou=people,dc=example,dc=test")
    assert wait_for(lambda: login(server, "dave", PASSWORD) == b"\x01\x01", timeout=20)
    assert wait_for(lambda: "authentication failed for user 'dave'" in server.log())


def test_deleted_user_let_in_while_cached(
    socksd: Callable[..., ServerProcess], directory: Slapd, tmp_path: Path
) -> None:
    """With a long users_cache_ttl the verified login outlives the entry (the documented
    trade-off): the cache, not the directory, answered."""
    server, _ = config_server(socksd, tmp_path, ldap_config(directory, tmp_path, ttl=300))
    assert login(server, "erin", PASSWORD) == b"\x01\x00"
    directory.delete("uid=erin,ou=people,dc=example,dc=test")
    assert login(server, "erin", PASSWORD) == b"\x01\x00"
    assert login(server, "erin", "wrong") == b"\x01\x01"  # never cached, the entry is gone


def test_check_config_describes_the_directory(directory: Slapd, tmp_path: Path) -> None:
    path = tmp_path / "socksd.toml"
    path.write_text(f'listen = ["127.0.0.1:0"]\n{ldap_config(directory, tmp_path)}')
    out = subprocess.run(
        [sys.executable, "-m", "socksd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"users from {directory.url}/ou=people" in out.stdout
    assert SERVICE_PASSWORD not in out.stdout
