"""BIND end to end on loopback: two replies, the expected peer, timeouts, relay; IPv4 and IPv6.

The FTP-like test plays active-mode FTP: the client reaches an "FTP server" through CONNECT, asks
the proxy to BIND, sends the first reply's address in a PORT command, and the server connects
back to it with the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import threading
from collections.abc import Callable

import pytest

import socksd.client as socksd_client
from tests.e2e.support import (
    IO_TIMEOUT,
    _ThreadedTarget,
    access_lines,
    assert_closed,
    connect_proxy,
    failure_reply,
    handshake,
    has_ipv6,
    random_bytes,
    read_reply,
    recv_exact,
    recv_until_eof,
    request,
    socks_open,
    wait_for,
    wait_for_log,
)
from tests.servers import ServerProcess, StubDns

FILE = random_bytes(300_000, seed=3)


class ActiveFtpServer(_ThreadedTarget):
    """An FTP-like server: reads ``PORT host port`` on its control connection, connects there
    (from ``data_source`` when given), sends FILE on that connection, then ``226 sent`` on the
    control connection."""

    def __init__(self, host: str = "127.0.0.1", data_source: str | None = None) -> None:
        self.data_source = data_source
        self.data_peers: list[tuple[str, int]] = []
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"220 ready\n")
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(1)
            if not chunk:
                return
            line += chunk
        _, host, port = line.decode().split()
        data = socket.create_connection(
            (host, int(port)),
            timeout=IO_TIMEOUT,
            source_address=(self.data_source, 0) if self.data_source else None,
        )
        with data:
            self.data_peers.append(data.getsockname()[:2])
            data.sendall(FILE)
        conn.sendall(b"226 sent\n")


@pytest.fixture(scope="module")
def bind_server(module_socksd: Callable[..., ServerProcess]) -> ServerProcess:
    return module_socksd()


@pytest.fixture(scope="module")
def bind_server6(module_socksd: Callable[..., ServerProcess]) -> ServerProcess:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    return module_socksd("--listen", "[::1]:0")


def bind_request(
    server: ServerProcess, host: str, port: int = 0
) -> tuple[socket.socket, bytes, str, int]:
    """Handshake + BIND; return (socket, first reply, BND host, BND port)."""
    sock = connect_proxy(server)
    handshake(sock)
    sock.sendall(request(host, port, cmd=2))
    raw, bhost, bport = read_reply(sock)
    return sock, raw, bhost, bport


def port_is_free(host: str, port: int) -> bool:
    """True when nothing holds ``host:port`` (the BIND listener is closed); connects nowhere."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def last_bind_line(server: ServerProcess) -> str:
    wait_for(lambda: any(" BIND " in line for line in access_lines(server)), 10)
    lines = [line for line in access_lines(server) if " BIND " in line]
    assert lines, server.log()
    return lines[-1]


# -- FTP-like active mode ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ftp_like_active_mode(
    bind_server: ServerProcess, bind_server6: ServerProcess, family: str
) -> None:
    host = "127.0.0.1" if family == "ipv4" else "::1"
    server = bind_server if family == "ipv4" else bind_server6
    ftp = ActiveFtpServer(host)
    try:
        with socks_open(server, host, ftp.port) as control:
            assert recv_exact(control, 10) == b"220 ready\n"
            data_sock, raw, bhost, bport = bind_request(server, host, 0)
            with data_sock:
                assert raw[1] == 0, raw.hex()
                assert raw[3] == (1 if family == "ipv4" else 4)
                assert bhost == host  # the local address on the route to the FTP server
                control.sendall(f"PORT {bhost} {bport}\n".encode())
                second, phost, pport = read_reply(data_sock)
                assert second[1] == 0, second.hex()
                assert wait_for(lambda: len(ftp.data_peers) == 1, 10)
                assert (phost, pport) == ftp.data_peers[0]  # the connecting host's address
                received = recv_until_eof(data_sock, timeout=30)
                assert hashlib.sha256(received).digest() == hashlib.sha256(FILE).digest()
            assert recv_exact(control, 9) == b"226 sent\n"
    finally:
        ftp.close()
    line = last_bind_line(server)
    assert f"rep=0x00 up=0 down={len(FILE)}" in line, line


