"""socksd nodes behind a real HAProxy (TCP mode, PROXY protocol v2 and v1) on loopback.

HAProxy connects to the nodes from 127.0.0.9 (``source``), the only address the nodes trust
(``--proxy-protocol-from 127.0.0.9``); clients connect to HAProxy from 127.0.0.5 and 127.0.0.6.
So the node's peer is never the client, and everything that must see the client (access log,
per-address limit, UDP source, BIND) is checked against the client's own address.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from socksd.protocol.proxy_header import ProxyCommand, build_v1, build_v2
from tests.e2e.haproxy import BALANCER_SOURCE, HAProxy, start_haproxy
from tests.e2e.support import (
    IO_TIMEOUT,
    PASSWORD,
    USER,
    HttpServer,
    UdpEchoServer,
    assert_closed,
    echo_roundtrip,
    has_ipv6,
    parse_udp,
    read_reply,
    recv_exact,
    recv_until_eof,
    request,
    udp_header,
    userpass,
    wait_for_log,
)
from tests.helpers import wait_for
from tests.servers import EchoServer, ServerProcess, start_server

CLIENT_A = "127.0.0.5"
CLIENT_B = "127.0.0.6"
ADVERTISE = ("127.0.0.21", "127.0.0.22")
"""Each node's own address for UDP and BIND (the address HAProxy reaches them at is 127.0.0.1)."""


def access_records(server: ServerProcess) -> list[dict[str, object]]:
    """The JSON access-log lines of a node (``--log-format json``)."""
    out = []
    for line in server.log().splitlines():
        if line.startswith('{"time"') and '"bytes_up"' in line:
            out.append(json.loads(line))
    return out


def node(tmp_path: Path, *args: str) -> ServerProcess:
    return start_server(
        tmp_path, "--proxy-protocol-from", BALANCER_SOURCE, "--log-format", "json", *args
    )


def through(balancer: HAProxy, source: str) -> socket.socket:
    """A TCP connection to HAProxy from ``source``."""
    sock = socket.create_connection(
        (balancer.host, balancer.port), timeout=IO_TIMEOUT, source_address=(source, 0)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def socks_connect(
    sock: socket.socket, host: str, port: int, cmd: int = 1
) -> tuple[bytes, str, int]:
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(request(host, port, cmd))
    return read_reply(sock)


def curl(balancer: HAProxy, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            *extra,
            "--socks5-hostname",
            f"{balancer.host}:{balancer.port}",
            url,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def http() -> Iterator[HttpServer]:
    server = HttpServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[HAProxy, list[ServerProcess]]]:
    """Two nodes (each advertising an address of its own) behind HAProxy with send-proxy-v2."""
    tmp = tmp_path_factory.mktemp("fleet")
    nodes = [node(tmp, "--advertise", ADVERTISE[i]) for i in range(2)]
    balancer = None
    try:
        balancer = start_haproxy(tmp, [(n.host, n.port) for n in nodes])
        yield balancer, nodes
    finally:
        if balancer is not None:
            balancer.stop()
        for n in nodes:
            n.stop()


def test_curl_through_haproxy_logs_curls_address(
    fleet: tuple[HAProxy, list[ServerProcess]], http: HttpServer
) -> None:
    balancer, nodes = fleet
    for _ in range(2):  # round robin: both nodes
        result = curl(balancer, http.url, "--interface", CLIENT_A, "--local-port", "41000-41999")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("hello from the loopback http server")
    for n in nodes:
        wait_for(lambda n=n: any(r["command"] == "CONNECT" for r in access_records(n)))
        records = [r for r in access_records(n) if r["command"] == "CONNECT"]
        assert records, n.log()
        for record in records:
            host, _, port = str(record["client"]).rpartition(":")
            assert host == CLIENT_A, record
            assert 41000 <= int(port) <= 41999, record
            assert str(record["via"]).startswith(f"{BALANCER_SOURCE}:"), record
            assert record["reply"] == 0
    # HAProxy's health checks (PROXY LOCAL, then a reset) leave no access-log lines
    assert all(r["command"] is not None for n in nodes for r in access_records(n))


def test_send_proxy_v1(tmp_path: Path, http: HttpServer) -> None:
    n = node(tmp_path, "--log-level", "debug")
    balancer = start_haproxy(tmp_path, [(n.host, n.port)], send_proxy="send-proxy")
    try:
        result = curl(balancer, http.url, "--interface", CLIENT_B)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: any(r["command"] == "CONNECT" for r in access_records(n)))
        (record,) = [r for r in access_records(n) if r["command"] == "CONNECT"]
        assert str(record["client"]).startswith(f"{CLIENT_B}:"), record
        # HAProxy's checks (reset at once, or a v1 line naming their own addresses): no lines
        checks = ("the balancer's own connection", "connection reset before it was accepted")
        wait_for(lambda: sum(n.log().count(c) for c in checks) >= 3)
        assert all(r["command"] for r in access_records(n)), access_records(n)
    finally:
        balancer.stop()
        n.stop()


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_balancer_on_ipv6_wildcard(tmp_path: Path, http: HttpServer, send_proxy: str) -> None:
    """HAProxy on [::] sees IPv4 clients as ::ffff:127.0.0.5; the node logs 127.0.0.5."""
    if not has_ipv6():
        pytest.skip("no IPv6")
    n = node(tmp_path)
    balancer = start_haproxy(tmp_path, [(n.host, n.port)], send_proxy=send_proxy, bind="::")
    try:
        result = curl(balancer, http.url, "--interface", CLIENT_A)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: any(r["command"] == "CONNECT" for r in access_records(n)))
        (record,) = [r for r in access_records(n) if r["command"] == "CONNECT"]
        assert str(record["client"]).startswith(f"{CLIENT_A}:"), record
    finally:
        balancer.stop()
        n.stop()


