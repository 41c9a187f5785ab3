"""Upstream proxies with GSSAPI: socksd -> socksd, the front logging in to the inner one with
Kerberos (a real KDC on loopback, tests/krb5.py) at protection levels 1 and 2.

A tap between the two proves what the hop carries (the marker in clear at level 1, never at
level 2); a GSSAPI client of the front makes both hops encapsulated; a service the upstream has no
key for fails with 0x01 and an error log line naming the upstream; UDP through the GSSAPI
upstream; and Dante's sockd (its GSSAPI build, fixtures from test_dante_gssapi.py) as the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from socksd.client import GssapiOptions, Proxy, create_gssapi_connection
from tests.e2e import test_dante_gssapi
from tests.e2e.support import (
    IO_TIMEOUT,
    UdpEchoServer,
    access_lines,
    assert_closed,
    random_bytes,
    read_reply,
    recv_exact,
    recv_until_eof,
    socks_open,
    socks_request,
    wait_for,
    wait_for_log,
)
from tests.e2e.wiretap import Tap
from tests.krb5 import HOST, TestRealm
from tests.servers import EchoServer, ServerProcess

MARKER = b"<<upstream gssapi plain text marker 0123456789>>"

dante = test_dante_gssapi.dante
sockd = test_dante_gssapi.sockd
"""Fixtures: Dante's GSSAPI build (skips when not built) and its server requiring GSSAPI."""

FRONT_CONF = """\
methods = ["gssapi", "none"]
gssapi_keytab = "{keytab}"
connect_timeout = 5

[upstreams.level1]
proxy = "socks5://127.0.0.1:{level1}"
gssapi_service = "rcmd"
gssapi_hostname = "{host}"
gssapi_level = 1

[upstreams.level2]
proxy = "socks5://127.0.0.1:{level2}"
gssapi_service = "rcmd"
gssapi_hostname = "{host}"

[upstreams.nokey]
proxy = "socks5://127.0.0.1:{inner}"
gssapi_service = "nokey"
gssapi_hostname = "{host}"

[[rules]]
action = "allow"
commands = ["bind", "udp"]
upstream = "level2"

[[rules]]
action = "allow"
ports = [{port1}]
upstream = "level1"

[[rules]]
action = "allow"
ports = [{port2}]
upstream = "level2"

[[rules]]
action = "allow"
ports = [{port3}]
upstream = "nokey"
"""


@pytest.fixture(scope="module")
def realm(krb5_realm: TestRealm) -> TestRealm:
    return krb5_realm


@pytest.fixture(scope="module")
def inner(module_socksd: Callable[..., ServerProcess], realm: TestRealm) -> ServerProcess:
    """The upstream: GSSAPI only."""
    return module_socksd("--gssapi-keytab", str(realm.keytab), env=realm.env)


@pytest.fixture(scope="module")
def targets() -> dict[str, EchoServer]:
    """One target per route (the front's rules pick the upstream by port)."""
    return {
        "level1": EchoServer(mode="halfclose"),
        "level2": EchoServer(mode="halfclose"),
        "nokey": EchoServer(),
    }


def start_front(
    module_socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    inner: ServerProcess,
    targets: dict[str, EchoServer],
    tmp: Path,
    taps: dict[str, int],
) -> ServerProcess:
    conf = tmp / "front.toml"
    conf.write_text(
        FRONT_CONF.format(
            keytab=realm.keytab,
            host=HOST,
            inner=inner.port,
            level1=taps.get("level1", inner.port),
            level2=taps.get("level2", inner.port),
            port1=targets["level1"].port,
            port2=targets["level2"].port,
            port3=targets["nokey"].port,
        )
    )
    return module_socksd("--config", str(conf), "--listen", "127.0.0.1:0", env=realm.env)


