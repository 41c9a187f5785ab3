"""GSSAPI (RFC 1961) end to end, against a real Kerberos KDC on loopback (tests/krb5.py).

socksd's own client through socksd's server at each protection level, with a tap on the wire
proving what is encrypted; failures (no ticket, wrong service, tampered and replayed messages, a
replayed session) end only their session; method preference; configuration errors. Interop with
Dante is in test_dante_gssapi.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from socksd.client import (
    AuthenticationError,
    ClientHandshake,
    GssapiOptions,
    Proxy,
    ProxyConnectionError,
    create_connection,
    create_gssapi_connection,
    open_connection,
)
from socksd.protocol import Address, Command, State
from tests.e2e.support import (
    IO_TIMEOUT,
    PASSWORD,
    USER,
    SourceServer,
    UdpEchoServer,
    access_lines,
    connect_proxy,
    parse_udp,
    random_bytes,
    recv_exact,
    recv_until_eof,
    rss_kb,
    socksd_cli,
    udp_header,
    wait_for,
    wait_for_log,
)
from tests.e2e.wiretap import Tap
from tests.krb5 import HOST, TestRealm
from tests.servers import EchoServer, ServerProcess

PRINCIPAL = "user@KRBTEST.COM"
MARKER = b"<<plain text marker 0123456789 abcdefghijklmnopqrstuvwxyz>>"


@pytest.fixture(scope="module")
def realm(krb5_realm: TestRealm) -> TestRealm:
    return krb5_realm


@pytest.fixture(scope="module")
def gss_server(module_socksd: Callable[..., ServerProcess], realm: TestRealm) -> ServerProcess:
    """socksd requiring GSSAPI with the realm's keytab, all levels accepted; short failed-login
    delays, as its tests fail contexts on purpose (test_login_throttle.py covers the delays)."""
    return module_socksd(
        "--gssapi-keytab", str(realm.keytab), "--log-level", "debug",
        "--auth-delay", "0.01", "--max-auth-delay", "0.1", env=realm.env,
    )  # fmt: skip


class LogWatch:
    """Waits for new occurrences of a log line (the module's servers log many sessions)."""

    def __init__(self, server: ServerProcess, *needles: str) -> None:
        self.server = server
        self.counts = {needle: server.log().count(needle) for needle in needles}

    def wait(self, timeout: float = 10.0) -> str:
        def more() -> bool:
            text = self.server.log()
            return all(text.count(n) > before for n, before in self.counts.items())

        assert wait_for(more, timeout), f"no new {list(self.counts)} in:\n{self.server.log()}"
        return self.server.log()


def gss_proxy(server: ServerProcess | int, level: int = 2, **options: Any) -> Proxy:
    port = server if isinstance(server, int) else server.port
    return Proxy("127.0.0.1", port, gssapi=GssapiOptions(hostname=HOST, level=level, **options))


@pytest.fixture
def tap(gss_server: ServerProcess) -> Iterator[Tap]:
    t = Tap(gss_server.port)
    yield t
    t.close()


async def async_echo(proxy: Proxy, port: int, payload: bytes) -> bytes:
    """Send ``payload`` through ``proxy`` to an echo server, half-close, read all back."""
    reader, writer = await open_connection(proxy, "127.0.0.1", port, timeout=30)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(60):
            return await reader.read()
    finally:
        writer.close()


def blocking_echo(proxy: Proxy, port: int, payload: bytes) -> bytes:
    with create_gssapi_connection(proxy, ("127.0.0.1", port), timeout=30) as sock:
        sock.settimeout(60)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := sock.recv(1 << 20):
            out += chunk
        return bytes(out)


# -- each protection level, data checked, encryption seen on the wire ---------------------------


@pytest.mark.parametrize("level", [1, 2, 3])
def test_asyncio_client_each_level(
    gss_server: ServerProcess, tap: Tap, module_echo: EchoServer, level: int
) -> None:
    payload = random_bytes(300_000, seed=level) + MARKER + random_bytes(200_000, seed=9)
    proxy = gss_proxy(tap.port, level)
    assert asyncio.run(async_echo(proxy, module_echo.port, payload)) == payload
    tap.close()
    # level 1 protects integrity only: the marker crosses the wire in clear; 2 and 3 encrypt it
    assert (MARKER in tap.up) is (level == 1)
    assert (MARKER in tap.down) is (level == 1)
    assert tap.up[:3] == b"\x05\x01\x01"  # greeting offers GSSAPI only
    log = wait_for_log(gss_server, f"protection level {level} (asked {level})")
    assert PRINCIPAL in log
    wait_for_log(
        gss_server,
        f"user={PRINCIPAL} CONNECT 127.0.0.1:{module_echo.port} -> 127.0.0.1:{module_echo.port} "
        f"rep=0x00 up={len(payload)} down={len(payload)}",
    )


@pytest.mark.parametrize("level", [1, 2])
def test_blocking_client(gss_server: ServerProcess, module_echo: EchoServer, level: int) -> None:
    payload = random_bytes(150_000, seed=level + 10)
    assert blocking_echo(gss_proxy(gss_server, level), module_echo.port, payload) == payload


def test_selective_level_mixes_per_message(
    gss_server: ServerProcess, tap: Tap, module_echo: EchoServer
) -> None:
    """Level 3: the client chooses per message; the server takes both kinds."""
    clear, secret = b"CLEAR:" + MARKER, b"SECRET:" + MARKER[::-1]
    proxy = gss_proxy(tap.port, 3)
    with create_gssapi_connection(proxy, ("127.0.0.1", module_echo.port)) as gs:
        assert gs.codec.level == 3
        gs.sock.sendall(gs.codec.encode(clear, confidential=False))
        gs.sock.sendall(gs.codec.encode(secret, confidential=True))
        gs.settimeout(IO_TIMEOUT)
        got = b""
        while len(got) < len(clear + secret):
            got += gs.recv(65536)
        assert got == clear + secret
    tap.close()
    assert clear in tap.up
    assert secret not in tap.up
    assert clear not in tap.down  # socksd encrypts everything it sends at level 3


def test_large_transfer_is_chunked_to_the_token_limit(
    gss_server: ServerProcess, module_echo: EchoServer
) -> None:
    payload = random_bytes(3_000_000, seed=3)
    got = asyncio.run(async_echo(gss_proxy(gss_server, 1), module_echo.port, payload))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def test_half_close_through_gssapi(gss_server: ServerProcess) -> None:
    target = EchoServer(mode="halfclose")
    try:
        payload = random_bytes(500_000, seed=4)
        got = asyncio.run(async_echo(gss_proxy(gss_server, 2), target.port, payload))
        assert got == hashlib.sha256(payload).hexdigest().encode()
    finally:
        target.close()


# -- protection-level negotiation ------------------------------------------------------------------


@pytest.fixture(scope="module")
def level2_server(module_socksd: Callable[..., ServerProcess], realm: TestRealm) -> ServerProcess:
    return module_socksd(
        "--gssapi-keytab", str(realm.keytab), "--gssapi-levels", "2", "--log-level", "debug",
        env=realm.env,
    )  # fmt: skip


def test_server_requiring_confidentiality_upgrades_a_level_1_client(
    level2_server: ServerProcess, module_echo: EchoServer
) -> None:
    proxy = gss_proxy(level2_server, 1)  # accepts 1 and stronger
    with create_gssapi_connection(proxy, ("127.0.0.1", module_echo.port)) as gs:
        assert gs.codec.level == 2
        gs.sendall(b"upgraded")
        gs.settimeout(IO_TIMEOUT)
        assert gs.recv(100) == b"upgraded"
    wait_for_log(level2_server, "protection level 2 (asked 1)")


def test_client_refuses_a_level_it_does_not_accept(
    level2_server: ServerProcess, module_echo: EchoServer
) -> None:
    proxy = gss_proxy(level2_server, 1, accept_levels=[1])
    with pytest.raises(AuthenticationError, match="chose protection level 2"):
        asyncio.run(async_echo(proxy, module_echo.port, b"x"))
    assert level2_server.alive()


# -- failures: refused cleanly, server alive ---------------------------------------------------------


def assert_server_still_serves(server: ServerProcess, echo: EchoServer) -> None:
    assert server.alive()
    assert blocking_echo(gss_proxy(server, 2), echo.port, b"still here") == b"still here"


def test_client_without_ticket(
    gss_server: ServerProcess,
    module_echo: EchoServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'no-such-ccache'}")
    watch = LogWatch(gss_server, "the peer aborted the GSSAPI negotiation")
    with pytest.raises(AuthenticationError, match="gss_init_sec_context"):
        asyncio.run(async_echo(gss_proxy(gss_server), module_echo.port, b"x"))
    watch.wait()  # the client told the server with the abort message
    monkeypatch.undo()
    assert_server_still_serves(gss_server, module_echo)


@pytest.mark.parametrize(
    ("service", "side"),
    [
        ("host", "server"),  # socksd holds host/localhost's key but serves rcmd only
        ("socks", "server"),
        ("nokey", "server"),  # the KDC issues a ticket; no keytab has its key
        ("nosuch", "client"),  # the KDC knows no such service: no ticket at all
    ],
)
def test_wrong_service_name(
    gss_server: ServerProcess, module_echo: EchoServer, service: str, side: str
) -> None:
    before = len(module_echo.peers)
    proxy = gss_proxy(gss_server, 2, service=service)
    if side == "server":
        with pytest.raises(AuthenticationError, match="proxy refused the GSSAPI authentication"):
            asyncio.run(async_echo(proxy, module_echo.port, b"x"))
        text = wait_for_log(gss_server, f"{service}/localhost@KRBTEST.COM")
        assert "GSSAPI authentication of 127.0.0.1:" in text
    else:
        with pytest.raises(AuthenticationError, match="not found in Kerberos database"):
            asyncio.run(async_echo(proxy, module_echo.port, b"x"))
    assert len(module_echo.peers) == before
    assert_server_still_serves(gss_server, module_echo)


def _gss_socket(server: ServerProcess, echo: EchoServer, level: int = 2) -> Any:
    gs = create_gssapi_connection(gss_proxy(server, level), ("127.0.0.1", echo.port))
    gs.settimeout(IO_TIMEOUT)
    return gs


def _raw_until_eof(gs: Any) -> bytes:
    """What the server sends on the raw connection until it closes (encoded bytes)."""
    return recv_until_eof(gs.sock, timeout=10)


@pytest.mark.parametrize("level", [1, 2])
def test_tampered_message_ends_the_session(
    gss_server: ServerProcess, module_echo: EchoServer, level: int
) -> None:
    watch = LogWatch(gss_server, "GSSAPI session ended: gss_unwrap", 'error="GSSAPI: gss_unwrap')
    with _gss_socket(gss_server, module_echo, level) as gs:
        gs.sendall(b"first, intact")
        assert recv_exact_plain(gs, 13) == b"first, intact"
        frame = bytearray(gs.codec.encode(b"second, tampered"))
        frame[-3] ^= 0x20
        gs.sock.sendall(frame)
        assert _raw_until_eof(gs) == b"\x01\xff"
    text = watch.wait()
    assert "second, tampered" not in text
    assert_server_still_serves(gss_server, module_echo)


def test_replayed_message_ends_the_session(
    gss_server: ServerProcess, module_echo: EchoServer
) -> None:
    watch = LogWatch(gss_server, "GSSAPI session ended: gss_unwrap")
    with _gss_socket(gss_server, module_echo) as gs:
        frame = gs.codec.encode(b"pay me 100")
        gs.sock.sendall(bytes(frame))
        assert recv_exact_plain(gs, 10) == b"pay me 100"
        gs.sock.sendall(bytes(frame))  # the very same token again
        assert _raw_until_eof(gs) == b"\x01\xff"
    assert "duplicate" in watch.wait().lower()
    assert_server_still_serves(gss_server, module_echo)


def test_reordered_messages_end_the_session(
    gss_server: ServerProcess, module_echo: EchoServer
) -> None:
    with _gss_socket(gss_server, module_echo) as gs:
        first, second = gs.codec.encode(b"one"), gs.codec.encode(b"two")
        gs.sock.sendall(second + first)
        assert _raw_until_eof(gs) == b"\x01\xff"
    assert_server_still_serves(gss_server, module_echo)


def recv_exact_plain(gs: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = gs.recv(n - len(out))
        assert chunk, f"closed after {out!r}"
        out += chunk
    return out


def test_tampered_request_gets_the_abort_message(
    gss_server: ServerProcess, module_echo: EchoServer
) -> None:
    """The encapsulated request itself is verified before it is parsed."""
    before = len(module_echo.peers)
    watch = LogWatch(gss_server, "protocol error: gss_unwrap")
    hs = ClientHandshake(
        Command.CONNECT,
        Address.of("127.0.0.1", module_echo.port),
        gssapi=GssapiOptions(hostname=HOST),
        proxy_host=HOST,
    )
    with connect_proxy(gss_server) as sock:
        while True:
            out = hs.data_to_send()
            if hs.conn.state is State.REPLY:  # ``out`` is the encapsulated request
                tampered = bytearray(out)
                tampered[-1] ^= 0x01
                sock.sendall(tampered)
                break
            if out:
                sock.sendall(out)
            if hs.step_pending:
                hs.run_step()
                continue
            hs.receive_data(sock.recv(65536))
        assert recv_until_eof(sock, timeout=10) == b"\x01\xff"
    watch.wait()
    assert len(module_echo.peers) == before
    assert_server_still_serves(gss_server, module_echo)


def test_replayed_session_is_refused(
    gss_server: ServerProcess, tap: Tap, module_echo: EchoServer
) -> None:
    """Everything a client sent, replayed on a new connection, never reaches the target."""
    assert blocking_echo(gss_proxy(tap.port, 2), module_echo.port, b"original") == b"original"
    tap.close()
    recorded = bytes(tap.up)
    before = len(module_echo.peers)
    with connect_proxy(gss_server) as sock:
        sock.sendall(recorded)
        answer = recv_until_eof(sock, timeout=10)
    assert answer.startswith(b"\x05\x01")
    assert answer.endswith(b"\x01\xff")
    assert len(module_echo.peers) == before
    assert_server_still_serves(gss_server, module_echo)


def test_garbage_after_method_selection(gss_server: ServerProcess) -> None:
    with connect_proxy(gss_server) as sock:
        sock.sendall(b"\x05\x01\x01")
        assert recv_exact(sock, 2) == b"\x05\x01"
        sock.sendall(b"\x01\x01\x00\x05hello")  # not a Kerberos token
        assert recv_until_eof(sock, timeout=10) == b"\x01\xff"
        assert gss_server.alive()


def test_client_offering_no_gssapi_is_refused(gss_server: ServerProcess) -> None:
    with connect_proxy(gss_server) as sock:
        sock.sendall(b"\x05\x02\x00\x02")
        assert recv_until_eof(sock, timeout=10) == b"\x05\xff"


# -- method preference -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "selected", "user"),
    [("gssapi,userpass", 0x01, PRINCIPAL), ("userpass,gssapi", 0x02, USER)],
)
def test_method_preference(
    socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    users_file: Path,
    module_echo: EchoServer,
    order: str,
    selected: int,
    user: str,
) -> None:
    server = socksd(
        "--gssapi-keytab", str(realm.keytab), "--users", str(users_file), "--methods", order,
        env=realm.env,
    )  # fmt: skip
    for offer in (b"\x05\x02\x01\x02", b"\x05\x02\x02\x01"):  # the client's order does not matter
        with connect_proxy(server) as sock:
            sock.sendall(offer)
            assert recv_exact(sock, 2) == bytes((5, selected))
    # socksd's client offering both gets the server's preference
    proxy = Proxy(
        "127.0.0.1", server.port, USER, PASSWORD, gssapi=GssapiOptions(hostname=HOST, level=2)
    )
    reader_writer = asyncio.run(_echo_and_close(proxy, module_echo.port))
    assert reader_writer == b"preferred"
    wait_for_log(server, f"user={user} CONNECT 127.0.0.1:{module_echo.port}")


async def _echo_and_close(proxy: Proxy, port: int) -> bytes:
    reader, writer = await open_connection(proxy, "127.0.0.1", port, timeout=30)
    writer.write(b"preferred")
    data = await asyncio.wait_for(reader.readexactly(9), IO_TIMEOUT)
    writer.close()
    return data


def test_gssapi_service_name(
    socksd: Callable[..., ServerProcess], realm: TestRealm, module_echo: EchoServer
) -> None:
    server = socksd(
        "--gssapi-keytab", str(realm.keytab), "--gssapi-service", "socks", env=realm.env
    )
    ok = gss_proxy(server, 2, service="socks")
    assert blocking_echo(ok, module_echo.port, b"socks service") == b"socks service"
    with pytest.raises(AuthenticationError):
        blocking_echo(gss_proxy(server, 2), module_echo.port, b"rcmd refused")


def test_config_file_keys(
    socksd: Callable[..., ServerProcess], realm: TestRealm, tmp_path: Path, module_echo: EchoServer
) -> None:
    realm.add_keytab(tmp_path / "socks.keytab", "socks")
    config = tmp_path / "socksd.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\n'
        'methods = ["gssapi"]\n'
        'gssapi_keytab = "socks.keytab"  # relative to the config file\n'
        'gssapi_service = "socks"\n'
        "gssapi_levels = [2]\n"
    )
    server = socksd("--config", str(config), env=realm.env)
    proxy = gss_proxy(server, 1, service="socks")
    with create_gssapi_connection(proxy, ("127.0.0.1", module_echo.port)) as gs:
        assert gs.codec.level == 2


