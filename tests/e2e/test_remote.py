"""Clients that are not on loopback (issue 11, defects 2 and 4), in a network namespace.

``tests.netns`` gives each test a namespace whose ``lo`` holds TEST-NET addresses: socksd listens
on PROXY (192.0.2.1), clients come from CLIENT_A/CLIENT_B (192.0.2.10/11), targets sit on TARGET
(198.51.100.7). Those are all this host's own addresses inside the namespace, so
``protect_local`` (on, as by default) guards them: the configs open TARGET's network with an
allow rule listing it in ``to``, as an admin would for a service on the proxy host. Nothing
leaves the namespace.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.admin_support import access_line, wait_log_count
from tests.e2e.support import (
    IO_TIMEOUT,
    UdpEchoServer,
    access_lines,
    add_user,
    addr_bytes,
    echo_roundtrip,
    parse_udp,
    read_reply,
    recv_exact,
    recv_until_eof,
    udp_header,
    wait_for,
)
from tests.netns import CLIENT_A, CLIENT_B, PROXY, TARGET
from tests.servers import EchoServer, ServerProcess

OPEN_TARGETS = '[[rules]]\naction = "allow"\nto = ["198.51.100.0/24"]\n'


@pytest.fixture
def remote_server(
    netns: str, socksd: Callable[..., ServerProcess], tmp_path: Path
) -> Callable[[str], tuple[ServerProcess, Path]]:
    """Start socksd on PROXY, open to the namespace's clients, with ``body`` in its config."""

    def start(body: str) -> tuple[ServerProcess, Path]:
        path = tmp_path / "remote.toml"
        path.write_text(f'listen = ["{PROXY}:0"]\nallow_open = true\n{body}\n')
        return socksd("--config", str(path)), path

    return start


def _open(server: ServerProcess, source: str, command: int, host: str, port: int) -> socket.socket:
    """A no-auth session from ``source`` that has sent one request (the reply is not read)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.bind((source, 0))
    sock.connect((server.host, server.port))
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(bytes((5, command, 0)) + addr_bytes(host, port))
    return sock


def _udp_socket(source: str) -> socket.socket:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(3)
    udp.bind((source, 0))
    return udp


@pytest.mark.parametrize("declared", ["0.0.0.0", "own"])
def test_udp_associate_from_a_remote_client(
    remote_server: Callable[[str], tuple[ServerProcess, Path]], declared: str
) -> None:
    """Defect 2: a remote client's UDP ASSOCIATE for 0.0.0.0:0 (what most clients send) or for
    its own address is served; its datagrams are relayed to an allowed target."""
    server, _ = remote_server(OPEN_TARGETS)
    echo = UdpEchoServer(TARGET)
    udp = _udp_socket(CLIENT_A)
    host, port = ("0.0.0.0", 0) if declared == "0.0.0.0" else udp.getsockname()
    try:
        with _open(server, CLIENT_A, 3, host, port) as control:
            raw, bhost, bport = read_reply(control)
            assert raw[1] == 0, raw
            assert bhost == PROXY
            udp.sendto(udp_header(TARGET, echo.port) + b"ping", (bhost, bport))
            _, shost, sport, data = parse_udp(udp.recv(65535))
            assert (shost, sport, data) == (TARGET, echo.port, b"ping")
    finally:
        udp.close()
        echo.close()


def test_bind_for_any_peer_from_a_remote_client(
    remote_server: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """Defect 2: BIND 0.0.0.0:0 from a remote client gets its first reply (the address it came
    in on); the peer that connects is checked by the rules: one protect_local denies is refused
    and logged, the allowed one is relayed."""
    server, _ = remote_server(OPEN_TARGETS)
    with _open(server, CLIENT_A, 2, "0.0.0.0", 0) as sock:
        raw, bhost, bport = read_reply(sock)
        assert raw[1] == 0, raw
        assert bhost == PROXY
        with socket.create_connection((bhost, bport), IO_TIMEOUT, (CLIENT_B, 0)) as denied:
            assert recv_until_eof(denied) == b""
        wait_log_count(server, "denied by protect_local", 1)
        with socket.create_connection((bhost, bport), IO_TIMEOUT, (TARGET, 0)) as peer:
            second, phost, pport = read_reply(sock)
            assert second[1] == 0
            assert (phost, pport) == peer.getsockname()[:2]
            peer.sendall(b"from the peer")
            assert recv_exact(sock, 13) == b"from the peer"
            sock.sendall(b"to the peer")
            assert recv_exact(peer, 11) == b"to the peer"
    assert "refused a connection from 192.0.2.11" in server.log()


def test_bind_for_a_denied_destination_is_still_refused(
    remote_server: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """A named peer the rules deny is refused at the request, as before (0x02)."""
    server, _ = remote_server("")
    with _open(server, CLIENT_A, 2, TARGET, 0) as sock:
        assert read_reply(sock)[0][1] == 2


def test_udp_associate_refused_by_a_rule_without_destination(
    remote_server: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """A rule that holds whatever the destination (here: no UDP for CLIENT_B) still denies."""
    server, _ = remote_server(
        '[[rules]]\naction = "deny"\nclients = ["192.0.2.11"]\ncommands = ["udp"]\n'
    )
    with _open(server, CLIENT_B, 3, "0.0.0.0", 0) as sock:
        assert read_reply(sock)[0][1] == 2
    with _open(server, CLIENT_A, 3, "0.0.0.0", 0) as sock:
        assert read_reply(sock)[0][1] == 0


def test_reload_reaches_open_udp_associations(
    remote_server: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """Defect 4: a deny rule added by a reload stops datagrams to an IP literal an open
    association has already sent to, and to a name (hosts map); the association goes on."""
    hosts = '[hosts]\n"echo.test" = ["198.51.100.7"]\n'
    server, path = remote_server(hosts + OPEN_TARGETS)
    echo = UdpEchoServer(TARGET)
    udp = _udp_socket(CLIENT_A)
    try:
        with _open(server, CLIENT_A, 3, "0.0.0.0", 0) as control:
            raw, bhost, bport = read_reply(control)
            assert raw[1] == 0, raw
            relay = (bhost, bport)
            for target in (TARGET, "echo.test"):
                udp.sendto(udp_header(target, echo.port) + b"before", relay)
                assert parse_udp(udp.recv(65535))[3] == b"before"
            deny = f'[[rules]]\naction = "deny"\nto = ["{TARGET}/32"]\n'
            path.write_text(path.read_text().replace("[[rules]]", deny + "[[rules]]", 1))
            before = server.log().count("reloaded configuration")
            server.proc.send_signal(signal.SIGHUP)
            wait_log_count(server, "reloaded configuration", before + 1)
            for target in (TARGET, "echo.test"):
                udp.sendto(udp_header(target, echo.port) + b"after", relay)
            with pytest.raises(TimeoutError):
                udp.recv(65535)
            assert echo.received == 2
    finally:
        udp.close()
        echo.close()
    line = access_line(server, "UDP_ASSOCIATE")
    assert "denied=2" in line, line


def test_connect_from_a_remote_client_and_protect_local(
    remote_server: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """The baseline the others rely on: a remote client reaches an allowed target, and
    protect_local still denies it the proxy's own address."""
    server, _ = remote_server(OPEN_TARGETS)
    target = EchoServer(TARGET)
    try:
        with _open(server, CLIENT_A, 1, TARGET, target.port) as sock:
            assert read_reply(sock)[0][1] == 0
            echo_roundtrip(sock, b"remote")
        with _open(server, CLIENT_A, 1, PROXY, server.port) as sock:
            assert read_reply(sock)[0][1] == 2
    finally:
        target.close()