def test_bind_relays_both_ways_with_half_close(bind_server: ServerProcess) -> None:
    sock, raw, bhost, bport = bind_request(bind_server, "127.0.0.1")
    with sock:
        assert raw[:4] == b"\x05\x00\x00\x01"
        sock.sendall(b"early bytes, before the peer is there")
        sock.shutdown(socket.SHUT_WR)  # a half-close, not the end of the BIND
        with socket.create_connection((bhost, bport), timeout=IO_TIMEOUT) as peer:
            second, phost, pport = read_reply(sock)
            assert second[1] == 0
            assert (phost, pport) == peer.getsockname()[:2]
            assert recv_until_eof(peer) == b"early bytes, before the peer is there"
            peer.sendall(b"answer after the client's EOF")
            peer.shutdown(socket.SHUT_WR)
            assert recv_until_eof(sock) == b"answer after the client's EOF"


def test_peer_bytes_do_not_overtake_the_second_reply(bind_server: ServerProcess) -> None:
    sock, _, bhost, bport = bind_request(bind_server, "0.0.0.0")
    with sock, socket.create_connection((bhost, bport), timeout=IO_TIMEOUT) as peer:
        peer.sendall(b"banner right away\n")
        second, _, _ = read_reply(sock)
        assert second[:2] == b"\x05\x00"
        assert recv_exact(sock, 18) == b"banner right away\n"


# -- the expected peer -----------------------------------------------------------------------------


def test_connection_from_another_host_is_refused(bind_server: ServerProcess) -> None:
    sock, _, bhost, bport = bind_request(bind_server, "127.0.0.1")
    with sock:
        intruder = socket.create_connection(
            (bhost, bport), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
        )
        with intruder:
            assert_closed(intruder)  # accepted by the kernel, then closed by socksd
        wait_for_log(bind_server, "refused a connection from 127.0.0.2:")
        # the BIND still waits for the right peer
        with socket.create_connection((bhost, bport), timeout=IO_TIMEOUT) as peer:
            second, phost, _ = read_reply(sock)
            assert second[1] == 0 and phost == "127.0.0.1"
            peer.sendall(b"right peer")
            assert recv_exact(sock, 10) == b"right peer"


def test_zero_address_accepts_any_peer(bind_server: ServerProcess) -> None:
    sock, _, bhost, bport = bind_request(bind_server, "0.0.0.0")
    with (
        sock,
        socket.create_connection(
            (bhost, bport), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
        ) as peer,
    ):
        second, phost, pport = read_reply(sock)
        assert second[1] == 0
        assert (phost, pport) == peer.getsockname()[:2]
        assert phost == "127.0.0.2"


