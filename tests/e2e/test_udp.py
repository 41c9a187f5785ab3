"""UDP ASSOCIATE end to end on loopback: raw datagrams, socksd.client, PySocks; IPv4 and IPv6.

Every association is checked from outside: what the UDP echo target received, what came back to
the client (header included), and the session's access-log line (datagrams, drops by reason).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import socksd.client as socksd_client
from tests.e2e.support import (
    IO_TIMEOUT,
    UdpEchoServer,
    access_lines,
    connect_proxy,
    failure_reply,
    handshake,
    has_ipv6,
    parse_udp,
    recv_until_eof,
    request,
    udp_associate_raw,
    udp_header,
    wait_for,
    wait_for_log,
)
from tests.servers import ServerProcess, StubDns


@pytest.fixture(scope="module")
def udp_echo6() -> Iterator[UdpEchoServer]:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    server = UdpEchoServer("::1")
    yield server
    server.close()


@pytest.fixture(scope="module")
def udp_server(
    module_socksd: Callable[..., ServerProcess],
    tmp_path_factory: pytest.TempPathFactory,
    nx_dns: StubDns,
) -> ServerProcess:
    """socksd on 127.0.0.1 with a hosts map (echo.test -> 127.0.0.1, echo6.test -> ::1); other
    names go to a stub DNS server on loopback answering NXDOMAIN (no query leaves the machine)."""
    config = tmp_path_factory.mktemp("udpcfg") / "socksd.toml"
    config.write_text(
        'listen = ["127.0.0.1:0"]\n'
        f'dns = ["127.0.0.1:{nx_dns.port}"]\n'
        '[hosts]\n"echo.test" = ["127.0.0.1"]\n"echo6.test" = ["::1"]\n'
    )
    return module_socksd("--config", str(config), "--log-level", "debug")  # debug: drop reasons


@pytest.fixture(scope="module")
def udp_server6(module_socksd: Callable[..., ServerProcess]) -> ServerProcess:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    return module_socksd("--listen", "[::1]:0")


def association_line(server: ServerProcess, port: int, timeout: float = 10.0) -> str:
    """The access-log line of the association whose control connection had local port ``port``."""
    needle = f":{port} user=- UDP_ASSOCIATE "

    def found() -> list[str]:
        return [line for line in access_lines(server) if needle in line]

    wait_for(lambda: bool(found()), timeout)
    lines = found()
    assert lines, f"no access-log line for {needle!r}:\n{server.log()}"
    return lines[-1]


def echo_through(
    udp: socket.socket, relay: tuple[str, int], target: tuple[str, int], payload: bytes
) -> tuple[str, int, bytes]:
    """Send one datagram to ``target`` via the relay; return the answer's (host, port, data)."""
    udp.sendto(udp_header(*target) + payload, relay)
    answer, source = udp.recvfrom(65535)
    assert source[:2] == relay, (source, relay)
    frag, host, port, data = parse_udp(answer)
    assert frag == 0
    return host, port, data


# -- the relay's address -------------------------------------------------------------------------


def test_bnd_is_the_control_connections_local_address(
    udp_server: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    control, udp, relay, raw = udp_associate_raw(udp_server)
    with control, udp:
        assert raw[:4] == b"\x05\x00\x00\x01", raw.hex()
        assert relay[0] == control.getsockname()[0] == "127.0.0.1"
        assert relay[1] != 0
        host, port, data = echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"ping")
        assert (host, port, data) == ("127.0.0.1", udp_echo.port, b"ping")


def test_bnd_follows_the_address_the_client_used(
    socksd: Callable[..., ServerProcess], udp_echo: UdpEchoServer
) -> None:
    server = socksd("--listen", "127.0.0.2:0")
    control, udp, relay, _ = udp_associate_raw(server)
    with control, udp:
        assert relay[0] == "127.0.0.2"
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"x")[2] == b"x"