@pytest.mark.parametrize("level", [1, 2])
def test_gssapi_to_the_upstream(
    module_socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    inner: ServerProcess,
    targets: dict[str, EchoServer],
    tmp_path: Path,
    level: int,
) -> None:
    name = f"level{level}"
    tap = Tap(inner.port)
    front = start_front(module_socksd, realm, inner, targets, tmp_path, {name: tap.port})
    data = random_bytes(300_000, seed=80 + level) + MARKER
    with socks_open(front, "127.0.0.1", targets[name].port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # half-close through the encapsulated hop
        answer = recv_until_eof(sock, 30)
    assert answer == hashlib.sha256(data).hexdigest().encode()
    tap.close()
    assert (MARKER in tap.up) is (level == 1)  # level 2 encrypts the hop
    needle = f"CONNECT 127.0.0.1:{targets[name].port}"
    assert wait_for(lambda: any(needle in line for line in access_lines(front)), 10)
    line = next(line for line in access_lines(front) if needle in line)
    assert f"upstream={name}" in line and f"up={len(data)} down=64" in line
    assert wait_for(lambda: any(needle in line for line in access_lines(inner)), 10)
    inner_line = next(line for line in access_lines(inner) if needle in line)
    assert "user=user@KRBTEST.COM" in inner_line


def test_gssapi_client_and_gssapi_upstream(
    module_socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    inner: ServerProcess,
    targets: dict[str, EchoServer],
    tmp_path: Path,
) -> None:
    """Both hops encapsulated: unwrapped from the client, wrapped again for the upstream."""
    front = start_front(module_socksd, realm, inner, targets, tmp_path, {})
    data = random_bytes(200_000, seed=90)
    proxy = Proxy(front.host, front.port, gssapi=GssapiOptions(hostname=HOST, level=2))
    with create_gssapi_connection(proxy, ("127.0.0.1", targets["level2"].port)) as gs:
        gs.settimeout(IO_TIMEOUT)
        gs.sendall(data)
        gs.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := gs.recv(1 << 20):
            got += chunk
    assert bytes(got) == hashlib.sha256(data).hexdigest().encode()


def test_upstream_refusing_the_gssapi_login(
    module_socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    inner: ServerProcess,
    targets: dict[str, EchoServer],
    tmp_path: Path,
) -> None:
    front = start_front(module_socksd, realm, inner, targets, tmp_path, {})
    sock, raw, _, _ = socks_request(front, "127.0.0.1", targets["nokey"].port)
    with sock:
        assert raw[1] == 0x01
        assert_closed(sock)
    text = wait_for_log(front, "login to upstream")
    assert "ERROR socksd.upstream: login to upstream nokey (127.0.0.1:" in text
    # the front itself still works through another upstream
    with socks_open(front, "127.0.0.1", targets["level2"].port) as ok:
        ok.sendall(b"x")
        ok.shutdown(socket.SHUT_WR)
        assert recv_exact(ok, 64) == hashlib.sha256(b"x").hexdigest().encode()


def test_udp_through_a_gssapi_upstream(
    module_socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    inner: ServerProcess,
    targets: dict[str, EchoServer],
    tmp_path: Path,
) -> None:
    """Each datagram is one RFC 1961 frame on the hop to the upstream (which takes GSSAPI
    sessions only, and drops a datagram that is not a good frame), plain to the client."""
    from socksd.client import udp_associate

    udp_echo = UdpEchoServer()
    try:
        front = start_front(module_socksd, realm, inner, targets, tmp_path, {})
        payloads = [random_bytes(n, seed=n) for n in (1, 500, 5000)]

        async def run() -> list[bytes]:
            got = []
            async with udp_associate(f"socks5://{front.host}:{front.port}") as assoc:
                for payload in payloads:
                    await assoc.sendto(payload, ("127.0.0.1", udp_echo.port))
                    got.append((await assoc.recvfrom(IO_TIMEOUT))[0])
            return got

        assert asyncio.run(run()) == payloads
        needle = "UDP_ASSOCIATE"
        assert wait_for(lambda: any(needle in line for line in access_lines(inner)), 10)
        inner_line = next(line for line in access_lines(inner) if needle in line)
        assert "user=user@KRBTEST.COM" in inner_line
        assert "dgrams_up=3 dgrams_down=3 dropped=0" in inner_line
        assert wait_for(lambda: any(needle in line for line in access_lines(front)), 10)
        front_line = next(line for line in access_lines(front) if needle in line)
        assert "upstream=level2" in front_line and "dropped=0" in front_line
    finally:
        udp_echo.close()


def test_bind_through_a_gssapi_upstream(
    module_socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    inner: ServerProcess,
    targets: dict[str, EchoServer],
    tmp_path: Path,
) -> None:
    """Both BIND replies come encapsulated from the upstream; then the relay unwraps."""
    front = start_front(module_socksd, realm, inner, targets, tmp_path, {})
    sock, raw, host, port = socks_request(front, "0.0.0.0", 0, cmd=2)
    with sock, socket.create_connection((host, port), timeout=IO_TIMEOUT) as peer:
        assert raw[1] == 0
        raw2, peer_host, peer_port = read_reply(sock)
        assert raw2[1] == 0 and (peer_host, peer_port) == peer.getsockname()[:2]
        data = random_bytes(100_000, seed=91)
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, 30) == data
        sock.sendall(b"back to the peer")
        sock.shutdown(socket.SHUT_WR)
        peer.settimeout(IO_TIMEOUT)
        assert recv_until_eof(peer, 30) == b"back to the peer"
    assert wait_for(lambda: any(" BIND " in line for line in access_lines(front)), 10)
    line = next(line for line in access_lines(front) if " BIND " in line)
    assert "upstream=level2" in line and "rep=0x00" in line


# -- socksd -> Dante's sockd with GSSAPI -----------------------------------------------------------


@pytest.mark.parametrize("level", [1, 2])
def test_gssapi_upstream_dante(
    socksd: Callable[..., ServerProcess],
    realm: TestRealm,
    sockd: int,
    tmp_path: Path,
    level: int,
) -> None:
    """Dante's server (the GSSAPI build, test_dante_gssapi.py) as the upstream."""
    target = EchoServer(mode="halfclose")
    tap = Tap(sockd)
    try:
        conf = tmp_path / "front.toml"
        conf.write_text(
            'upstream = "dante"\n[upstreams.dante]\n'
            f'proxy = "socks5://127.0.0.1:{tap.port}"\ngssapi_service = "rcmd"\n'
            f'gssapi_hostname = "{HOST}"\ngssapi_level = {level}\n'
        )
        front = socksd("--config", str(conf), "--listen", "127.0.0.1:0", env=realm.env)
        data = random_bytes(200_000, seed=60 + level) + MARKER
        with socks_open(front, "127.0.0.1", target.port) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answer = recv_until_eof(sock, 30)
        assert answer == hashlib.sha256(data).hexdigest().encode()
        tap.close()
        assert (MARKER in tap.up) is (level == 1)
    finally:
        target.close()
        tap.close()