def test_expected_peer_by_name(
    socksd: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = tmp_path_factory.mktemp("bindcfg") / "socksd.toml"
    config.write_text('listen = ["127.0.0.1:0"]\n[hosts]\n"peer.test" = ["127.0.0.2"]\n')
    server = socksd("--config", str(config))
    sock, _, bhost, bport = bind_request(server, "peer.test")
    with sock:
        with socket.create_connection((bhost, bport), timeout=IO_TIMEOUT) as wrong:
            assert_closed(wrong)  # from 127.0.0.1: not peer.test
        with socket.create_connection(
            (bhost, bport), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
        ):
            second, phost, _ = read_reply(sock)
            assert second[1] == 0 and phost == "127.0.0.2"


def test_fully_qualified_expected_peer(bind_server: ServerProcess) -> None:
    """``localhost.`` as the expected peer is ``localhost``: the peer from 127.0.0.1 is taken."""
    sock, raw, bhost, bport = bind_request(bind_server, "localhost.")
    with sock:
        assert raw[1] == 0, raw.hex()
        with socket.create_connection((bhost, bport), timeout=IO_TIMEOUT) as peer:
            second, phost, pport = read_reply(sock)
            assert second[1] == 0
            assert (phost, pport) == peer.getsockname()[:2]


def test_unresolvable_expected_peer_is_0x04(
    socksd: Callable[..., ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> None:
    dns = StubDns()  # NXDOMAIN for every name
    try:
        server = socksd("--dns", f"127.0.0.1:{dns.port}")
        sock, raw, _, _ = bind_request(server, "no-such-peer.test")
        with sock:
            assert raw == failure_reply(0x04)
            assert_closed(sock)
    finally:
        dns.close()


# -- failures --------------------------------------------------------------------------------------


def test_timeout_is_0x06_after_the_first_reply(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--bind-timeout", "0.5")
    sock, raw, bhost, bport = bind_request(server, "127.0.0.1")
    with sock:
        assert raw[1] == 0
        sock.settimeout(10)
        assert recv_until_eof(sock, timeout=10) == failure_reply(0x06)
    # the listener is gone
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((bhost, bport), timeout=IO_TIMEOUT).close()
    assert "no peer connected within 0.5s" in last_bind_line(server)


def test_client_reset_ends_the_bind(bind_server: ServerProcess) -> None:
    sock, _, bhost, bport = bind_request(bind_server, "127.0.0.1")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset: the BIND is over
    assert wait_for(lambda: port_is_free(bhost, bport), 10)
    assert "BIND" in last_bind_line(bind_server)


def test_client_leaving_ends_the_bind(bind_server: ServerProcess) -> None:
    sock, _, bhost, bport = bind_request(bind_server, "127.0.0.1")
    sock.close()  # FIN with nothing sent: the client gave up
    wait_for_log(bind_server, "client closed the connection before the peer connected")
    assert wait_for(lambda: port_is_free(bhost, bport), 10)


def test_bind_disabled_is_0x07(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--commands", "connect,udp")
    sock, raw, _, _ = bind_request(server, "127.0.0.1")
    with sock:
        assert raw == failure_reply(0x07)
        assert_closed(sock)


def test_external_address_in_first_reply(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--external-address", "2001:db8::5")
    sock, raw, bhost, bport = bind_request(server, "127.0.0.1")
    with sock:
        assert raw[3] == 4 and bhost == "2001:db8::5"
        with socket.create_connection(("127.0.0.1", bport), timeout=IO_TIMEOUT):
            second, _, _ = read_reply(sock)
            assert second[1] == 0


def test_many_binds_at_once(bind_server: ServerProcess) -> None:
    n = 20
    binds = [bind_request(bind_server, "127.0.0.1") for _ in range(n)]
    ports = {b[3] for b in binds}
    assert len(ports) == n
    peers = []
    try:
        for i, (_sock, _, bhost, bport) in enumerate(binds):
            peer = socket.create_connection((bhost, bport), timeout=IO_TIMEOUT)
            peers.append(peer)
            peer.sendall(b"peer %02d" % i)
        for i, (sock, _, _, _) in enumerate(binds):
            second, _, pport = read_reply(sock)
            assert second[1] == 0 and pport == peers[i].getsockname()[1]
            assert recv_exact(sock, 7) == b"peer %02d" % i
    finally:
        for sock, *_ in binds:
            sock.close()
        for peer in peers:
            peer.close()


# -- client library --------------------------------------------------------------------------------


def test_socksd_client_bind(bind_server6: ServerProcess) -> None:
    async def main() -> tuple[bytes, tuple[str, int], tuple[str, int]]:
        url = f"socks5://[::1]:{bind_server6.port}"
        async with socksd_client.bind(url, ("::1", 0)) as listener:
            host, port = listener.address
            assert host == "::1"
            peer_r, peer_w = await asyncio.open_connection(host, port)
            peer_w.write(b"hello from the peer")
            await peer_w.drain()
            peer_w.write_eof()
            reader, writer = await listener.accept(timeout=IO_TIMEOUT)
            data = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
            writer.write(b"thanks")
            writer.write_eof()
            assert await asyncio.wait_for(peer_r.read(), IO_TIMEOUT) == b"thanks"
            peer_w.close()
            assert listener.peer is not None
            return data, listener.peer, peer_w.get_extra_info("sockname")[:2]

    data, peer, expected = asyncio.run(main())
    assert data == b"hello from the peer"
    assert peer == expected


def test_socksd_client_bind_blocking(bind_server: ServerProcess) -> None:
    with socksd_client.create_bind(f"127.0.0.1:{bind_server.port}", ("127.0.0.1", 0)) as listener:
        done = threading.Event()

        def peer_side() -> None:
            with socket.create_connection(listener.address, timeout=IO_TIMEOUT) as peer:
                peer.sendall(b"first bytes with the reply")
                done.wait(10)

        thread = threading.Thread(target=peer_side)
        thread.start()
        try:
            sock, peer = listener.accept(timeout=IO_TIMEOUT)
            assert peer[0] == "127.0.0.1"
            assert recv_exact(sock, 26) == b"first bytes with the reply"
        finally:
            done.set()
            thread.join(10)


def test_socksd_client_bind_timeout_reply(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--bind-timeout", "0.3")

    async def main() -> None:
        listener = await socksd_client.bind(f"127.0.0.1:{server.port}")
        try:
            with pytest.raises(socksd_client.ReplyError) as info:
                await listener.accept(timeout=IO_TIMEOUT)
            assert info.value.reply == 0x06
        finally:
            await listener.aclose()

    asyncio.run(main())


def test_bind_then_connect_still_served(bind_server: ServerProcess) -> None:
    """A BIND session does not disturb CONNECTs of the same server."""
    from tests.servers import EchoServer

    echo = EchoServer()
    try:
        sock, _, _, _ = bind_request(bind_server, "127.0.0.1")
        with sock, socks_open(bind_server, "127.0.0.1", echo.port) as other:
            other.sendall(b"x")
            assert recv_exact(other, 1) == b"x"
    finally:
        echo.close()


def test_bnd_is_the_local_address_on_the_route_to_the_peer(
    socksd: Callable[..., ServerProcess],
) -> None:
    """Control connection on 127.0.0.2: a zero DST listens there; DST 127.0.0.1 listens on the
    address the kernel uses to reach 127.0.0.1 (127.0.0.1 on Linux loopback)."""
    server = socksd("--listen", "127.0.0.2:0")
    sock, raw, bhost, _ = bind_request(server, "0.0.0.0")
    with sock:
        assert raw[1] == 0 and bhost == "127.0.0.2"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe:
        probe.connect(("127.0.0.1", 9))
        route_source = probe.getsockname()[0]
    sock, raw, bhost, _ = bind_request(server, "127.0.0.1")
    with sock:
        assert raw[1] == 0 and bhost == route_source


def test_socksd_client_bind_with_password(auth_server: ServerProcess) -> None:
    from urllib.parse import quote

    from tests.e2e.support import PASSWORD, USER

    url = f"socks5://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_server.port}"
    with (
        socksd_client.create_bind(url, ("127.0.0.1", 0)) as listener,
        socket.create_connection(listener.address, timeout=IO_TIMEOUT) as peer,
    ):
        sock, _ = listener.accept(timeout=IO_TIMEOUT)
        peer.sendall(b"auth bind")
        assert recv_exact(sock, 9) == b"auth bind"


def test_on_the_default_asyncio_loop(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--loop", "asyncio")
    sock, _, bhost, bport = bind_request(server, "127.0.0.1")
    with sock, socket.create_connection((bhost, bport), timeout=IO_TIMEOUT) as peer:
        peer.sendall(b"asyncio peer")
        second, phost, pport = read_reply(sock)
        assert second[1] == 0 and (phost, pport) == peer.getsockname()[:2]
        assert recv_exact(sock, 12) == b"asyncio peer"
        sock.sendall(b"back")
        assert recv_exact(peer, 4) == b"back"
