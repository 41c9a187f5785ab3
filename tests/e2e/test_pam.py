"""Users from PAM (``users = "pam:SERVICE"``) against a real PAM stack: a throwaway service file
/etc/pam.d/socksd-test-XXXX (created and removed here; root only) whose users are in a Berkeley
DB read by pam_userdb (made with ``db_load``), with crypt(3) hashes as the README suggests, and
pam_exec running a script that holds the login of the user ``slow`` until the test opens a gate.

- curl (socks5h:// and HTTP CONNECT with Basic) and python-socks log in;
- a wrong password gets the RFC 1929 failure reply and is counted by the throttle;
- a user removed from the db is still let in from the cache while ``users_cache_ttl`` lasts, and
  refused after it;
- a PAM check that hangs fails at its timeout and stalls nobody else;
- a reload switches from an htpasswd file to PAM;
- a service without a file in /etc/pam.d is a one-line config error (no root needed).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from python_socks.sync import Proxy

from tests.e2e.admin_support import config_server, connect_from, run_curl, write_config
from tests.e2e.support import (
    HttpServer,
    add_user,
    echo_roundtrip,
    recv_exact,
    socksd_cli,
    userpass,
    wait_for,
    wait_for_log,
)
from tests.servers import EchoServer, ServerProcess

PAM_MODULES = next(
    (d for d in Path("/usr/lib").glob("*/security") if (d / "pam_userdb.so").exists()),
    Path("/usr/lib/security"),
)
DB_LOAD = shutil.which("db_load") or shutil.which("db5.3_load")
OPENSSL = shutil.which("openssl")
PASSWORDS = {
    "alice": "wonder land",
    "bob": "builder",
    "carol": "singer",
    "dave": "diver",
    "slow": "tortoise",
}

needs_pam = pytest.mark.skipif(
    os.geteuid() != 0
    or DB_LOAD is None
    or OPENSSL is None
    or not (PAM_MODULES / "pam_userdb.so").exists()
    or not (PAM_MODULES / "pam_exec.so").exists(),
    reason="needs root (a file in /etc/pam.d), pam_userdb and pam_exec (libpam-modules), "
    "db_load (db-util) and openssl",
)


@dataclass
class PamService:
    """A PAM service of pam_userdb users, the gate the user ``slow`` waits for, and its name."""

    name: str
    db: Path
    gate: Path
    hashes: dict[str, str]

    @property
    def rhosts(self) -> Path:
        """``USER RHOST`` per check, as pam_exec saw PAM_USER and PAM_RHOST."""
        return self.db.parent / "rhosts"

    @property
    def users(self) -> str:
        return f"pam:{self.name}"

    def write_db(self, *names: str) -> None:
        """The db holds ``names`` (and only them) from now on; replaced in one rename."""
        source = self.db.with_suffix(".txt")
        source.write_text("".join(f"{name}\n{self.hashes[name]}\n" for name in names))
        fresh = self.db.with_suffix(".new.db")
        fresh.unlink(missing_ok=True)
        assert DB_LOAD is not None
        subprocess.run([DB_LOAD, "-T", "-t", "hash", "-f", str(source), str(fresh)], check=True)
        fresh.rename(self.db.with_suffix(".db"))


@pytest.fixture(scope="module")
def pam_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PamService]:
    work = tmp_path_factory.mktemp("pam")
    work.chmod(0o755)
    gate = work / "gate"
    hold = work / "hold.sh"
    hold.write_text(
        "#!/bin/sh\n"
        f'echo "$PAM_USER $PAM_RHOST" >> "{work / "rhosts"}"\n'
        '[ "$PAM_USER" = slow ] || exit 0\n'
        "n=0\n"
        f'while [ ! -e "{gate}" ] && [ "$n" -lt 1200 ]; do sleep 0.05; n=$((n + 1)); done\n'
    )
    hold.chmod(0o755)
    assert OPENSSL is not None
    hashes = {
        name: subprocess.run(
            [OPENSSL, "passwd", "-6", "-stdin"],
            input=password,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for name, password in PASSWORDS.items()
    }
    service = PamService(f"socksd-test-{secrets.token_hex(4)}", work / "users", gate, hashes)
    service.write_db(*PASSWORDS)
    path = Path("/etc/pam.d") / service.name
    db = service.db
    path.write_text(
        f"auth optional pam_exec.so quiet {hold}\n"
        f"auth required pam_userdb.so db={db} crypt=crypt\n"
        f"account required pam_userdb.so db={db}\n"
    )
    try:
        yield service
    finally:
        path.unlink(missing_ok=True)
        gate.touch()


def pam_server(
    socksd: Callable[..., ServerProcess], tmp_path: Path, service: PamService, body: str = ""
) -> ServerProcess:
    server, _ = config_server(
        socksd,
        tmp_path,
        f'users = "{service.users}"\nprotocols = ["socks5", "http"]\n'
        f"auth_delay = 0.01\nmax_auth_delay = 0.05\n{body}",
        name=f"socksd-{secrets.token_hex(3)}.toml",
    )
    return server


def python_socks_login(server: ServerProcess, echo: EchoServer, user: str) -> None:
    """A login with python-socks, relayed to the echo server."""
    url = f"socks5://{user}:{PASSWORDS[user]}@{server.host}:{server.port}"
    with Proxy.from_url(url).connect("127.0.0.1", echo.port, timeout=30) as sock:
        echo_roundtrip(sock, f"hello {user}".encode())


def curl_socks(server: ServerProcess, http: HttpServer, user: str, password: str) -> bool:
    """curl through ``socks5h://user:password@`` to the HTTP server; True if it got the page."""
    result = run_curl(
        "--proxy", f"socks5h://{server.host}:{server.port}", "--proxy-user",
        f"{user}:{password}", http.url,
    )  # fmt: skip
    return result.returncode == 0 and result.stdout == HttpServer.body