def test_external_address_is_advertised(
    socksd: Callable[..., ServerProcess], udp_echo: UdpEchoServer
) -> None:
    server = socksd("--external-address", "192.0.2.7")
    control, udp, relay, _ = udp_associate_raw(server)
    with control, udp:
        assert relay[0] == "192.0.2.7"
        # the socket itself is on the control connection's address, same port
        real = ("127.0.0.1", relay[1])
        assert echo_through(udp, real, ("127.0.0.1", udp_echo.port), b"nat")[2] == b"nat"


# -- echo through the relay: IPv4, IPv6, names ---------------------------------------------------


def test_echo_ipv4(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    with control, udp:
        for size in (0, 1, 1000, 8192):
            payload = bytes(i % 251 for i in range(size))
            host, port, data = echo_through(udp, relay, ("127.0.0.1", udp_echo.port), payload)
            assert (host, port) == ("127.0.0.1", udp_echo.port)
            assert data == payload
    line = association_line(udp_server, cport)
    assert "dgrams_up=4 dgrams_down=4 dropped=0" in line, line
    assert f"up={1 + 1000 + 8192} down={1 + 1000 + 8192}" in line, line


def test_echo_ipv6(udp_server6: ServerProcess, udp_echo6: UdpEchoServer) -> None:
    control, udp, relay, raw = udp_associate_raw(udp_server6)
    with control, udp:
        assert raw[3] == 4 and relay[0] == "::1", raw.hex()
        host, port, data = echo_through(udp, relay, ("::1", udp_echo6.port), b"six")
        assert (host, port, data) == ("::1", udp_echo6.port, b"six")


def test_ipv6_target_from_ipv4_client(udp_server: ServerProcess, udp_echo6: UdpEchoServer) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    with control, udp:
        host, port, data = echo_through(udp, relay, ("::1", udp_echo6.port), b"4 to 6")
        assert (host, port, data) == ("::1", udp_echo6.port, b"4 to 6")


@pytest.mark.parametrize(("name", "ip"), [("echo.test", "127.0.0.1"), ("ECHO6.test.", "::1")])
def test_echo_domain_name(
    udp_server: ServerProcess,
    udp_echo: UdpEchoServer,
    udp_echo6: UdpEchoServer,
    name: str,
    ip: str,
) -> None:
    port = udp_echo.port if ip == "127.0.0.1" else udp_echo6.port
    control, udp, relay, _ = udp_associate_raw(udp_server)
    with control, udp:
        for i in range(3):  # the first resolves, the next ones use the cache
            host, sport, data = echo_through(udp, relay, (name, port), b"by name %d" % i)
            assert (host, sport, data) == (ip, port, b"by name %d" % i)


def test_unresolvable_name_is_dropped_and_counted(
    udp_server: ServerProcess, udp_echo: UdpEchoServer, nx_dns: StubDns
) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    with control, udp:
        udp.sendto(udp_header("no-such-name.invalid", 9) + b"lost", relay)
        # the association goes on
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"next")[2] == b"next"
        # logged when the failed lookup is done, just before its datagram is counted
        wait_for_log(udp_server, "UDP target no-such-name.invalid does not resolve")
        assert "no-such-name.invalid." in nx_dns.questions
    line = association_line(udp_server, cport)
    assert "dropped=1(unresolved=1)" in line, line


def test_largest_datagrams_intact(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    """65,507 bytes of IPv4 payload minus the 10-byte header, both ways, unchanged."""
    control, udp, relay, _ = udp_associate_raw(udp_server)
    with control, udp:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        payload = bytes((i * 7) % 256 for i in range(65507 - 10))
        data = echo_through(udp, relay, ("127.0.0.1", udp_echo.port), payload)[2]
        assert data == payload


def test_reply_too_large_for_the_header_is_dropped(udp_server: ServerProcess) -> None:
    big = UdpEchoServer(reply_size=65507)  # the target answers with the largest IPv4 payload
    try:
        control, udp, relay, _ = udp_associate_raw(udp_server)
        cport = control.getsockname()[1]
        with control, udp:
            udp.sendto(udp_header("127.0.0.1", big.port) + b"q", relay)
            assert wait_for(lambda: big.received == 1, 10)
            udp.settimeout(1)
            with pytest.raises(TimeoutError):
                udp.recvfrom(65535)
        line = association_line(udp_server, cport)
        assert "dropped=1(send=1)" in line, line
    finally:
        big.close()


# -- who may use an association ------------------------------------------------------------------


def test_wrong_source_datagrams_are_dropped(
    udp_server: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    before = udp_echo.received
    with control, udp:
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"mine")[2] == b"mine"
        other_port = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other_host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with other_port, other_host:
            other_port.bind(("127.0.0.1", 0))
            other_host.bind(("127.0.0.2", 0))
            for sock in (other_port, other_host):
                sock.sendto(udp_header("127.0.0.1", udp_echo.port) + b"intruder", relay)
            # still works for the owner, and the intruders' datagrams never reached the target
            assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"mine2")[2] == b"mine2"
            for sock in (other_port, other_host):
                sock.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    sock.recvfrom(65535)
    assert udp_echo.received - before == 2
    line = association_line(udp_server, cport)
    assert "dropped=2(source=2)" in line, line