def test_keytab_from_the_environment(
    socksd: Callable[..., ServerProcess], realm: TestRealm, module_echo: EchoServer
) -> None:
    """No --gssapi-keytab: the usual KRB5_KTNAME is used (with --gssapi-service or --methods)."""
    server = socksd("--methods", "gssapi", env={**realm.env, "KRB5_KTNAME": str(realm.keytab)})
    assert blocking_echo(gss_proxy(server), module_echo.port, b"ktname") == b"ktname"


def test_exposed_listen_with_gssapi_needs_no_allow_open(
    socksd: Callable[..., ServerProcess], realm: TestRealm, module_echo: EchoServer
) -> None:
    server = socksd("--listen", "0.0.0.0:0", "--gssapi-keytab", str(realm.keytab), env=realm.env)
    assert blocking_echo(gss_proxy(server), module_echo.port, b"exposed") == b"exposed"


# -- configuration errors ----------------------------------------------------------------------------


def serve_error(*args: str, env: dict[str, str] | None = None) -> str:
    argv = [sys.executable, "-m", "socksd", "serve", "--listen", "127.0.0.1:0", *args]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, check=False, env=env or dict(os.environ)
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("socksd: error: ")
    return lines[0]


def test_config_errors(realm: TestRealm, tmp_path: Path, users_file: Path) -> None:
    keytab = str(realm.keytab)
    assert "gssapi_keytab: /nope is not a readable file" in serve_error("--gssapi-keytab", "/nope")
    empty = realm.add_keytab(tmp_path / "other.keytab", "socks")
    line = serve_error("--gssapi-keytab", str(empty))
    assert "gssapi_keytab: no acceptor credentials for rcmd@<host>" in line
    assert "methods: userpass needs a user file" in serve_error("--methods", "userpass")
    assert "not one of gssapi, userpass, none" in serve_error("--methods", "kerberos")
    assert "each method once" in serve_error("--methods", "none,none")
    line = serve_error("--gssapi-keytab", keytab, "--methods", "none")
    assert line.startswith("socksd: error: gssapi_keytab/gssapi_service: set but methods")
    line = serve_error("--users", str(users_file), "--methods", "none")
    assert line.startswith("socksd: error: users: a user file is given")
    assert "gssapi_levels: '4' is not a protection level" in serve_error(
        "--gssapi-keytab", keytab, "--gssapi-levels", "1,4"
    )
    assert "gssapi_service: 'rcmd@host'" in serve_error("--gssapi-service", "rcmd@host")
    line = serve_error(
        "--listen", "0.0.0.0:0", "--gssapi-keytab", keytab, "--methods", "gssapi,none"
    )
    assert "open proxy" in line