def raw_login(server: ServerProcess, user: str, password: str) -> bytes:
    """An RFC 1929 login by hand; returns the 2-byte method reply and the 2-byte status."""
    with connect_from(server) as sock:
        sock.settimeout(30)
        sock.sendall(b"\x05\x01\x02" + userpass(user, password))
        return recv_exact(sock, 4)


@pytest.fixture(scope="module")
def http() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


@needs_pam
def test_logins_through_real_clients(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    pam_service: PamService,
    echo: EchoServer,
    http: HttpServer,
) -> None:
    server = pam_server(socksd, tmp_path, pam_service)
    assert curl_socks(server, http, "alice", PASSWORDS["alice"])
    python_socks_login(server, echo, "bob")
    # HTTP CONNECT with Proxy-Authorization: Basic, the same login path
    result = run_curl(
        "--proxytunnel", "--proxy", f"http://{server.host}:{server.port}",
        "--proxy-user", f"carol:{PASSWORDS['carol']}", http.url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == HttpServer.body
    assert "authentication failed" not in server.log()


@needs_pam
def test_a_wrong_password_is_refused_and_counted(
    socksd: Callable[..., ServerProcess], tmp_path: Path, pam_service: PamService, http: HttpServer
) -> None:
    server = pam_server(socksd, tmp_path, pam_service)
    assert raw_login(server, "alice", "wrong") == b"\x05\x02\x01\x01"
    wait_for_log(server, "authentication failed for user 'alice' from 127.0.0.1:")
    assert raw_login(server, "alice", PASSWORDS["alice"] + "\0") == b"\x05\x02\x01\x01"
    assert raw_login(server, "nobody", "x") == b"\x05\x02\x01\x01"
    log = wait_for_log(server, "(1 for the user, 3 from the address")
    assert "(2 for the user, 2 from the address" in log
    assert not curl_socks(server, http, "alice", "wrong")
    assert raw_login(server, "alice", PASSWORDS["alice"]) == b"\x05\x02\x01\x00"


@needs_pam
def test_the_client_address_reaches_pam_as_rhost(
    socksd: Callable[..., ServerProcess], tmp_path: Path, pam_service: PamService
) -> None:
    server = pam_server(socksd, tmp_path, pam_service, "users_cache_ttl = 0")
    assert raw_login(server, "carol", PASSWORDS["carol"]) == b"\x05\x02\x01\x00"
    assert "carol 127.0.0.1" in pam_service.rhosts.read_text().splitlines()


@needs_pam
def test_a_stack_that_cannot_decide_refuses_without_counting(
    socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """pam_exec of a command that fails answers PAM_SYSTEM_ERR: the store is unavailable. The
    logins are refused with the reason, and more of them than max_auth_failures block nobody."""
    name = f"socksd-test-{secrets.token_hex(4)}"
    path = Path("/etc/pam.d") / name
    path.write_text("auth required pam_exec.so quiet /bin/false\naccount required pam_permit.so\n")
    try:
        server, _ = config_server(
            socksd,
            tmp_path,
            f'users = "pam:{name}"\nmax_auth_failures = 2\nauth_block_time = 600\n'
            "auth_delay = 0.01\nmax_auth_delay = 0.05\n",
        )
        for n in range(4):
            assert raw_login(server, "alice", f"guess {n}") == b"\x05\x02\x01\x01"
        log = wait_for_log(server, "pam_authenticate: System error; not counted as a failed login")
        assert "the user store is unavailable (PAM service" in log
        assert "authentication failed" not in log
        assert "blocking" not in log
    finally:
        path.unlink(missing_ok=True)


@needs_pam
def test_a_removed_user_is_served_from_the_cache_until_its_lifetime_ends(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    pam_service: PamService,
    http: HttpServer,
) -> None:
    lasting = pam_server(socksd, tmp_path, pam_service, "users_cache_ttl = 3600")
    brief = pam_server(socksd, tmp_path, pam_service, "users_cache_ttl = 0.5")
    try:
        assert curl_socks(lasting, http, "carol", PASSWORDS["carol"])
        assert curl_socks(brief, http, "dave", PASSWORDS["dave"])
        pam_service.write_db("alice", "bob", "slow")  # carol and dave removed
        assert not curl_socks(lasting, http, "dave", PASSWORDS["dave"])  # never cached there
        # brief's cached login ends after half a second: then PAM is asked, and refuses
        assert wait_for(lambda: not curl_socks(brief, http, "dave", PASSWORDS["dave"]), 30)
        # ...while lasting still trusts carol's verified login, and only with her password
        assert curl_socks(lasting, http, "carol", PASSWORDS["carol"])
        assert not curl_socks(lasting, http, "carol", "singer2")
        assert "authentication failed for user 'dave'" in brief.log()
        assert "authentication failed for user 'carol'" in lasting.log()  # singer2 only
        assert lasting.log().count("authentication failed for user 'carol'") == 1
    finally:
        pam_service.write_db(*PASSWORDS)


@needs_pam
def test_a_hanging_pam_check_is_refused_at_its_timeout_uncounted_and_stalls_nobody(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    pam_service: PamService,
    http: HttpServer,
) -> None:
    server = pam_server(socksd, tmp_path, pam_service, "handshake_timeout = 4")
    pam_service.gate.unlink(missing_ok=True)
    with connect_from(server) as slow:
        slow.settimeout(30)
        slow.sendall(b"\x05\x01\x02" + userpass("slow", PASSWORDS["slow"]))
        assert recv_exact(slow, 2) == b"\x05\x02"
        # slow's check is held by pam_exec until the gate opens; others log in meanwhile
        assert curl_socks(server, http, "alice", PASSWORDS["alice"])
        assert curl_socks(server, http, "bob", PASSWORDS["bob"])
        assert not pam_service.gate.exists()
        # the check gets no answer within half the handshake timeout: the store is unavailable,
        # the login refused and not counted as a failed login
        assert recv_exact(slow, 2) == b"\x01\x01"
    text = wait_for_log(server, "refusing the login of 'slow'")
    line = next(ln for ln in text.splitlines() if "refusing the login of 'slow'" in ln)
    assert f"the user store is unavailable (PAM service {pam_service.name}" in line
    assert line.endswith("no answer within 2s; not counted as a failed login")
    assert "authentication failed for user 'slow'" not in server.log()
    # PAM still holds the check's thread: the server exits on SIGTERM all the same
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert not pam_service.gate.exists()


@needs_pam
def test_a_reload_switches_from_a_user_file_to_pam(
    socksd: Callable[..., ServerProcess], tmp_path: Path, pam_service: PamService, http: HttpServer
) -> None:
    users = tmp_path / "users"
    add_user(users, "alice", "from-the-file")
    server, path = config_server(socksd, tmp_path, f'users = "{users}"')
    assert curl_socks(server, http, "alice", "from-the-file")
    write_config(path, f'users = "{pam_service.users}"')
    server.proc.send_signal(signal.SIGHUP)
    line = wait_for_log(server, "reloaded configuration: methods userpass")
    assert f"PAM service {pam_service.name} (/etc/pam.d/{pam_service.name})" in line
    assert curl_socks(server, http, "alice", PASSWORDS["alice"])
    assert not curl_socks(server, http, "alice", "from-the-file")


def test_a_service_without_a_file_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path / "socksd.toml", 'users = "pam:socksd-test-no-such-service"')
    result = socksd_cli("check-config", str(path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert (
        "users: pam:socksd-test-no-such-service: no PAM service file "
        "/etc/pam.d/socksd-test-no-such-service" in lines[0]
    )
    result = socksd_cli("serve", "--listen", "127.0.0.1:0", "--users", "pam:socksd-x/../y")
    assert result.returncode != 0
    assert "users: pam:socksd-x/../y: a PAM service name is" in result.stderr


@needs_pam
def test_check_config_shows_the_pam_service(tmp_path: Path, pam_service: PamService) -> None:
    path = write_config(
        tmp_path / "socksd.toml", f'users = "{pam_service.users}"\nusers_cache_ttl = 60'
    )
    result = socksd_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        f"authentication: username/password, PAM service {pam_service.name} "
        f"(/etc/pam.d/{pam_service.name}), logins cached 60s" in result.stdout
    )