def test_declared_port_is_enforced(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    """DST.PORT declared: even the first datagram must come from it."""
    control, udp, relay, _ = udp_associate_raw(udp_server)  # declares udp's own port
    cport = control.getsockname()[1]
    with control, udp:
        first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with first:
            first.bind(("127.0.0.1", 0))
            first.sendto(udp_header("127.0.0.1", udp_echo.port) + b"not declared", relay)
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"declared")[2] == (
            b"declared"
        )
    line = association_line(udp_server, cport)
    assert "dropped=1(source=1)" in line, line


def test_zero_declared_address_learns_the_first_port(
    udp_server: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server, ("0.0.0.0", 0))
    cport = control.getsockname()[1]
    with control, udp:
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"first")[2] == b"first"
        late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with late:
            late.bind(("127.0.0.1", 0))
            late.sendto(udp_header("127.0.0.1", udp_echo.port) + b"second port", relay)
            late.settimeout(0.3)
            with pytest.raises(TimeoutError):
                late.recvfrom(65535)
    line = association_line(udp_server, cport)
    assert "dropped=1(source=1)" in line, line


def test_fragments_are_dropped(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    before = udp_echo.received
    with control, udp:
        for frag in (1, 0x81):
            udp.sendto(udp_header("127.0.0.1", udp_echo.port, frag=frag) + b"part", relay)
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"whole")[2] == b"whole"
    assert udp_echo.received - before == 1
    line = association_line(udp_server, cport)
    assert "dropped=2(frag=2)" in line, line


def test_malformed_headers_are_dropped(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    with control, udp:
        for garbage in (b"", b"\x00\x00", b"\x00\x00\x00\x01\x7f", b"\x00\x00\x00\x07" + bytes(8)):
            udp.sendto(garbage, relay)
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"ok")[2] == b"ok"
    line = association_line(udp_server, cport)
    assert "dropped=4(header=4)" in line, line


# -- the association's life ------------------------------------------------------------------------


def test_association_ends_with_its_tcp_connection(
    udp_server: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    with udp:
        with control:
            assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"alive")[2] == b"alive"
            port = control.getsockname()[1]
        association_line(udp_server, port)  # logged: the server has seen the close
        before = udp_echo.received
        udp.connect(relay)
        udp.send(udp_header("127.0.0.1", udp_echo.port) + b"too late")
        udp.settimeout(2)
        # the relay's socket is closed: the kernel answers "port unreachable"
        with pytest.raises(ConnectionRefusedError):
            udp.recv(65535)
        assert udp_echo.received == before


def test_control_data_is_ignored(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    control, udp, relay, _ = udp_associate_raw(udp_server)
    with control, udp:
        control.sendall(b"x" * 100_000)  # read and discarded, the association goes on
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"ok")[2] == b"ok"


def test_idle_timeout_ends_the_association(
    socksd: Callable[..., ServerProcess], udp_echo: UdpEchoServer
) -> None:
    server = socksd("--udp-idle-timeout", "0.5")
    control, udp, relay, _ = udp_associate_raw(server)
    cport = control.getsockname()[1]
    with control, udp:
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"once")[2] == b"once"
        assert recv_until_eof(control, timeout=10) == b""
    line = association_line(server, cport)
    assert "idle for 0.5s" in line, line


