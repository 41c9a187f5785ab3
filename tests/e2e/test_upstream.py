"""Upstream proxies (chaining): socksd -> another socksd or Dante -> a loopback target.

The front socksd sends requests through upstreams named in its ``[upstreams]`` table: the global
``upstream`` (an inner socksd requiring alice's password, read from a password file) and, by rule,
Dante's ``danted`` (Debian's ``dante-server``, no authentication: its ``socksmethod: username``
would need a system user), an upstream that is down, one that never answers, one with a wrong
password. Each route is picked by the destination's loopback address (127.0.0.2 direct, .3 Dante,
...). Clients: raw SOCKS5 bytes, curl and python-socks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.e2e.support import (
    IO_TIMEOUT,
    PASSWORD,
    USER,
    ReverseHalfCloseServer,
    SilentServer,
    SourceServer,
    UdpEchoServer,
    access_lines,
    assert_closed,
    clean_env,
    echo_roundtrip,
    full_backlog_target,
    random_bytes,
    read_reply,
    recv_exact,
    recv_until_eof,
    request,
    socks_open,
    socks_request,
    socksd_cli,
    wait_for,
    wait_for_log,
)
from tests.servers import EchoServer, ServerProcess

DANTED = shutil.which("danted") or "/usr/sbin/danted"
CURL = shutil.which("curl") or "/usr/bin/curl"

DIRECT_IP = "127.0.0.2"
DANTE_IP = "127.0.0.3"
DOWN_IP = "127.0.0.4"
WRONG_PW_IP = "127.0.0.5"
INNER_DENIED_IP = "127.0.0.6"
SILENT_IP = "127.0.0.7"
DENIED_PEER_IP = "127.0.0.8"

INNER_CONF = """\
[[rules]]
action = "deny"
to = ["{denied}"]
"""

FRONT_CONF = """\
access_log = "-"
connect_timeout = 3
bind_timeout = 3
upstream = "inner"

[upstreams.inner]
proxy = "socks5://{user}@127.0.0.1:{inner}"
password_file = "inner.pass"

[upstreams.dante]
proxy = "socks5://127.0.0.1:{dante}"

[upstreams.down]
proxy = "socks5://127.0.0.1:{down}"

[upstreams.wrongpw]
proxy = "socks5://{user}@127.0.0.1:{inner}"
password_env = "SOCKSD_TEST_WRONG_PASSWORD"

[upstreams.silent]
proxy = "socks5://127.0.0.1:{silent}"

[[rules]]
action = "deny"
commands = ["bind", "udp"]
to = ["{denied_peer}"]

[[rules]]
action = "allow"
commands = ["bind"]
to = ["{dante_ip}"]
upstream = "dante"

[[rules]]
action = "allow"
commands = ["bind", "udp"]
upstream = "inner"

[[rules]]
action = "allow"
to = ["{direct}"]
upstream = "direct"

[[rules]]
action = "allow"
to = ["{dante_ip}"]
upstream = "dante"

[[rules]]
action = "allow"
to = ["{down_ip}"]
upstream = "down"

[[rules]]
action = "allow"
to = ["{wrong_ip}"]
upstream = "wrongpw"

[[rules]]
action = "allow"
to = ["{silent_ip}"]
upstream = "silent"
"""

SOCKD_CONF = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
{users}client pass {{
  from: 127.0.0.0/8 to: 0.0.0.0/0
}}
socks pass {{
  from: 127.0.0.0/8 to: 0.0.0.0/0
  command: connect bind udpassociate
  log: connect disconnect error
}}
socks pass {{
  from: 0.0.0.0/0 to: 127.0.0.0/8
  command: bindreply udpreply
  log: connect disconnect error
}}
"""


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def listening(port: int) -> bool:
    """Something accepts connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def dante(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """Debian's danted on 127.0.0.1 without authentication; yields (port, log file).

    Dante cannot listen on port 0: a free port is picked, and another one if it was taken."""
    if not os.path.exists(DANTED):
        pytest.skip("danted is not installed (Debian dante-server)")
    tmp = tmp_path_factory.mktemp("danted")
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if os.geteuid() == 0 else ""
    for attempt in range(5):
        port = free_port()
        log = tmp / f"danted-{attempt}.log"
        conf = tmp / "danted.conf"
        conf.write_text(SOCKD_CONF.format(log=log, port=port, users=users))
        proc = subprocess.Popen(
            [DANTED, "-f", str(conf), "-N", "1", "-p", str(tmp / "danted.pid")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            settled = partial(lambda p, n: p.poll() is not None or listening(n), proc, port)
            if wait_for(settled, 15) and proc.poll() is None:
                yield port, log
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            if "in use" not in text:
                raise RuntimeError(f"danted did not start:\n{text}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    raise RuntimeError("danted found its port taken five times")


@pytest.fixture(scope="module")
def inner(
    module_socksd: Callable[..., ServerProcess],
    users_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """The upstream socksd: alice's password required, 127.0.0.6 denied."""
    conf = tmp_path_factory.mktemp("inner") / "inner.toml"
    conf.write_text(INNER_CONF.format(denied=INNER_DENIED_IP))
    return module_socksd(
        "--config", str(conf), "--users", str(users_file), "--listen", "127.0.0.1:0"
    )


