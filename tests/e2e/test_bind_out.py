"""The outgoing address (issue 14): ``bind_out`` and a rule's ``via``, in a network namespace.

The namespace's ``lo`` holds two addresses of the proxy host per family (OUT_A/OUT_B,
OUT6_A/OUT6_B), the clients' (CLIENT_A, CLIENT_B) and the targets' (TARGET, TARGET6). Targets
report the address a connection or datagram came from, so each test sees where socksd sent
from: without ``bind_out`` the kernel would pick (for a target on ``lo``, its own address).
Real clients where they exist (curl for CONNECT), raw SOCKS5 for BIND and UDP ASSOCIATE.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.admin_support import access_line, run_curl, wait_log_count
from tests.e2e.support import (
    IO_TIMEOUT,
    UdpEchoServer,
    addr_bytes,
    parse_udp,
    read_reply,
    recv_exact,
    socksd_cli,
    udp_header,
)
from tests.netns import CLIENT_A, CLIENT_B, network_namespace
from tests.servers import ServerProcess, ThreadedTarget

OUT_A, OUT_B = "192.0.2.1", "192.0.2.2"
OUT6_A, OUT6_B = "2001:db8::1", "2001:db8::2"
TARGET, TARGET6 = "198.51.100.7", "2001:db8::7"
NOT_OURS = "192.0.2.99"
ADDRESSES = (OUT_A, OUT_B, OUT6_A, OUT6_B, CLIENT_A, CLIENT_B, TARGET, TARGET6)

TARGETS_RULE = f'[[rules]]\naction = "allow"\nto = ["{TARGET}/32", "{TARGET6}/128"]\n'
"""Targets on the proxy host's own ``lo``: opened for protect_local, as in test_remote."""


