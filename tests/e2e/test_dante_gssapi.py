"""GSSAPI interop with Dante, an implementation no one here wrote, over a real KDC.

Debian's dante packages are built without GSSAPI, so ``scripts/build-dante-gssapi.sh`` builds
Debian's own source package with it (cached outside the repository; ``scripts/test.sh`` runs it
first, and these tests skip when it has not been built). Both directions, at protection levels 1
and 2, data checked and the wire tapped:

* Dante's client library (LD_PRELOAD of libdsocksd.so into ncat, SOCKS_CONF with
  ``method: gssapi``) through socksd's server;
* socksd's client library through Dante's server (sockd).

Dante's deviations, tolerated by socksd's server and not copied: it never sends the abort message
(it just closes), refuses level 3, and offers a "clear" level 0 outside the RFC (after which its
client, if not configured for the level socksd answers, goes on unprotected: socksd refuses that).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from socksd.client import GssapiOptions, Proxy, create_gssapi_connection
from tests.e2e.support import IO_TIMEOUT, random_bytes, wait_for, wait_for_log
from tests.e2e.wiretap import Tap
from tests.krb5 import HOST, TestRealm
from tests.servers import EchoServer, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-dante-gssapi.sh"
MARKER = b"<<dante interop plain text marker 0123456789>>"
LEVEL_NAMES = {1: "integrity", 2: "confidentiality"}


@dataclass(frozen=True)
class Dante:
    """The GSSAPI-enabled Dante build."""

    prefix: Path

    @property
    def sockd(self) -> Path:
        return self.prefix / "sbin" / "sockd"

    @property
    def libdsocks(self) -> Path:
        return self.prefix / "lib" / "libdsocksd.so"


@pytest.fixture(scope="session")
def dante() -> Dante:
    """The Dante build that scripts/test.sh made; skip when there is none (the script, not a
    fixture, builds it: minutes, and it reports its own failures)."""
    result = subprocess.run(
        [str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        pytest.skip(
            f"Dante with GSSAPI is not built ({result.stderr.strip()}): "
            "run scripts/build-dante-gssapi.sh, or scripts/test.sh, which runs it first"
        )
    return Dante(Path(result.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def realm(krb5_realm: TestRealm) -> TestRealm:
    return krb5_realm


@pytest.fixture(scope="module")
def gss_server(module_socksd: Callable[..., ServerProcess], realm: TestRealm) -> ServerProcess:
    return module_socksd(
        "--gssapi-keytab", str(realm.keytab), "--log-level", "debug", env=realm.env
    )


@pytest.fixture
def tap(gss_server: ServerProcess) -> Iterator[Tap]:
    t = Tap(gss_server.port)
    yield t
    t.close()


# -- Dante's client library through socksd -----------------------------------------------------


def dante_client(
    dante: Dante,
    realm: TestRealm,
    tmp_path: Path,
    proxy_port: int,
    target_port: int,
    payload: bytes,
    enctype: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """ncat to 127.0.0.1:target_port under Dante's client library, via the proxy on proxy_port."""
    conf = tmp_path / "socks.conf"
    conf.write_text(
        f"logoutput: {tmp_path / 'dante-client.log'}\n"
        "route {\n"
        f"  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {proxy_port}\n"
        "  protocol: tcp\n"
        "  proxyprotocol: socks_v5\n"
        "  method: gssapi\n"
        "  gssapi.servicename: rcmd\n"
        f"  gssapi.enctype: {enctype}\n"
        "}\n"
    )
    client_env = {
        **os.environ,
        **realm.env,
        "SOCKS_CONF": str(conf),
        # Dante goes direct to the addresses of local interfaces (loopback too) unless told not to
        "SOCKS_AUTOADD_LANROUTES": "no",
        "LD_PRELOAD": str(dante.libdsocks),
        **(env or {}),
    }
    return subprocess.run(
        ["ncat", "127.0.0.1", str(target_port)],
        input=payload,
        env=client_env,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("level", [1, 2])
def test_dante_client_through_socksd(
    dante: Dante,
    realm: TestRealm,
    gss_server: ServerProcess,
    tap: Tap,
    module_echo: EchoServer,
    tmp_path: Path,
    level: int,
) -> None:
    payload = random_bytes(400_000, seed=20 + level) + MARKER + random_bytes(100_000, seed=7)
    result = dante_client(
        dante, realm, tmp_path, tap.port, module_echo.port, payload, LEVEL_NAMES[level]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == payload
    tap.close()
    assert (MARKER in tap.up) is (level == 1)
    assert (MARKER in tap.down) is (level == 1)
    wait_for_log(gss_server, f"authenticated user@KRBTEST.COM, protection level {level}")
    wait_for_log(
        gss_server,
        f"user=user@KRBTEST.COM CONNECT 127.0.0.1:{module_echo.port} -> "
        f"127.0.0.1:{module_echo.port} rep=0x00 up={len(payload)} down={len(payload)}",
    )


def test_dante_clear_level_is_never_relayed_unprotected(
    dante: Dante,
    realm: TestRealm,
    gss_server: ServerProcess,
    module_echo: EchoServer,
    tmp_path: Path,
) -> None:
    """Dante offers "clear" (0, not in the RFC): socksd answers level 2; Dante, configured for
    clear only, ignores the answer and sends its request unprotected; socksd refuses it."""
    before = len(module_echo.peers)
    result = dante_client(
        dante, realm, tmp_path, gss_server.port, module_echo.port, b"clear?", "clear"
    )
    assert result.returncode != 0
    assert result.stdout == b""
    wait_for_log(gss_server, "protection level 2 (asked 0)")
    wait_for_log(gss_server, "GSSAPI message version 0x05, expected 0x01")
    assert len(module_echo.peers) == before
    assert gss_server.alive()


def test_dante_client_without_ticket_just_closes(
    dante: Dante,
    realm: TestRealm,
    gss_server: ServerProcess,
    module_echo: EchoServer,
    tmp_path: Path,
) -> None:
    """Dante sends no abort message when it cannot start a context: socksd just logs the close."""
    needle = 'error="client closed during handshake"'
    before = gss_server.log().count(needle)
    result = dante_client(
        dante,
        realm,
        tmp_path,
        gss_server.port,
        module_echo.port,
        b"no ticket",
        "integrity",
        env={"KRB5CCNAME": f"FILE:{tmp_path / 'empty-ccache'}"},
    )
    assert result.returncode != 0
    assert result.stdout == b""
    assert wait_for(lambda: gss_server.log().count(needle) > before, 10), gss_server.log()
    assert gss_server.alive()


# -- socksd's client library through Dante's server ----------------------------------------------


SOCKD_CONF = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: gssapi
clientmethod: none
{users}client pass {{
  from: 127.0.0.0/8 to: 0.0.0.0/0
  gssapi.keytab: FILE:{keytab}
  gssapi.servicename: rcmd
  gssapi.enctype: integrity confidentiality
}}
socks pass {{
  from: 127.0.0.0/8 to: 0.0.0.0/0
  command: connect
  log: connect disconnect error
}}
"""


def listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # 0A: LISTEN
            found.add(fields[9])
    return found


def holds_socket(pid: int, inodes: set[str]) -> bool:
    """True when process ``pid`` has one of the sockets ``inodes`` open."""
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link[len("socket:[") : -1] in inodes for link in links if link.startswith("socket:"))


def sockd_settled(proc: subprocess.Popen[bytes], port: int) -> bool:
    """sockd has exited, or it listens on ``port`` itself (not some other process)."""
    if proc.poll() is not None:
        return True
    return holds_socket(proc.pid, listening_inodes(port))


@pytest.fixture(scope="module")
def sockd(
    dante: Dante, realm: TestRealm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    """Dante's server requiring GSSAPI (levels 1 and 2) with the realm's keytab; yields its port.

    Dante cannot listen on port 0, so a port is picked and sockd started on it; only a listener
    that sockd itself holds counts, and a port taken meanwhile by another process means another
    try on another port."""
    tmp = tmp_path_factory.mktemp("sockd")
    users = "user.privileged: root\nuser.unprivileged: root\n" if os.geteuid() == 0 else ""
    for attempt in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        log = tmp / f"sockd-{attempt}.log"
        conf = tmp / "sockd.conf"
        conf.write_text(SOCKD_CONF.format(log=log, port=port, users=users, keytab=realm.keytab))
        proc = subprocess.Popen(
            [str(dante.sockd), "-f", str(conf), "-N", "1", "-p", str(tmp / "sockd.pid")],
            env={**os.environ, **realm.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            if wait_for(partial(sockd_settled, proc, port), 15) and proc.poll() is None:
                yield port
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            if "in use" not in text:
                raise RuntimeError(f"sockd did not start:\n{text}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    raise RuntimeError("sockd found its port taken five times")


@pytest.mark.parametrize("level", [1, 2])
def test_socksd_client_through_dante(sockd: int, module_echo: EchoServer, level: int) -> None:
    tap = Tap(sockd)
    payload = random_bytes(300_000, seed=30 + level) + MARKER
    proxy = Proxy("127.0.0.1", tap.port, gssapi=GssapiOptions(hostname=HOST, level=level))
    with create_gssapi_connection(proxy, ("127.0.0.1", module_echo.port)) as gs:
        assert gs.codec.level == level
        gs.settimeout(IO_TIMEOUT)
        gs.sendall(payload)
        gs.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := gs.recv(1 << 20):
            got += chunk
    assert bytes(got) == payload
    tap.close()
    assert (MARKER in tap.up) is (level == 1)
    assert (MARKER in tap.down) is (level == 1)


def test_dante_refuses_level_3_by_closing(sockd: int, module_echo: EchoServer) -> None:
    proxy = Proxy("127.0.0.1", sockd, gssapi=GssapiOptions(hostname=HOST, level=3))
    with pytest.raises(ConnectionError):
        create_gssapi_connection(proxy, ("127.0.0.1", module_echo.port))
    # Dante is still serving
    proxy = Proxy("127.0.0.1", sockd, gssapi=GssapiOptions(hostname=HOST, level=2))
    with create_gssapi_connection(proxy, ("127.0.0.1", module_echo.port)) as gs:
        gs.settimeout(IO_TIMEOUT)
        gs.sendall(b"after level 3")
        assert gs.recv(100) == b"after level 3"