def test_two_associations_are_isolated(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    a_control, a_udp, a_relay, _ = udp_associate_raw(udp_server)
    b_control, b_udp, b_relay, _ = udp_associate_raw(udp_server)
    cport = a_control.getsockname()[1]
    with a_control, a_udp, b_control, b_udp:
        assert a_relay != b_relay
        for i in range(20):
            a_udp.sendto(udp_header("127.0.0.1", udp_echo.port) + b"A%d" % i, a_relay)
            b_udp.sendto(udp_header("127.0.0.1", udp_echo.port) + b"B%d" % i, b_relay)
        got: dict[str, set[bytes]] = {"a": set(), "b": set()}
        for name, sock in (("a", a_udp), ("b", b_udp)):
            for _ in range(20):
                got[name].add(parse_udp(sock.recvfrom(65535)[0])[3])
        assert got["a"] == {b"A%d" % i for i in range(20)}
        assert got["b"] == {b"B%d" % i for i in range(20)}
        # B's client sending into A's relay is a stranger there
        b_udp.sendto(udp_header("127.0.0.1", udp_echo.port) + b"B into A", a_relay)
        a_udp.settimeout(0.3)
        b_udp.settimeout(0.3)
        for sock in (a_udp, b_udp):
            with pytest.raises(TimeoutError):
                sock.recvfrom(65535)
    line = association_line(udp_server, cport)
    assert "dgrams_up=20 dgrams_down=20 dropped=1(source=1)" in line, line


def test_a_thousand_datagrams(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    """1,000 datagrams of 1 KiB, at most 32 in flight: their loss is counted (loopback: none)."""
    count, window = 1000, 32
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    received: set[int] = set()
    with control, udp:
        header = udp_header("127.0.0.1", udp_echo.port)
        udp.settimeout(2)
        sent = 0
        deadline = time.monotonic() + 60
        while (sent < count or len(received) < sent) and time.monotonic() < deadline:
            while sent < count and sent - len(received) < window:
                udp.sendto(header + sent.to_bytes(4, "big") + bytes(1020), relay)
                sent += 1
            try:
                data = parse_udp(udp.recvfrom(65535)[0])[3]
            except TimeoutError:
                break  # whatever is missing now is lost
            assert len(data) == 1024
            received.add(int.from_bytes(data[:4], "big"))
    lost = count - len(received)
    print(f"1000 datagrams: {len(received)} received, {lost} lost")
    assert lost == 0, f"{lost} datagrams lost on loopback"
    line = association_line(udp_server, cport)
    assert f"dgrams_up={count} dgrams_down={count} dropped=0" in line, line


# -- commands off, JSON log ------------------------------------------------------------------------


def test_udp_disabled_is_0x07(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--commands", "connect,bind")
    with connect_proxy(server) as sock:
        handshake(sock)
        sock.sendall(request("0.0.0.0", 0, cmd=3))
        assert recv_until_eof(sock) == failure_reply(0x07)


def test_json_access_log_has_udp_stats(
    socksd: Callable[..., ServerProcess], udp_echo: UdpEchoServer, tmp_path: Path
) -> None:
    log = tmp_path / "access.jsonl"
    server = socksd("--log-format", "json", "--access-log", str(log))
    control, udp, relay, _ = udp_associate_raw(server)
    with control, udp:
        echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"json")
        udp.sendto(udp_header("127.0.0.1", udp_echo.port, frag=2) + b"x", relay)
        # datagrams are handled in order: once this one is back, the fragment was dropped
        echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"sync")
    assert wait_for(lambda: log.exists() and log.read_text().strip(), 10)
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["command"] == "UDP_ASSOCIATE"
    assert record["udp"] == {"datagrams_up": 2, "datagrams_down": 2, "dropped": {"frag": 1}}
    assert record["bytes_up"] == record["bytes_down"] == 8


# -- client libraries ------------------------------------------------------------------------------


def test_socksd_client_udp(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    async def main() -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        url = f"socks5://127.0.0.1:{udp_server.port}"
        async with socksd_client.udp_associate(url) as assoc:
            assert assoc.relay[0] == "127.0.0.1"
            for target in (("127.0.0.1", udp_echo.port), ("echo.test", udp_echo.port)):
                await assoc.sendto(b"lib", target)
                out.append(await assoc.recvfrom(timeout=IO_TIMEOUT))
        return out

    results = asyncio.run(main())
    assert results == [(b"lib", ("127.0.0.1", udp_echo.port))] * 2


def test_socksd_client_udp_ends_when_the_proxy_closes(
    socksd: Callable[..., ServerProcess],
) -> None:
    server = socksd("--udp-idle-timeout", "0.5")

    async def main() -> None:
        async with socksd_client.udp_associate(f"127.0.0.1:{server.port}") as assoc:
            with pytest.raises(socksd_client.ProxyConnectionError):
                await assoc.recvfrom(timeout=IO_TIMEOUT)
            assert assoc.closed
            with pytest.raises(socksd_client.ProxyConnectionError):
                await assoc.sendto(b"x", ("127.0.0.1", 9))

    asyncio.run(main())


def test_socksd_client_udp_blocking(udp_server6: ServerProcess, udp_echo6: UdpEchoServer) -> None:
    with socksd_client.create_udp_association(f"[::1]:{udp_server6.port}") as assoc:
        assert assoc.relay[0] == "::1"
        assoc.sendto(b"blocking", ("::1", udp_echo6.port))
        assert assoc.recvfrom(timeout=IO_TIMEOUT) == (b"blocking", ("::1", udp_echo6.port))


def test_udp_disabled_client_error(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--commands", "connect")

    async def main() -> None:
        with pytest.raises(socksd_client.ReplyError) as info:
            await socksd_client.udp_associate(f"127.0.0.1:{server.port}")
        assert info.value.reply == 0x07

    asyncio.run(main())


def test_pysocks_udp(udp_server: ServerProcess, udp_echo: UdpEchoServer) -> None:
    """PySocks' socksocket(SOCK_DGRAM): its UDP ASSOCIATE, with rdns=False (IP addresses)."""
    socks = pytest.importorskip("socks")
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.set_proxy(socks.SOCKS5, "127.0.0.1", udp_server.port, rdns=False)
        sock.settimeout(IO_TIMEOUT)
        sock.bind(("127.0.0.1", 0))
        for i in range(5):
            sock.sendto(b"pysocks %d" % i, ("127.0.0.1", udp_echo.port))
            data, source = sock.recvfrom(65535)
            assert data == b"pysocks %d" % i
            assert source[:2] == ("127.0.0.1", udp_echo.port)
    finally:
        sock.close()


def test_shutdown_deadline_ends_associations_with_their_stats(
    socksd: Callable[..., ServerProcess], udp_echo: UdpEchoServer
) -> None:
    server = socksd("--shutdown-timeout", "0.5")
    control, udp, relay, _ = udp_associate_raw(server)
    cport = control.getsockname()[1]
    with control, udp:
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"before")[2] == b"before"
        assert server.stop() == 0  # SIGTERM: the association is cut at the deadline
        assert recv_until_eof(control, timeout=10) == b""
    line = association_line(server, cport)
    assert "dgrams_up=1 dgrams_down=1" in line, line
    assert "server shutdown deadline" in line, line


def test_socksd_client_udp_with_password(
    auth_server: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    from urllib.parse import quote

    from tests.e2e.support import PASSWORD, USER

    url = f"socks5://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{auth_server.port}"

    async def main() -> tuple[bytes, tuple[str, int]]:
        async with socksd_client.udp_associate(url) as assoc:
            await assoc.sendto(b"authenticated", ("127.0.0.1", udp_echo.port))
            return await assoc.recvfrom(timeout=IO_TIMEOUT)

    assert asyncio.run(main()) == (b"authenticated", ("127.0.0.1", udp_echo.port))
    assert wait_for(
        lambda: any(f"user={USER} UDP_ASSOCIATE" in line for line in access_lines(auth_server)), 10
    )


def test_on_the_default_asyncio_loop(
    socksd: Callable[..., ServerProcess], udp_echo: UdpEchoServer
) -> None:
    """The same relay without uvloop (empty and large datagrams, drops, the end with the TCP)."""
    server = socksd("--loop", "asyncio")
    control, udp, relay, _ = udp_associate_raw(server)
    cport = control.getsockname()[1]
    with control, udp:
        for payload in (b"", b"asyncio", bytes(60000)):
            assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), payload)[2] == payload
        udp.sendto(udp_header("127.0.0.1", udp_echo.port, frag=1) + b"x", relay)
        # datagrams are handled in order: once this one is back, the fragment was dropped
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"sync")[2] == b"sync"
    line = association_line(server, cport)
    assert "dgrams_up=4 dgrams_down=4 dropped=1(frag=1)" in line, line