class PeerReporter(ThreadedTarget):
    """An HTTP/1.0 target whose body is the address the connection came from."""

    def handle(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        body = str(conn.getpeername()[0]).encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


@pytest.fixture
def netns() -> Iterator[str]:
    with network_namespace(ADDRESSES) as name:
        yield name


@pytest.fixture
def start(
    netns: str, socksd: Callable[..., ServerProcess], tmp_path: Path
) -> Callable[[str], tuple[ServerProcess, Path]]:
    """Start socksd on OUT_A with ``body`` in its config (open to the namespace's clients)."""

    def run(body: str) -> tuple[ServerProcess, Path]:
        path = tmp_path / "bind_out.toml"
        path.write_text(f'listen = ["{OUT_A}:0"]\nallow_open = true\n{body}\n')
        return socksd("--config", str(path)), path

    return run


@pytest.fixture
def targets(netns: str) -> Iterator[tuple[PeerReporter, PeerReporter]]:
    v4, v6 = PeerReporter(TARGET), PeerReporter(TARGET6)
    yield v4, v6
    v4.close()
    v6.close()


def seen_by(target: PeerReporter, server: ServerProcess, client: str = CLIENT_A) -> str:
    """The source address ``target`` saw for curl's request through ``server`` from
    ``client``."""
    done = run_curl("--socks5", f"{server.host}:{server.port}", "--interface", client, target.url)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def _open(server: ServerProcess, command: int, host: str, port: int) -> socket.socket:
    """A no-auth session from CLIENT_A that has sent one request (the reply is not read)."""
    sock = socket.create_connection((server.host, server.port), IO_TIMEOUT, (CLIENT_A, 0))
    sock.sendall(b"\x05\x01\x00")
    assert recv_exact(sock, 2) == b"\x05\x00"
    sock.sendall(bytes((5, command, 0)) + addr_bytes(host, port))
    return sock


def test_connect_leaves_from_bind_out_and_a_rule_via(
    start: Callable[[str], tuple[ServerProcess, Path]],
    targets: tuple[PeerReporter, PeerReporter],
) -> None:
    """curl through socksd: an IPv4 target sees bind_out's IPv4 address, an IPv6 target its
    IPv6 address; CLIENT_B, whose rule has ``via``, comes from the rule's addresses."""
    v4, v6 = targets
    via_rule = (
        f'[[rules]]\naction = "allow"\nclients = ["{CLIENT_B}/32"]\n'
        f'to = ["{TARGET}/32", "{TARGET6}/128"]\nvia = ["{OUT_A}", "{OUT6_A}"]\n'
    )
    server, _ = start(f'bind_out = ["{OUT_B}", "{OUT6_B}"]\n{via_rule}{TARGETS_RULE}')
    assert seen_by(v4, server) == OUT_B
    assert seen_by(v6, server) == OUT6_B
    assert seen_by(v4, server, CLIENT_B) == OUT_A
    assert seen_by(v6, server, CLIENT_B) == OUT6_A


def test_a_family_without_an_address_is_unreachable(
    start: Callable[[str], tuple[ServerProcess, Path]],
    targets: tuple[PeerReporter, PeerReporter],
) -> None:
    """bind_out with an IPv4 address only: an IPv6 target gets 0x03 (network unreachable), is
    not tried from another address, and the access log says why; IPv4 still works."""
    v4, v6 = targets
    server, _ = start(f'bind_out = "{OUT_B}"\n{TARGETS_RULE}')
    with _open(server, 1, TARGET6, v6.port) as sock:
        assert read_reply(sock)[0][1] == 3
    line = access_line(server, f"[{TARGET6}]:{v6.port}")
    assert "rep=0x03" in line and "bind_out has no IPv6 address" in line, line
    assert v6.peers == []
    assert seen_by(v4, server) == OUT_B


def test_bind_listens_on_bind_out(start: Callable[[str], tuple[ServerProcess, Path]]) -> None:
    """BIND's listener is on bind_out's address of the peer's family, which the first reply
    names; the peer connects there and is relayed. For any peer: the client's family."""
    server, _ = start(f'bind_out = ["{OUT_B}", "{OUT6_B}"]\n{TARGETS_RULE}')
    for expected, (host, family) in (
        (OUT_B, (TARGET, socket.AF_INET)),
        (OUT6_B, (TARGET6, socket.AF_INET6)),
        (OUT_B, ("0.0.0.0", socket.AF_INET)),
    ):
        with _open(server, 2, host, 0) as sock:
            raw, bhost, bport = read_reply(sock)
            assert raw[1] == 0, raw
            assert bhost == expected
            source = TARGET if family == socket.AF_INET else TARGET6
            with socket.create_connection((bhost, bport), IO_TIMEOUT, (source, 0)) as peer:
                second = read_reply(sock)
                assert second[0][1] == 0 and second[1] == source
                peer.sendall(b"from the peer")
                assert recv_exact(sock, 13) == b"from the peer"


def test_udp_datagrams_leave_from_bind_out(
    start: Callable[[str], tuple[ServerProcess, Path]],
) -> None:
    """UDP ASSOCIATE: datagrams reach the targets from bind_out's address of their family,
    the answers come back; the socket the client sends to stays on the address it came in
    on (BND.ADDR)."""
    server, _ = start(f'bind_out = ["{OUT_B}", "{OUT6_B}"]\n{TARGETS_RULE}')
    echo4, echo6 = UdpEchoServer(TARGET), UdpEchoServer(TARGET6)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(IO_TIMEOUT)
    udp.bind((CLIENT_A, 0))
    try:
        with _open(server, 3, "0.0.0.0", 0) as control:
            raw, bhost, bport = read_reply(control)
            assert raw[1] == 0 and bhost == OUT_A, raw
            for echo in (echo4, echo6):
                udp.sendto(udp_header(echo.host, echo.port) + b"ping", (bhost, bport))
                _, shost, sport, data = parse_udp(udp.recv(65535))
                assert (shost, sport, data) == (echo.host, echo.port, b"ping")
    finally:
        udp.close()
        echo4.close()
        echo6.close()
    assert [s[0] for s in echo4.sources] == [OUT_B]
    assert [s[0] for s in echo6.sources] == [OUT6_B]


def test_a_reload_changes_bind_out_for_new_sessions(
    start: Callable[[str], tuple[ServerProcess, Path]],
    targets: tuple[PeerReporter, PeerReporter],
) -> None:
    """SIGHUP with a new bind_out: the next session leaves from the new address; a reload
    naming an address this host does not have is refused, and the old one stays."""
    v4, _ = targets
    server, path = start(f'bind_out = "{OUT_B}"\n{TARGETS_RULE}')
    assert seen_by(v4, server) == OUT_B
    current = OUT_B
    for address, outcome in ((OUT_A, "reloaded configuration"), (NOT_OURS, "not an address")):
        text = path.read_text()
        path.write_text(text.replace(f'bind_out = "{current}"', f'bind_out = "{address}"'))
        current = address
        count = server.log().count(outcome)
        server.proc.send_signal(signal.SIGHUP)
        wait_log_count(server, outcome, count + 1)
    assert f"bind_out: {NOT_OURS} is not an address of this host" in server.log()
    assert seen_by(v4, server) == OUT_A


def test_an_address_not_on_this_host_is_a_config_error(netns: str, tmp_path: Path) -> None:
    """check-config and serve refuse a bind_out or a rule's via this host does not have, with
    one line naming the setting."""
    for body, key in (
        (f'bind_out = ["{OUT6_B}", "{NOT_OURS}"]', "bind_out"),
        (f'[[rules]]\naction = "allow"\nvia = "{NOT_OURS}"', "rule 1.via"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(f'listen = ["{OUT_A}:0"]\nallow_open = true\n{body}\n')
        for argv in (("check-config", str(path)), ("serve", "--config", str(path))):
            done = socksd_cli(*argv)
            assert done.returncode == 2
            lines = done.stderr.strip().splitlines()
            assert lines == [
                f"socksd: error: {key}: {NOT_OURS} is not an address of this host "
                "(Cannot assign requested address); give one `ip address` lists"
            ], done.stderr


def test_via_is_where_an_upstream_is_reached_from(
    start: Callable[[str], tuple[ServerProcess, Path]],
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    targets: tuple[PeerReporter, PeerReporter],
) -> None:
    """A rule with ``upstream`` and ``via``: socksd connects to the upstream from ``via``
    (the upstream's access log names that client); the upstream reaches the target."""
    v4, _ = targets
    upstream_conf = tmp_path / "upstream.toml"
    upstream_conf.write_text(f'listen = ["[{OUT6_A}]:0"]\nallow_open = true\n{TARGETS_RULE}\n')
    upstream = socksd("--config", str(upstream_conf))
    server, _ = start(
        f'[upstreams.up]\nproxy = "socks5://[{OUT6_A}]:{upstream.port}"\n'
        f'[[rules]]\naction = "allow"\nto = ["{TARGET}/32"]\nupstream = "up"\nvia = "{OUT6_B}"\n'
    )
    assert seen_by(v4, server) != ""
    line = access_line(upstream, f"{TARGET}:{v4.port}")
    assert f"[{OUT6_B}]:" in line.split()[1], line


def test_udp_through_an_upstream_leaves_from_via(
    start: Callable[[str], tuple[ServerProcess, Path]],
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
) -> None:
    """UDP ASSOCIATE by a rule with ``upstream`` and ``via``: the control connection and the
    datagrams to the upstream's relay both leave from ``via`` (the upstream takes datagrams
    only from its client's address), and the target sees the upstream's own address."""
    upstream_conf = tmp_path / "upstream.toml"
    upstream_conf.write_text(
        f'listen = ["[{OUT6_A}]:0"]\nallow_open = true\nbind_out = "{OUT_A}"\n{TARGETS_RULE}\n'
    )
    upstream = socksd("--config", str(upstream_conf))
    server, _ = start(
        f'[upstreams.up]\nproxy = "socks5://[{OUT6_A}]:{upstream.port}"\n'
        f'[[rules]]\naction = "allow"\ncommands = ["udp"]\nupstream = "up"\nvia = "{OUT6_B}"\n'
        f"{TARGETS_RULE}"
    )
    echo = UdpEchoServer(TARGET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(IO_TIMEOUT)
    udp.bind((CLIENT_A, 0))
    try:
        with _open(server, 3, "0.0.0.0", 0) as control:
            raw, bhost, bport = read_reply(control)
            assert raw[1] == 0, raw
            udp.sendto(udp_header(TARGET, echo.port) + b"ping", (bhost, bport))
            _, shost, sport, data = parse_udp(udp.recv(65535))
            assert (shost, sport, data) == (TARGET, echo.port, b"ping")
    finally:
        udp.close()
        echo.close()
    assert [s[0] for s in echo.sources] == [OUT_A]
    line = access_line(upstream, "UDP_ASSOCIATE")
    assert line.split()[1].startswith(f"[{OUT6_B}]:"), line