def test_missing_gssapi_package_is_one_clear_line(realm: TestRealm, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "gssapi.py").write_text("raise ImportError('simulated: no gssapi here')\n")
    pythonpath = os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])
    line = serve_error(
        "--gssapi-keytab", str(realm.keytab), env={**os.environ, "PYTHONPATH": pythonpath}
    )
    assert "methods: gssapi needs the Python package 'gssapi'" in line
    assert "pip install 'socksd[gssapi]'" in line


def test_help_lists_the_gssapi_flags() -> None:
    out = socksd_cli("serve", "--help").stdout
    for flag in ("--methods", "--gssapi-keytab", "--gssapi-service", "--gssapi-levels"):
        assert flag in out


def test_client_without_gssapi_proxy_settings_rejects_blocking_gssapi_call() -> None:
    with pytest.raises(ValueError, match="create_gssapi_connection"):
        create_connection(gss_proxy(1), ("127.0.0.1", 1))
    with pytest.raises(ValueError, match="create_connection"):
        create_gssapi_connection("127.0.0.1:1", ("127.0.0.1", 1))


def test_proxy_connection_error_type() -> None:
    assert issubclass(ProxyConnectionError, ConnectionError)


def test_gssapi_with_two_workers(
    socksd: Callable[..., ServerProcess], realm: TestRealm, module_echo: EchoServer
) -> None:
    """Each worker process acquires its own credentials and runs its own thread pool."""
    server = socksd("--gssapi-keytab", str(realm.keytab), "--workers", "2", env=realm.env)
    for i in range(6):
        payload = b"worker round %d" % i
        assert blocking_echo(gss_proxy(server, 1 + i % 2), module_echo.port, payload) == payload