def test_per_address_limit_counts_the_real_client(tmp_path: Path) -> None:
    """max_sessions_per_ip 1: one session each from two clients; a second from one is refused.
    (Without the header every session would come from HAProxy's one address.)"""
    n = node(tmp_path, "--max-sessions-per-ip", "1")
    echo = EchoServer()
    balancer = start_haproxy(tmp_path, [(n.host, n.port)])
    held: list[socket.socket] = []
    try:
        for client in (CLIENT_A, CLIENT_B):
            sock = through(balancer, client)
            held.append(sock)
            raw, _, _ = socks_connect(sock, "127.0.0.1", echo.port)
            assert raw[1] == 0
            echo_roundtrip(sock, client.encode())
        extra = through(balancer, CLIENT_A)
        held.append(extra)
        extra.sendall(b"\x05\x01\x00")
        assert recv_until_eof(extra) == b""  # closed at accept: no answer
        text = wait_for_log(n, "max_sessions_per_ip")
        assert f"refusing {CLIENT_A}:" in text
        for sock in held[:2]:  # the admitted ones go on
            echo_roundtrip(sock, b"still here")
    finally:
        for sock in held:
            sock.close()
        balancer.stop()
        n.stop()
        echo.close()


def test_login_block_hits_the_guessing_client_only(tmp_path: Path, users_file: Path) -> None:
    """auth_block blocks the address that failed, not the balancer's: another client behind the
    same HAProxy logs in."""
    n = node(
        tmp_path,
        "--users",
        str(users_file),
        "--auth-block",
        "--max-auth-failures",
        "2",
        "--auth-delay",
        "0",
    )
    balancer = start_haproxy(tmp_path, [(n.host, n.port)])

    def login(source: str, password: str) -> bytes:
        with through(balancer, source) as sock:
            sock.sendall(b"\x05\x01\x02")
            assert recv_exact(sock, 2) == b"\x05\x02"
            sock.sendall(userpass(USER, password))
            return recv_exact(sock, 2)

    try:
        for _ in range(2):
            assert login(CLIENT_A, "wrong") == b"\x01\x01"
        wait_for_log(n, f"blocking {CLIENT_A}")
        with through(balancer, CLIENT_A) as sock:  # blocked: closed at accept
            sock.sendall(b"\x05\x01\x02")
            assert recv_until_eof(sock) == b""
        assert login(CLIENT_B, PASSWORD) == b"\x01\x00"
    finally:
        balancer.stop()
        n.stop()