def _code(server: ServerProcess, source: str, host: str, port: int) -> int:
    with _open(server, source, 1, host, port) as sock:
        return read_reply(sock)[0][1]


def test_protect_local_from_other_machines(
    netns: str, socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """protect_local: a remote client is denied the proxy host's loopback, own and link-local
    addresses whatever an allow rule without them in ``to`` or a name says; a rule listing the
    network opens just that; ``protect_local = false`` opens them all; loopback clients are
    not concerned."""
    loop, own = EchoServer("127.0.0.1"), EchoServer(PROXY)
    requests = {
        "127.0.0.1": loop.port,
        PROXY: own.port,
        "localhost": loop.port,
        "169.254.169.254": 80,
        "0.0.0.0": loop.port,
    }
    scenarios = {
        "default": "",
        "allow_clients": '[[rules]]\naction = "allow"\nclients = ["192.0.2.0/24"]',
        "allow_listed": f'[[rules]]\naction = "allow"\nto = ["127.0.0.1/32"]\nports = ["{loop.port}"]',
        "allow_name": '[[rules]]\naction = "allow"\nto = ["localhost"]',
        "off": "protect_local = false",
    }
    codes: dict[str, dict[str, int]] = {}
    try:
        for name, body in scenarios.items():
            path = tmp_path / f"{name}.toml"
            path.write_text(f'listen = ["{PROXY}:0"]\nallow_open = true\n{body}\n')
            server = socksd("--config", str(path))
            codes[name] = {host: _code(server, CLIENT_A, host, p) for host, p in requests.items()}
            codes[name]["loopback client"] = _code(server, "127.0.0.1", "127.0.0.1", loop.port)
            if name == "default":
                assert access_line(server, "0.0.0.0:").count("rule=protect_local") == 1
            server.stop()
    finally:
        loop.close()
        own.close()
    assert codes["default"] == {**dict.fromkeys(requests, 2), "loopback client": 0}
    assert codes["allow_clients"] == codes["default"]
    assert codes["allow_name"] == codes["default"]
    listed = codes["allow_listed"]
    assert listed["127.0.0.1"] == 0
    assert listed[PROXY] == 2 and listed["169.254.169.254"] == 2
    off = codes["off"]
    assert off["127.0.0.1"] == 0 and off[PROXY] == 0 and off["localhost"] == 0
    assert off["169.254.169.254"] != 2  # not there: 0x03, 0x04 or 0x06, never "not allowed"


def _login(server: ServerProcess, source: str, offered: bytes) -> tuple[socket.socket, int]:
    """Connect from ``source``, offer ``offered``; log in as alice when 0x02 is chosen."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.bind((source, 0))
    sock.connect((server.host, server.port))
    sock.sendall(bytes((5, len(offered))) + offered)
    method = recv_exact(sock, 2)[1]
    if method == 2:
        sock.sendall(b"\x01\x05alice\x06s3cret")
        assert recv_exact(sock, 2) == b"\x01\x00"
    return sock, method


def _probe(server: ServerProcess, echo_port: int) -> dict[str, object]:
    """What a remote client meets: methods, reply codes by destination and command, the hosts
    map, the per-address session limit."""
    seen: dict[str, object] = {}
    logged = len(access_lines(server))
    for offered in (b"\x00", b"\x02", b"\x00\x02"):
        sock, method = _login(server, CLIENT_A, offered)
        sock.close()
        seen[f"method {offered.hex()}"] = method
    requests = {
        "connect target": (1, TARGET, echo_port),
        "connect name": (1, "echo.test", echo_port),
        "connect other port": (1, TARGET, 9),
        "connect proxy itself": (1, PROXY, server.port),
        "bind any": (2, "0.0.0.0", 0),
        "udp": (3, "0.0.0.0", 0),
    }
    for label, (command, host, port) in requests.items():
        sock, method = _login(server, CLIENT_A, b"\x00\x02")
        with sock:
            if method == 0xFF:
                seen[label] = "no method"
                continue
            sock.sendall(bytes((5, command, 0)) + addr_bytes(host, port))
            seen[label] = read_reply(sock)[0][1]
    # every session above has ended (and given its count back) before the limit is probed
    assert wait_for(lambda: len(access_lines(server)) >= logged + 3 + len(requests))
    held = [_login(server, CLIENT_A, b"\x00\x02")[0] for _ in range(3)]
    try:
        sock, _ = _login(server, CLIENT_A, b"\x00\x02")
        with sock:
            sock.sendall(bytes((5, 1, 0)) + addr_bytes(TARGET, echo_port))
            seen["4th session"] = read_reply(sock)[0][1]
    except (OSError, AssertionError):
        seen["4th session"] = "closed"
    finally:
        for sock in held:
            sock.close()
    return seen


def test_a_reload_gives_the_server_a_fresh_start_would(
    netns: str, socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Issue 11: every setting a remote client can meet is the same after SIGHUP with a new
    config as in a server started with that config: methods, users, rules and protect_local,
    the hosts map, the commands served, the per-address limit."""
    users = tmp_path / "users"
    add_user(users, "alice", "s3cret")
    target = EchoServer(TARGET)
    before = f'listen = ["{PROXY}:0"]\nallow_open = true\n{OPEN_TARGETS}'
    after = (
        f'listen = ["{PROXY}:0"]\nusers = "{users}"\ncommands = ["connect", "udp"]\n'
        "max_sessions_per_ip = 3\n"
        '[hosts]\n"echo.test" = ["198.51.100.7"]\n'
        f'[[rules]]\naction = "allow"\nto = ["198.51.100.0/24"]\nports = ["{target.port}"]\n'
    )
    try:
        reloaded_path = tmp_path / "reloaded.toml"
        reloaded_path.write_text(before)
        reloaded = socksd("--config", str(reloaded_path))
        initial = _probe(reloaded, target.port)
        reloaded_path.write_text(after)
        count = reloaded.log().count("reloaded configuration")
        reloaded.proc.send_signal(signal.SIGHUP)
        wait_log_count(reloaded, "reloaded configuration", count + 1)
        fresh_path = tmp_path / "fresh.toml"
        fresh_path.write_text(after)
        fresh = socksd("--config", str(fresh_path))
        expected = _probe(fresh, target.port)
        assert _probe(reloaded, target.port) == expected
    finally:
        target.close()
    assert expected != initial
    assert expected["method 00"] == 0xFF and expected["method 0002"] == 2
    assert expected["connect name"] == 0 and expected["connect other port"] == 2
    assert expected["bind any"] == 7 and expected["4th session"] == "closed"