@pytest.fixture(scope="module")
def silent() -> Iterator[SilentServer]:
    """Accepts connections and never answers (an upstream that hangs)."""
    server = SilentServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def front(
    module_socksd: Callable[..., ServerProcess],
    inner: ServerProcess,
    dante: tuple[int, Path],
    silent: SilentServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """The socksd clients talk to, chaining to the upstreams above."""
    tmp = tmp_path_factory.mktemp("front")
    secret = tmp / "inner.pass"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    conf = tmp / "front.toml"
    conf.write_text(
        FRONT_CONF.format(
            user=USER,
            inner=inner.port,
            dante=dante[0],
            down=free_port(),
            silent=silent.port,
            direct=DIRECT_IP,
            dante_ip=DANTE_IP,
            down_ip=DOWN_IP,
            wrong_ip=WRONG_PW_IP,
            silent_ip=SILENT_IP,
            denied_peer=DENIED_PEER_IP,
        )
    )
    return module_socksd(
        "--config",
        str(conf),
        "--listen",
        "127.0.0.1:0",
        env={"SOCKSD_TEST_WRONG_PASSWORD": "not-" + PASSWORD},
    )


@pytest.fixture(scope="module")
def echoes() -> Iterator[dict[str, EchoServer]]:
    """An echo server on each loopback address used for routing."""
    servers = {ip: EchoServer(ip) for ip in ("127.0.0.1", DIRECT_IP, DANTE_IP, INNER_DENIED_IP)}
    yield servers
    for server in servers.values():
        server.close()


def lines_with(server: ServerProcess, needle: str) -> list[str]:
    return [line for line in access_lines(server) if needle in line]


def next_line(server: ServerProcess, needle: str, before: int) -> str:
    """The first access-log line containing ``needle`` after the first ``before`` of them."""
    assert wait_for(lambda: len(lines_with(server, needle)) > before, 10), server.log()
    return lines_with(server, needle)[before]


def last_line(server: ServerProcess, needle: str) -> str:
    """The last access-log line containing ``needle`` (written when the session ends)."""
    assert wait_for(lambda: bool(lines_with(server, needle)), 10), server.log()
    return lines_with(server, needle)[-1]


# -- data through the chain ----------------------------------------------------------------------


def test_connect_through_the_global_upstream(
    front: ServerProcess, inner: ServerProcess, echoes: dict[str, EchoServer]
) -> None:
    echo = echoes["127.0.0.1"]
    payload = random_bytes(2_000_000, seed=71)
    with socks_open(front, "127.0.0.1", echo.port) as sock:
        sock.settimeout(IO_TIMEOUT)
        echo_roundtrip(sock, payload[:1000])
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
    target = f"CONNECT 127.0.0.1:{echo.port}"
    front_line = last_line(front, target)
    assert "rep=0x00" in front_line and "upstream=inner" in front_line
    assert f"-> 127.0.0.1:{inner.port} " in front_line  # remote: the upstream proxy
    assert f"up={1000 + len(payload)} down={1000 + len(payload)}" in front_line
    inner_line = last_line(inner, target)
    assert f"user={USER}" in inner_line and "rep=0x00" in inner_line


def test_reply_bnd_is_the_upstreams(front: ServerProcess, echoes: dict[str, EchoServer]) -> None:
    """BND.ADDR/PORT is the address the upstream connects to the target from."""
    echo = echoes["127.0.0.1"]
    sock, raw, host, port = socks_request(front, "127.0.0.1", echo.port)
    with sock:
        assert raw[1] == 0
        sock.settimeout(IO_TIMEOUT)
        echo_roundtrip(sock, b"who are you")
        assert wait_for(lambda: (host, port) in echo.peers, 10), (host, port, echo.peers)


def test_a_name_is_resolved_by_the_upstream(
    front: ServerProcess, inner: ServerProcess, echoes: dict[str, EchoServer]
) -> None:
    echo = echoes["127.0.0.1"]
    with socks_open(front, "localhost", echo.port) as sock:
        sock.settimeout(IO_TIMEOUT)
        echo_roundtrip(sock, b"by name")
    # the inner socksd got the name, not an address: the front did not resolve it
    assert "rep=0x00" in last_line(inner, f"CONNECT localhost:{echo.port}")
    assert "upstream=inner" in last_line(front, f"CONNECT localhost:{echo.port}")


def test_banner_and_pipelined_data_through_the_chain(front: ServerProcess) -> None:
    """A target that speaks first: its banner comes after the reply (the upstream may send
    both in one segment: what follows the reply is held for the relay), once, then the echo.
    The client's request and first data go in one write (pipelined)."""
    banner = b"220 banner from the target\r\n"
    target = EchoServer(banner=banner)
    try:
        sock = socket.create_connection((front.host, front.port), timeout=IO_TIMEOUT)
        with sock:
            sock.sendall(b"\x05\x01\x00" + request("127.0.0.1", target.port) + b"early bytes")
            assert recv_exact(sock, 2) == b"\x05\x00"
            raw, _, _ = read_reply(sock)
            assert raw[1] == 0
            assert recv_exact(sock, len(banner) + 11) == banner + b"early bytes"
            echo_roundtrip(sock, b"then the echo")
    finally:
        target.close()


@pytest.mark.parametrize("size", [0, 1, 300_000], ids=["empty", "one-byte", "300k"])
def test_client_half_close_through_the_chain(front: ServerProcess, size: int) -> None:
    sink = EchoServer(mode="halfclose")
    data = random_bytes(size, seed=size + 7)
    try:
        with socks_open(front, "127.0.0.1", sink.port) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answer = recv_until_eof(sock, 30)
    finally:
        sink.close()
    assert answer == hashlib.sha256(data).hexdigest().encode()


def test_target_half_close_through_the_chain(front: ServerProcess) -> None:
    target = ReverseHalfCloseServer()
    data = random_bytes(400_000, seed=72)
    try:
        with socks_open(front, "127.0.0.1", target.port) as sock:
            greeting = recv_exact(sock, len(ReverseHalfCloseServer.greeting))
            assert greeting == ReverseHalfCloseServer.greeting
            assert recv_until_eof(sock, 15) == b""  # the target's EOF; our direction stays open
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert target.done.wait(30), "the target never saw the client's EOF"
        assert target.received_bytes == len(data)
        assert target.received_digest == hashlib.sha256(data).hexdigest()
    finally:
        target.close()


# -- routes by rule ------------------------------------------------------------------------------


def test_rules_route_one_destination_direct_another_through_dante(
    front: ServerProcess,
    inner: ServerProcess,
    dante: tuple[int, Path],
    echoes: dict[str, EchoServer],
) -> None:
    direct, via_dante = echoes[DIRECT_IP], echoes[DANTE_IP]
    for echo in (direct, via_dante):
        with socks_open(front, echo.host, echo.port) as sock:
            sock.settimeout(IO_TIMEOUT)
            echo_roundtrip(sock, random_bytes(100_000, seed=echo.port))
    direct_line = last_line(front, f"CONNECT {DIRECT_IP}:{direct.port}")
    assert "upstream=" not in direct_line and "rule=4" in direct_line
    assert f"-> {DIRECT_IP}:{direct.port} " in direct_line
    dante_line = last_line(front, f"CONNECT {DANTE_IP}:{via_dante.port}")
    assert "upstream=dante" in dante_line and "rule=5" in dante_line
    assert f"-> 127.0.0.1:{dante[0]} " in dante_line
    # Dante saw only the second; the inner socksd saw neither
    dante_log = dante[1].read_text(errors="replace")
    assert f"{DANTE_IP}.{via_dante.port}" in dante_log, dante_log
    assert f"{DIRECT_IP}.{direct.port}" not in dante_log, dante_log
    assert not lines_with(inner, f":{direct.port} ") and not lines_with(
        inner, f":{via_dante.port} "
    )
    # the direct connection came from the front itself: from a loopback address, not Dante's
    assert direct.peers and via_dante.peers


def test_curl_through_the_chain(front: ServerProcess, inner: ServerProcess, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = random_bytes(50_000, seed=73)
    (tmp_path / "file.bin").write_bytes(body)
    import http.server
    import threading

    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        port = httpd.server_address[1]
        for flag, host in (("--socks5", "127.0.0.1"), ("--socks5-hostname", "localhost")):
            result = subprocess.run(
                [
                    CURL,
                    "--silent",
                    "--show-error",
                    "--max-time",
                    "20",
                    flag,
                    f"{front.host}:{front.port}",
                    f"http://{host}:{port}/file.bin",
                ],
                capture_output=True,
                timeout=40,
                env=clean_env(),
                check=False,
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == body
            assert "rep=0x00" in last_line(inner, f"CONNECT {host}:{port}")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_python_socks_through_the_chain(
    front: ServerProcess, echoes: dict[str, EchoServer]
) -> None:
    from python_socks.async_.asyncio import Proxy as AsyncioProxy

    echo = echoes["127.0.0.1"]

    async def run() -> bytes:
        proxy = AsyncioProxy.from_url(f"socks5://{front.host}:{front.port}", rdns=True)
        sock = await proxy.connect("localhost", echo.port, timeout=IO_TIMEOUT)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"python-socks")
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
        writer.close()
        return data

    assert asyncio.run(run()) == b"python-socks"


# -- failures ------------------------------------------------------------------------------------


def reply_code(server: ServerProcess, host: str, port: int, cmd: int = 1) -> int:
    sock, raw, _, _ = socks_request(server, host, port, cmd=cmd)
    with sock:
        assert_closed(sock)
    return raw[1]


def test_upstream_down_is_general_failure(front: ServerProcess) -> None:
    assert reply_code(front, DOWN_IP, 80) == 0x01
    line = last_line(front, f"CONNECT {DOWN_IP}:80")
    assert "upstream=down" in line and "unreachable" in line


def test_upstream_connect_timeout_is_general_failure(
    socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """No TCP connection to the upstream within connect_timeout: 0x01 (the target was not
    tried), not the 0x06 of a target that did not answer."""
    with full_backlog_target() as (host, port):
        conf = tmp_path / "front.toml"
        conf.write_text(
            f'connect_timeout = 1\nupstream = "hung"\n[upstreams.hung]\nproxy = "socks5://{host}:{port}"\n'
        )
        front = socksd("--config", str(conf), "--listen", "127.0.0.1:0")
        assert reply_code(front, "127.0.0.1", 80) == 0x01
        line = last_line(front, "CONNECT 127.0.0.1:80")
        assert "unreachable: connect timeout after 1s" in line and "upstream=hung" in line
        assert "upstream hung (127.0.0.1:" in wait_for_log(front, "unreachable")


def test_upstream_refused_target_is_passed_on(front: ServerProcess) -> None:
    closed = free_port()
    assert reply_code(front, "127.0.0.1", closed) == 0x05
    assert "replied 0x05" in last_line(front, f"CONNECT 127.0.0.1:{closed}")


def test_upstream_rule_denial_is_passed_on(
    front: ServerProcess, inner: ServerProcess, echoes: dict[str, EchoServer]
) -> None:
    port = echoes[INNER_DENIED_IP].port
    assert reply_code(front, INNER_DENIED_IP, port) == 0x02
    assert "rule=1" in last_line(inner, f"CONNECT {INNER_DENIED_IP}:{port}")


def test_dante_refused_target_is_passed_on(front: ServerProcess) -> None:
    closed = free_port()  # nothing listens on it at DANTE_IP either
    assert reply_code(front, DANTE_IP, closed) == 0x05
    assert "upstream=dante" in last_line(front, f"CONNECT {DANTE_IP}:{closed}")


def test_wrong_upstream_password_is_general_failure_and_logged(
    front: ServerProcess, inner: ServerProcess
) -> None:
    assert reply_code(front, WRONG_PW_IP, 80) == 0x01
    text = wait_for_log(front, "login to upstream")
    assert re.search(
        r"ERROR.*login to upstream wrongpw \(127\.0\.0\.1:\d+\) failed: proxy rejected", text
    )
    assert "not-" + PASSWORD not in text and PASSWORD not in text  # never logged
    assert "authentication failed" in wait_for_log(inner, "authentication failed")


def test_upstream_silent_is_ttl_expired(front: ServerProcess) -> None:
    """Connected but no answer within connect_timeout (3 s here): 0x06, as a slow target."""
    assert reply_code(front, SILENT_IP, 80) == 0x06
    assert "no reply within 3s" in last_line(front, f"CONNECT {SILENT_IP}:80")


# -- UDP ASSOCIATE through an upstream ----------------------------------------------------------


def test_udp_through_the_upstream(
    front: ServerProcess, inner: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    from socksd.client import udp_associate

    payloads = [random_bytes(n, seed=n) for n in (1, 100, 1200, 8000)]

    async def run() -> list[tuple[bytes, tuple[str, int]]]:
        got = []
        async with udp_associate(f"socks5://{front.host}:{front.port}") as assoc:
            for i, payload in enumerate(payloads):
                host = "localhost" if i % 2 else "127.0.0.1"  # a name goes on as a name
                await assoc.sendto(payload, (host, udp_echo.port))
                got.append(await assoc.recvfrom(IO_TIMEOUT))
        return got

    logged = len(lines_with(front, "UDP_ASSOCIATE")), len(lines_with(inner, "UDP_ASSOCIATE"))
    got = asyncio.run(run())
    assert [data for data, _ in got] == payloads
    assert all(source == ("127.0.0.1", udp_echo.port) for _, source in got)
    # the echo server saw the inner socksd's relay, never the client or the front
    line = next_line(front, "UDP_ASSOCIATE", logged[0])
    total = sum(map(len, payloads))
    assert "upstream=inner" in line and "dgrams_up=4 dgrams_down=4 dropped=0" in line
    assert f"up={total} down={total}" in line
    inner_line = next_line(inner, "UDP_ASSOCIATE", logged[1])
    assert f"user={USER}" in inner_line and "dgrams_up=4 dgrams_down=4" in inner_line


def test_udp_through_dante(
    socksd: Callable[..., ServerProcess],
    dante: tuple[int, Path],
    udp_echo: UdpEchoServer,
    tmp_path: Path,
) -> None:
    from socksd.client import udp_associate

    conf = tmp_path / "front.toml"
    conf.write_text(
        f'upstream = "dante"\n[upstreams.dante]\nproxy = "socks5://127.0.0.1:{dante[0]}"\n'
    )
    front = socksd("--config", str(conf), "--listen", "127.0.0.1:0")
    payloads = [random_bytes(n, seed=n + 5) for n in (10, 1000, 4000)]

    async def run() -> list[bytes]:
        got = []
        async with udp_associate(f"socks5://{front.host}:{front.port}") as assoc:
            for payload in payloads:
                await assoc.sendto(payload, ("127.0.0.1", udp_echo.port))
                got.append((await assoc.recvfrom(IO_TIMEOUT))[0])
        return got

    assert asyncio.run(run()) == payloads
    line = last_line(front, "UDP_ASSOCIATE")
    assert "upstream=dante" in line and "dgrams_up=3 dgrams_down=3 dropped=0" in line
    assert "udpassociate" in dante[1].read_text(errors="replace")


def test_udp_destinations_are_checked_by_the_front(
    front: ServerProcess, inner: ServerProcess, udp_echo: UdpEchoServer
) -> None:
    """A datagram to a destination the front's rules deny (rule 1) or with a malformed header
    is dropped by the front and counted; it never reaches the upstream."""
    from socksd.client import udp_associate

    async def run() -> bytes:
        async with udp_associate(f"socks5://{front.host}:{front.port}") as assoc:
            transport = assoc._transport
            assert transport is not None
            transport.sendto(b"\x00\x00\x00\x09garbage")  # ATYP 9: dropped as "header"
            await assoc.sendto(b"denied", (DENIED_PEER_IP, udp_echo.port))
            await assoc.sendto(b"after", ("127.0.0.1", udp_echo.port))
            data, _ = await assoc.recvfrom(IO_TIMEOUT)
            return data

    before = udp_echo.received
    logged = len(lines_with(front, "UDP_ASSOCIATE")), len(lines_with(inner, "UDP_ASSOCIATE"))
    assert asyncio.run(run()) == b"after"
    assert udp_echo.received == before + 1
    line = next_line(front, "UDP_ASSOCIATE", logged[0])
    assert "dgrams_up=1 dgrams_down=1 dropped=2(denied=1,header=1)" in line
    assert "dgrams_up=1 dgrams_down=1 dropped=0" in next_line(inner, "UDP_ASSOCIATE", logged[1])


# -- BIND through an upstream --------------------------------------------------------------------


def bind_through(
    front: ServerProcess, dst: str, source: str = "127.0.0.1"
) -> tuple[socket.socket, str, int, socket.socket]:
    """A BIND through ``front`` for ``dst`` and a peer (from ``source``) connecting to the
    first reply's address: (control socket, first reply's host, port, peer socket)."""
    sock, raw, host, port = socks_request(front, dst, 0, cmd=2)
    assert raw[1] == 0, raw
    peer = socket.create_connection((host, port), timeout=IO_TIMEOUT, source_address=(source, 0))
    return sock, host, port, peer


def test_bind_through_the_upstream(front: ServerProcess, inner: ServerProcess) -> None:
    logged = len(lines_with(front, "BIND 0.0.0.0:0")), len(lines_with(inner, "BIND 0.0.0.0:0"))
    sock, host, port, peer = bind_through(front, "0.0.0.0")
    with sock, peer:
        assert host == "127.0.0.1" and port not in (front.port, inner.port)  # inner's listener
        raw, peer_host, peer_port = read_reply(sock)  # the second reply: the peer
        assert raw[1] == 0 and (peer_host, peer_port) == peer.getsockname()[:2]
        data = random_bytes(200_000, seed=74)
        peer.sendall(data)
        peer.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock, 30) == data  # the peer's half-close reaches the client
        sock.sendall(b"answer after the peer's EOF")
        sock.shutdown(socket.SHUT_WR)
        peer.settimeout(IO_TIMEOUT)
        assert recv_until_eof(peer, 30) == b"answer after the peer's EOF"
    line = next_line(front, "BIND 0.0.0.0:0", logged[0])
    assert "rep=0x00" in line and "upstream=inner" in line  # rule 3's (rule 2 names a `to`)
    assert f"-> 127.0.0.1:{peer_port} " in line
    assert "rep=0x00" in next_line(inner, "BIND 0.0.0.0:0", logged[1])


def test_bind_through_dante(front: ServerProcess, dante: tuple[int, Path]) -> None:
    """A BIND for a peer at 127.0.0.3 goes to Dante (rule 4); Dante's replies are passed on."""
    sock, host, port, peer = bind_through(front, DANTE_IP, source=DANTE_IP)
    with sock, peer:
        assert port != dante[0]
        raw, peer_host, peer_port = read_reply(sock)
        assert raw[1] == 0 and (peer_host, peer_port) == peer.getsockname()[:2]
        peer.sendall(b"from the peer")
        assert recv_exact(sock, 13) == b"from the peer"
        sock.sendall(b"to the peer")
        peer.settimeout(IO_TIMEOUT)
        assert recv_exact(peer, 11) == b"to the peer"
    line = last_line(front, f"BIND {DANTE_IP}:0")
    assert "rep=0x00" in line and "upstream=dante" in line
    assert host == "127.0.0.1"  # Dante's external address


def test_bind_peer_denied_by_the_front(front: ServerProcess) -> None:
    sock, _, _, peer = bind_through(front, "0.0.0.0", source=DENIED_PEER_IP)
    with sock, peer:
        raw, _, _ = read_reply(sock)
        assert raw[1] == 0x02
        assert_closed(sock)
    assert "denied by rule 1" in last_line(front, f"-> {DENIED_PEER_IP}:")


def test_bind_through_the_upstream_times_out(front: ServerProcess) -> None:
    """No peer within the front's bind_timeout (3 s): second reply 0x06."""
    sock, raw, _, _ = socks_request(front, "127.0.0.1", 0, cmd=2)
    with sock:
        assert raw[1] == 0
        raw2, _, _ = read_reply(sock)
        assert raw2[1] == 0x06
        assert_closed(sock)
    assert "no peer connected within 3s" in last_line(front, "BIND 127.0.0.1:0")


def test_check_config_shows_upstreams_and_routes(tmp_path: Path) -> None:
    (tmp_path / "corp.pass").write_text("never-shown\n")
    conf = tmp_path / "socksd.toml"
    conf.write_text(
        'upstream = "corp"\n'
        '[upstreams.corp]\nproxy = "socks5://bob@10.0.0.1:1080"\npassword_file = "corp.pass"\n'
        '[[rules]]\naction = "allow"\nports = [22]\nupstream = "direct"\n'
    )
    result = socksd_cli("check-config", str(conf))
    assert result.returncode == 0, result.stderr
    assert (
        f"upstream corp: socks5 10.0.0.1:1080, username/password as 'bob' "
        f"(password from {tmp_path / 'corp.pass'})" in result.stdout
    )
    assert "rule 1: allow ports=22 upstream=direct" in result.stdout
    assert "upstream: corp (for allowed requests whose rule names none)" in result.stdout
    assert "never-shown" not in result.stdout
    conf.write_text(conf.read_text().replace('upstream = "direct"', 'upstream = "crop"'))
    result = socksd_cli("check-config", str(conf))
    assert result.returncode != 0
    assert "rule 1.upstream: 'crop' is not in [upstreams] (known: corp, direct)" in result.stderr


# -- the session's limits hold through an upstream ---------------------------------------------


def test_rule_idle_timeout_and_bandwidth_hold_through_the_upstream(
    socksd: Callable[..., ServerProcess],
    inner: ServerProcess,
    users_file: Path,
    tmp_path: Path,
) -> None:
    """The relay is the one every session gets: a rule's idle_timeout closes an idle session
    and the user's [bandwidth] paces a transfer (checked from below only: 3x the rate takes at
    least 2 s), through the upstream as directly."""
    rate = 200_000
    data = random_bytes(3 * rate, seed=75)
    source = SourceServer(data)
    idle = EchoServer()
    (tmp_path / "inner.pass").write_text(PASSWORD + "\n")
    conf = tmp_path / "front.toml"
    conf.write_text(
        f'users = "{users_file}"\nupstream = "inner"\n'
        f'[upstreams.inner]\nproxy = "socks5://{USER}@127.0.0.1:{inner.port}"\n'
        'password_file = "inner.pass"\n'
        f"[bandwidth]\n{USER} = {rate}\n"
        f'[[rules]]\naction = "allow"\nports = [{idle.port}]\nidle_timeout = 1\n'
    )
    front = socksd("--config", str(conf), "--listen", "127.0.0.1:0")
    try:
        with socks_open(front, "127.0.0.1", source.port, user=USER, password=PASSWORD) as sock:
            start = time.monotonic()
            assert recv_until_eof(sock, 30) == data
            assert time.monotonic() - start >= 2.0
        with socks_open(front, "127.0.0.1", idle.port, user=USER, password=PASSWORD) as sock:
            echo_roundtrip(sock, b"then nothing")
            assert recv_until_eof(sock, 10) == b""  # closed by the front, not by the test
        line = last_line(front, f"CONNECT 127.0.0.1:{idle.port}")
        assert "upstream=inner" in line and "idle for 1s" in line
        assert "upstream=inner" in last_line(front, f"CONNECT 127.0.0.1:{source.port}")
    finally:
        source.close()
        idle.close()


# -- reload --------------------------------------------------------------------------------------


def test_reload_reads_the_password_file_again(
    socksd: Callable[..., ServerProcess],
    inner: ServerProcess,
    echoes: dict[str, EchoServer],
    tmp_path: Path,
) -> None:
    secret = tmp_path / "inner.pass"
    secret.write_text("wrong\n")
    conf = tmp_path / "front.toml"
    conf.write_text(
        f'upstream = "inner"\n[upstreams.inner]\nproxy = "socks5://{USER}@127.0.0.1:{inner.port}"\n'
        'password_file = "inner.pass"\n'
    )
    front = socksd("--config", str(conf), "--listen", "127.0.0.1:0")
    echo = echoes["127.0.0.1"]
    assert reply_code(front, "127.0.0.1", echo.port) == 0x01

    def reloads(outcome: str) -> int:
        return front.log().count(outcome)

    secret.write_text(PASSWORD + "\n")
    front.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: reloads("reloaded configuration") == 1, 10), front.log()
    with socks_open(front, "127.0.0.1", echo.port) as sock:
        sock.settimeout(IO_TIMEOUT)
        echo_roundtrip(sock, b"after the reload")

    secret.unlink()  # a reload that cannot read the password keeps the running configuration
    front.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: reloads("reload failed") == 1, 10), front.log()
    assert "upstreams.inner.password_file: cannot read" in front.log()
    with socks_open(front, "127.0.0.1", echo.port) as sock:
        sock.settimeout(IO_TIMEOUT)
        echo_roundtrip(sock, b"still the old password")
    assert PASSWORD not in front.log()