def test_header_from_an_untrusted_address_is_refused(
    fleet: tuple[HAProxy, list[ServerProcess]],
) -> None:
    """A PROXY header straight to a node from 127.0.0.1 (not a balancer) is a SOCKS protocol
    error: the claimed address is never used, and the log says why."""
    _, nodes = fleet
    n = nodes[0]
    for header in (
        build_v2(ProxyCommand.PROXY, ("192.0.2.66", 1234), ("127.0.0.1", n.port)),
        build_v1(("192.0.2.67", 1234), ("127.0.0.1", n.port)),
    ):
        with socket.create_connection((n.host, n.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(header + b"\x05\x01\x00")
            assert recv_until_eof(sock) == b"\x05\xff"  # the answer to a bad greeting
    text = wait_for_log(n, "not in proxy_protocol_from")
    assert "192.0.2.66" not in text and "192.0.2.67" not in text
    records = [r for r in access_records(n) if "proxy_protocol_from" in str(r["error"])]
    assert len(records) == 2
    assert all(str(r["client"]).startswith("127.0.0.1:") for r in records)


def test_balancer_without_a_header_is_closed(
    fleet: tuple[HAProxy, list[ServerProcess]],
) -> None:
    """From a trusted address the header is required: a bare SOCKS greeting is closed unanswered."""
    _, nodes = fleet
    n = nodes[1]
    with socket.create_connection(
        (n.host, n.port), timeout=IO_TIMEOUT, source_address=(BALANCER_SOURCE, 0)
    ) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert_closed(sock)
    wait_for_log(n, "PROXY protocol: not a PROXY protocol header: 05 01 00")


def test_udp_associate_through_haproxy(fleet: tuple[HAProxy, list[ServerProcess]]) -> None:
    """The datagrams go straight to the node's advertised address from the client's own, which
    the association expects (not HAProxy's)."""
    balancer, _ = fleet
    echo = UdpEchoServer()
    try:
        for _ in range(2):  # round robin: both nodes
            control = through(balancer, CLIENT_A)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with control, udp:
                udp.bind((CLIENT_A, 0))
                udp.settimeout(IO_TIMEOUT)
                raw, host, port = socks_connect(control, *udp.getsockname()[:2], cmd=3)
                assert raw[1] == 0
                assert host in ADVERTISE
                udp.sendto(udp_header("127.0.0.1", echo.port) + b"via the node", (host, port))
                answer, source = udp.recvfrom(65535)
                assert source == (host, port)
                assert parse_udp(answer)[3] == b"via the node"
    finally:
        echo.close()


def test_bind_through_haproxy_advertises_the_node(
    fleet: tuple[HAProxy, list[ServerProcess]],
) -> None:
    balancer, _ = fleet
    with through(balancer, CLIENT_A) as control:
        raw, host, port = socks_connect(control, "0.0.0.0", 0, cmd=2)
        assert raw[1] == 0
        assert host in ADVERTISE  # the node's own address, not 127.0.0.1 nor HAProxy's
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as peer:
            raw2, peer_host, _ = read_reply(control)
            assert raw2[1] == 0 and peer_host == "127.0.0.1"
            peer.sendall(b"from the peer")
            assert recv_exact(control, 13) == b"from the peer"


def test_node_killed_mid_run_leaves_the_other_serving(tmp_path: Path, http: HttpServer) -> None:
    nodes = [node(tmp_path), node(tmp_path)]
    balancer = start_haproxy(tmp_path, [(n.host, n.port) for n in nodes])
    try:
        assert curl(balancer, http.url, "--interface", CLIENT_A).returncode == 0
        nodes[0].proc.send_signal(signal.SIGKILL)  # by PID
        nodes[0].proc.wait(10)
        for _ in range(6):  # before and after HAProxy notices: retries go to the live node
            result = curl(balancer, http.url, "--interface", CLIENT_A)
            assert result.returncode == 0, result.stderr
        balancer.wait_states({"n1": "DOWN", "n2": "UP"})
        for _ in range(3):
            result = curl(balancer, http.url, "--interface", CLIENT_B)
            assert result.returncode == 0, result.stderr
        clients = {str(r["client"]).rpartition(":")[0] for r in access_records(nodes[1])}
        assert clients == {CLIENT_A, CLIENT_B}
    finally:
        balancer.stop()
        for n in nodes:
            n.stop()


def test_reload_changes_the_trusted_balancers(tmp_path: Path) -> None:
    """proxy_protocol_from is reloaded with SIGHUP: the next connection meets the new list."""
    config = tmp_path / "socksd.toml"
    config.write_text(f'listen = ["127.0.0.1:0"]\nproxy_protocol_from = ["{BALANCER_SOURCE}"]\n')
    n = start_server(tmp_path, "--config", str(config))
    echo = EchoServer()
    header = build_v2(ProxyCommand.PROXY, (CLIENT_A, 5000), ("127.0.0.1", n.port))

    def attempt() -> bytes:
        with socket.create_connection(
            (n.host, n.port), timeout=IO_TIMEOUT, source_address=(BALANCER_SOURCE, 0)
        ) as sock:
            sock.sendall(header + b"\x05\x01\x00")
            return recv_exact(sock, 2)

    try:
        assert attempt() == b"\x05\x00"
        wait_for_log(n, f"{CLIENT_A}:5000")
        config.write_text('listen = ["127.0.0.1:0"]\nproxy_protocol_from = []\n')
        n.proc.send_signal(signal.SIGHUP)
        wait_for_log(n, "reloaded configuration")
        assert attempt() == b"\x05\xff"
        wait_for_log(n, "not in proxy_protocol_from")
    finally:
        n.stop()
        echo.close()


def test_remote_client_via_a_loopback_balancer_is_not_a_loopback_client(
    tmp_path: Path,
) -> None:
    """HAProxy on the node's host connects over loopback; the client is remote (TEST-NET, in a
    network namespace). protect_local must treat it as remote: this host's loopback addresses
    are denied (REP 0x02), other destinations allowed."""
    from tests.netns import CLIENT_A as REMOTE
    from tests.netns import PROXY, TARGET, network_namespace

    config = tmp_path / "socksd.toml"
    config.write_text(  # TEST-NET targets are this namespace's own addresses: opened by a rule
        'listen = ["127.0.0.1:0"]\nproxy_protocol_from = ["127.0.0.1"]\nlog_format = "json"\n'
        f'[[rules]]\naction = "allow"\nto = ["{TARGET}/32"]\n'
    )
    with network_namespace():
        n = start_server(tmp_path, "--config", str(config))
        local_echo = EchoServer("127.0.0.1")
        remote_echo = EchoServer(TARGET)
        balancer = None
        try:
            balancer = start_haproxy(tmp_path, [(n.host, n.port)], source="127.0.0.1", bind=PROXY)
            with through(balancer, REMOTE) as sock:
                raw, _, _ = socks_connect(sock, "127.0.0.1", local_echo.port)
                assert raw[1] == 2, raw  # not allowed: protect_local
            with through(balancer, REMOTE) as sock:
                raw, _, _ = socks_connect(sock, TARGET, remote_echo.port)
                assert raw[1] == 0, raw
                echo_roundtrip(sock, b"remote")
            wait_for(lambda: len([r for r in access_records(n) if r["command"]]) >= 2)
            records = [r for r in access_records(n) if r["command"]]
            assert [r["rule"] for r in records] == ["protect_local", "1"]
            assert all(str(r["client"]).startswith(f"{REMOTE}:") for r in records)
        finally:
            if balancer is not None:
                balancer.stop()
            n.stop()
            local_echo.close()
            remote_echo.close()


# -- the header on the wire, straight from the balancer's address (no HAProxy) -------------------


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A node trusting 127.0.0.9, with a short handshake timeout."""
    n = node(tmp_path_factory.mktemp("direct"), "--handshake-timeout", "1")
    yield n
    n.stop()


def from_balancer(n: ServerProcess) -> socket.socket:
    sock = socket.create_connection(
        (n.host, n.port), timeout=IO_TIMEOUT, source_address=(BALANCER_SOURCE, 0)
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def test_header_split_in_single_bytes(direct: ServerProcess) -> None:
    """The header may arrive in pieces: each byte its own segment, the greeting after it."""
    echo = EchoServer()
    header = build_v1(("127.0.0.44", 4444), ("127.0.0.1", direct.port))
    try:
        with from_balancer(direct) as sock:
            for i in range(len(header)):
                sock.sendall(header[i : i + 1])
            raw, _, _ = socks_connect(sock, "127.0.0.1", echo.port)
            assert raw[1] == 0
            echo_roundtrip(sock, b"split")
        wait_for(lambda: any(r["client"] == "127.0.0.44:4444" for r in access_records(direct)))
    finally:
        echo.close()


def test_local_header_then_socks(direct: ServerProcess) -> None:
    """A LOCAL header (a health check that goes on with SOCKS) is the balancer's own session."""
    echo = EchoServer()
    try:
        with from_balancer(direct) as sock:
            sock.sendall(build_v2(ProxyCommand.LOCAL))
            raw, _, _ = socks_connect(sock, "127.0.0.1", echo.port)
            assert raw[1] == 0
            echo_roundtrip(sock, b"check")
        wait_for(
            lambda: any(
                str(r["client"]).startswith(f"{BALANCER_SOURCE}:") and r["command"] == "CONNECT"
                for r in access_records(direct)
            )
        )
    finally:
        echo.close()


def test_v1_line_with_the_connections_own_addresses_is_a_check(direct: ServerProcess) -> None:
    """A v1 health check names its own connection (the spec asks so of checks): its end is
    no access-log line; a line naming another client that ends the same way is one."""
    before = len(access_records(direct))
    with from_balancer(direct) as sock:
        own = sock.getsockname()[:2]
        sock.sendall(build_v1(own, (direct.host, direct.port)))
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    with from_balancer(direct) as sock:
        sock.sendall(build_v1(("127.0.0.45", 4545), (direct.host, direct.port)))
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    wait_for(lambda: len(access_records(direct)) > before)
    new = access_records(direct)[before:]
    assert [r["client"] for r in new] == ["127.0.0.45:4545"], new


def test_incomplete_header_times_out_or_ends(direct: ServerProcess) -> None:
    with from_balancer(direct) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1")
        assert recv_until_eof(sock, timeout=IO_TIMEOUT) == b""  # the 1 s handshake timeout
    wait_for_log(direct, "PROXY protocol: no complete PROXY header within 1s")
    with from_balancer(direct) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.1")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    wait_for_log(direct, "PROXY protocol: closed before a complete PROXY header")
    # a connect-only health check (no byte, then FIN): neither a warning nor an access-log line
    errors = len([r for r in access_records(direct) if r["error"]])
    with from_balancer(direct) as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    with from_balancer(direct) as sock:  # a later session, to know the check's end was handled
        sock.sendall(b"PROXY UNKNOWN\r\n\x05")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    wait_for(lambda: len([r for r in access_records(direct) if r["error"]]) > errors)
    new = [r for r in access_records(direct) if r["error"]][errors:]
    assert [r["error"] for r in new] == [
        "protocol error: connection closed in the middle of a message"
    ], new


def test_workers_behind_haproxy(tmp_path: Path, http: HttpServer) -> None:
    """With --workers 2 every worker reads the header (the setting reaches each worker)."""
    n = node(tmp_path, "--workers", "2")
    balancer = start_haproxy(tmp_path, [(n.host, n.port)])
    try:
        for _ in range(4):
            result = curl(balancer, http.url, "--interface", CLIENT_B)
            assert result.returncode == 0, result.stderr
        wait_for(lambda: len([r for r in access_records(n) if r["command"]]) >= 4)
        records = [r for r in access_records(n) if r["command"]]
        assert {str(r["client"]).rpartition(":")[0] for r in records} == {CLIENT_B}
    finally:
        balancer.stop()
        n.stop()
