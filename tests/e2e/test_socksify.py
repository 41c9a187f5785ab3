"""Dante's client (``socksify``, an LD_PRELOAD wrapper) driving BIND and UDP ASSOCIATE.

Two small C programs (tests/e2e/c/, compiled here with gcc) use the plain socket calls:
``bind_accept`` does socket/bind/listen/accept, which socksify turns into a SOCKS BIND (it does
not intercept ``accept4``, so the program cannot be Python); ``udp_echo_client`` does
sendto/recvfrom, which socksify turns into a UDP ASSOCIATE. The route in the SOCKS_CONF file names
the three commands and SOCKS_AUTOADD_LANROUTES=no keeps loopback traffic from going direct; the
access log proves that the traffic went through socksd.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.support import IO_TIMEOUT, UdpEchoServer, access_lines, recv_until_eof, wait_for
from tests.servers import ServerProcess

C_DIR = Path(__file__).parent / "c"

pytestmark = pytest.mark.skipif(
    shutil.which("socksify") is None, reason="Dante's socksify is not installed (dante-client)"
)


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc) to build the socksify test programs")
    out = tmp_path_factory.mktemp("cprogs")
    built = {}
    for name in ("bind_accept", "udp_echo_client"):
        exe = out / name
        subprocess.run(
            [gcc, "-O1", "-Wall", "-o", str(exe), str(C_DIR / f"{name}.c")],
            check=True,
            capture_output=True,
            timeout=120,
        )
        built[name] = exe
    return built


@pytest.fixture(scope="module")
def dante_server(module_socksd: Callable[..., ServerProcess]) -> ServerProcess:
    return module_socksd()


def socksify_env(server: ServerProcess, tmp_path: Path) -> dict[str, str]:
    conf = tmp_path / "socks.conf"
    conf.write_text(
        "logoutput: stderr\n"
        "route {\n"
        f"    from: 0.0.0.0/0 to: 0.0.0.0/0 via: {server.host} port = {server.port}\n"
        "    proxyprotocol: socks_v5\n"
        "    command: bind connect udpassociate\n"
        "    method: none\n"
        "}\n"
    )
    return {**os.environ, "SOCKS_CONF": str(conf), "SOCKS_AUTOADD_LANROUTES": "no"}


@pytest.fixture
def udp_echo() -> Iterator[UdpEchoServer]:
    server = UdpEchoServer()
    yield server
    server.close()


def test_socksify_bind(
    dante_server: ServerProcess, programs: dict[str, Path], tmp_path: Path
) -> None:
    before = len([line for line in access_lines(dante_server) if " BIND " in line])
    proc = subprocess.Popen(
        ["socksify", str(programs["bind_accept"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=socksify_env(dante_server, tmp_path),
    )
    try:
        assert proc.stdout is not None
        listen = proc.stdout.readline()
        match = re.fullmatch(r"LISTEN (\S+) (\d+)\n", listen)
        assert match, (
            f"bind_accept said {listen!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        )
        host, port = match.group(1), int(match.group(2))
        # getsockname() under socksify gives the proxy's BND address: socksd's listener
        assert host == "127.0.0.1"
        payload = bytes(range(256)) * 400
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as peer:
            peer.sendall(payload)
            peer.shutdown(socket.SHUT_WR)
            answer = recv_until_eof(peer, timeout=30)
            peer_address = peer.getsockname()[:2]
        total, checksum = 0, 0
        for byte in payload:
            checksum = (checksum * 31 + byte) % 1000000007
            total += 1
        assert answer == f"received {total} bytes {checksum}\n".encode()
        assert proc.stdout.readline() == f"PEER {peer_address[0]} {peer_address[1]}\n"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert wait_for(
        lambda: len([line for line in access_lines(dante_server) if " BIND " in line]) > before, 10
    )
    line = [line for line in access_lines(dante_server) if " BIND " in line][-1]
    assert f"-> {peer_address[0]}:{peer_address[1]} rep=0x00" in line, line
    assert f"down={len(payload)}" in line, line


@pytest.mark.parametrize("size", [1, 1400, 60000])
def test_socksify_udp(
    dante_server: ServerProcess,
    programs: dict[str, Path],
    tmp_path: Path,
    udp_echo: UdpEchoServer,
    size: int,
) -> None:
    count = 50
    needle = f"UDP_ASSOCIATE .* dgrams_up={count} dgrams_down={count} dropped=0"

    def logged() -> int:
        return len([line for line in access_lines(dante_server) if re.search(needle, line)])

    before = logged()
    result = subprocess.run(
        [
            "socksify",
            str(programs["udp_echo_client"]),
            "127.0.0.1",
            str(udp_echo.port),
            str(count),
            str(size),
        ],
        capture_output=True,
        text=True,
        env=socksify_env(dante_server, tmp_path),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == f"OK {count} 0 127.0.0.1 {udp_echo.port}\n", result.stdout
    # The echo server saw the relay, not the program: the datagrams went through socksd.
    assert udp_echo.received == count
    relay_ports = {port for _, port in udp_echo.sources}
    assert wait_for(lambda: logged() == before + 1, 10), dante_server.log()
    assert len(relay_ports) == 1