def test_slow_reader_does_not_grow_memory(gss_server: ServerProcess) -> None:
    """Backpressure as in the plain relay: a client not reading pauses the target."""
    size = 30 * 1024 * 1024
    source = SourceServer(random_bytes(size, seed=5))
    try:
        proxy = gss_proxy(gss_server, 1)
        with create_gssapi_connection(proxy, ("127.0.0.1", source.port)) as gs:  # warm-up
            assert recv_all(gs) == source.data
        with create_gssapi_connection(proxy, ("127.0.0.1", source.port)) as gs:
            gs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            before = peak = rss_kb(gss_server.proc.pid)
            for _ in range(20):  # 2 s without reading
                time.sleep(0.1)
                peak = max(peak, rss_kb(gss_server.proc.pid))
            data = recv_all(gs)
    finally:
        source.close()
    assert hashlib.sha256(data).hexdigest() == source.digest
    assert peak - before < 8 * 1024, f"socksd RSS grew by {peak - before} kB while paused"


def recv_all(gs: Any) -> bytes:
    gs.settimeout(60)
    out = bytearray()
    while chunk := gs.recv(1 << 20):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("level", [1, 2])
def test_bind_over_gssapi(gss_server: ServerProcess, level: int) -> None:
    """BIND after GSSAPI: both replies come wrapped, then the peer's connection is relayed with
    RFC 1961 encapsulation on the client's side (level 2: the marker never crosses in clear);
    a frame the client sends before the peer connects reaches the peer first."""
    from socksd.client.connect import GssapiSocket, handshake_over_socket

    proxy = gss_proxy(gss_server, level)
    hs = ClientHandshake(
        Command.BIND, Address.of("127.0.0.1", 0), gssapi=proxy.gssapi, proxy_host=proxy.host
    )
    hs.first_reply_only()
    tap = Tap(gss_server.port)
    try:
        with socket.create_connection(("127.0.0.1", tap.port), timeout=IO_TIMEOUT) as sock:
            handshake_over_socket(sock, hs)
            assert hs.encapsulation is not None
            first = hs.replies[0].address
            sock.sendall(hs.encapsulation.encode(b"early "))  # kept until the peer connects
            with socket.create_connection((first.host, first.port), timeout=IO_TIMEOUT) as peer:
                hs.expect_second_reply()
                while not hs.done:
                    chunk = sock.recv(65536)
                    hs.receive_data(chunk)
                second = hs.replies[1].address
                assert (second.host, second.port) == peer.getsockname()[:2]
                gs = GssapiSocket(sock, hs.encapsulation, hs.trailing_data())
                gs.sendall(MARKER + b" up")
                assert recv_exact(peer, 6 + len(MARKER) + 3) == b"early " + MARKER + b" up"
                peer.sendall(MARKER + b" down")
                peer.shutdown(socket.SHUT_WR)
                assert recv_all(gs) == MARKER + b" down"
                gs.shutdown(socket.SHUT_WR)
                assert recv_until_eof(peer) == b""
    finally:
        tap.close()
    seen = bytes(tap.up + tap.down)
    if level == 2:
        assert MARKER not in seen
    else:
        assert MARKER in seen  # integrity only: the tap does see the bytes