def test_garbage_never_breaks_an_association(
    udp_server: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    """300 seeded random datagrams, each malformed (unknown ATYP, truncated header) or a
    fragment, so none is ever sent anywhere: all dropped, the association still relays."""
    import random

    rng = random.Random(7)
    control, udp, relay, _ = udp_associate_raw(udp_server)
    cport = control.getsockname()[1]
    with control, udp:
        for i in range(300):
            kind = i % 3
            if kind == 0:  # unknown address type
                atyp = rng.choice([0, 2, *range(5, 256)])
                datagram = bytes((0, 0, 0, atyp)) + rng.randbytes(rng.randrange(0, 40))
            elif kind == 1:  # an IPv4 or IPv6 header cut short
                atyp = rng.choice([1, 4])
                cut = rng.randrange(0, 5 if atyp == 1 else 17)
                datagram = bytes((0, 0, 0, atyp)) + rng.randbytes(cut)
            else:  # a fragment, whatever follows
                datagram = bytes((0, 0, rng.randrange(1, 256))) + rng.randbytes(rng.randrange(60))
            udp.sendto(datagram, relay)
        assert echo_through(udp, relay, ("127.0.0.1", udp_echo.port), b"alive")[2] == b"alive"
    line = association_line(udp_server, cport)
    assert "dgrams_up=1 dgrams_down=1 dropped=300(" in line, line


# -- access rules, per datagram ------------------------------------------------------------------


def test_rules_apply_to_each_datagrams_destination(
    socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A datagram is a request of its own: `to`/`ports` rules hold for UDP as for CONNECT, by
    address and by the address a name resolves to; denied datagrams are dropped and counted."""
    allowed, denied = UdpEchoServer(), UdpEchoServer()
    try:
        config = tmp_path / "rules.toml"
        config.write_text(
            'listen = ["127.0.0.1:0"]\n'
            'default = "allow"\n'
            '[hosts]\n"open.test" = ["127.0.0.1"]\n"via-name.test" = ["127.0.0.9"]\n'
            "[[rules]]\n"
            'action = "deny"\ncommands = ["udp"]\n'
            f'ports = ["{denied.port}"]\n'
            "[[rules]]\n"
            'action = "deny"\ncommands = ["udp"]\nto = ["127.0.0.9/32"]\n'
        )
        server = socksd("--config", str(config))
        control, udp, relay, _ = udp_associate_raw(server)
        cport = control.getsockname()[1]
        with control, udp:
            udp.settimeout(IO_TIMEOUT)
            for i in range(3):
                udp.sendto(udp_header("127.0.0.1", denied.port) + b"no %d" % i, relay)
                udp.sendto(udp_header("via-name.test", allowed.port) + b"no", relay)
                got = echo_through(udp, relay, ("open.test", allowed.port), b"yes %d" % i)
                assert got == ("127.0.0.1", allowed.port, b"yes %d" % i)
            udp.settimeout(0.5)
            with pytest.raises(TimeoutError):  # nothing from the denied destinations
                udp.recvfrom(65535)
        line = association_line(server, cport)
        assert "dgrams_up=3 dgrams_down=3 dropped=6(denied=6)" in line, line
    finally:
        allowed.close()
        denied.close()