@pytest.mark.parametrize("level", [1, 2])
def test_udp_associate_over_gssapi(gss_server: ServerProcess, level: int) -> None:
    """UDP ASSOCIATE after GSSAPI: each datagram is one RFC 1961 frame around the SOCKS UDP
    datagram, both ways; tampered, unencapsulated and replayed datagrams are dropped and counted
    as ``gssapi``, and the association goes on after them; one after a lost datagram or overtaken
    by a later one is good and relayed."""
    from socksd.client.connect import handshake_over_socket

    echo = UdpEchoServer()
    proxy = gss_proxy(gss_server, level)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(IO_TIMEOUT)
    hs = ClientHandshake(
        Command.UDP_ASSOCIATE,
        Address.of("127.0.0.1", udp.getsockname()[1]),
        gssapi=proxy.gssapi,
        proxy_host=proxy.host,
    )
    header = udp_header("127.0.0.1", echo.port)
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=IO_TIMEOUT) as control:
            cport = control.getsockname()[1]
            handshake_over_socket(control, hs)
            codec = hs.encapsulation
            assert codec is not None
            bound = hs.replies[0].address
            relay = (bound.host, bound.port)

            def echo_through(payload: bytes) -> bytes:
                udp.sendto(codec.encode_datagram(header + payload), relay)
                raw, _ = udp.recvfrom(65535)
                if MARKER in payload:
                    assert (MARKER not in raw) is (level == 2)
                frag, host, port, data = parse_udp(codec.decode_datagram(raw))
                assert (frag, host, port) == (0, "127.0.0.1", echo.port)
                return data

            assert echo_through(MARKER + b" 1") == MARKER + b" 1"
            good = codec.encode_datagram(header + MARKER + b" 2")
            tampered = bytearray(good)
            tampered[-1] ^= 0x01
            udp.sendto(bytes(tampered), relay)  # dropped: fails verification
            udp.sendto(header + b"plain", relay)  # dropped: not encapsulated
            udp.sendto(good, relay)  # the genuine one still passes: the bad ones changed nothing
            raw, _ = udp.recvfrom(65535)
            assert parse_udp(codec.decode_datagram(raw))[3] == MARKER + b" 2"
            late = codec.encode_datagram(header + b"late")  # overtaken by the next one

            def sent_back(datagram: bytes) -> bytes:
                udp.sendto(datagram, relay)
                raw, _ = udp.recvfrom(65535)
                return parse_udp(codec.decode_datagram(raw))[3]

            # GSS_S_GAP_TOKEN, then GSS_S_UNSEQ_TOKEN: good datagrams, relayed
            assert sent_back(codec.encode_datagram(header + b"after a gap")) == b"after a gap"
            assert sent_back(late) == b"late"
            udp.sendto(good, relay)  # a replay (GSS_S_DUPLICATE_TOKEN): dropped
            assert echo_through(b"after the replay") == b"after the replay"
            assert echo.received == 5
        line = wait_for_access_line(gss_server, f":{cport} ")
        assert "dgrams_up=5 dgrams_down=5 dropped=3(gssapi=3)" in line, line
    finally:
        udp.close()
        echo.close()


def wait_for_access_line(server: ServerProcess, needle: str) -> str:
    def found() -> list[str]:
        return [line for line in access_lines(server) if needle in line]

    wait_for(lambda: bool(found()), 10)
    lines = found()
    assert lines, f"no access-log line with {needle!r}:\n{server.log()}"
    return lines[-1]
