"""Handshake edge cases: pipelining, byte-by-byte, IPv6, timeouts, garbage, banner ordering."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable

import pytest

from tests.e2e.support import (
    CLOSE_TIMEOUT,
    PASSWORD,
    USER,
    connect_proxy,
    echo_roundtrip,
    has_ipv6,
    read_reply,
    recv_exact,
    recv_until_eof,
    request,
    socks_open,
    userpass,
)
from tests.servers import EchoServer, ServerProcess

FIRST_PAYLOAD = b"first payload, sent in the same write as the handshake\x00\xff" * 20


def _check_pipelined(sock: socket.socket, expected_method: bytes, expect_auth: bool) -> None:
    assert recv_exact(sock, 2) == expected_method
    if expect_auth:
        assert recv_exact(sock, 2) == b"\x01\x00"
    raw, _, _ = read_reply(sock)
    assert raw[:2] == b"\x05\x00", raw.hex()
    assert recv_exact(sock, len(FIRST_PAYLOAD)) == FIRST_PAYLOAD
    echo_roundtrip(sock, b"and more")


def test_pipelined_no_auth(open_server: ServerProcess, module_echo: EchoServer) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\x01\x00" + request("127.0.0.1", module_echo.port) + FIRST_PAYLOAD)
        _check_pipelined(sock, b"\x05\x00", expect_auth=False)


def test_pipelined_domain(open_server: ServerProcess, module_echo: EchoServer) -> None:
    with connect_proxy(open_server) as sock:
        sock.sendall(b"\x05\x01\x00" + request("localhost", module_echo.port) + FIRST_PAYLOAD)
        _check_pipelined(sock, b"\x05\x00", expect_auth=False)


def test_pipelined_with_auth(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    with connect_proxy(auth_server) as sock:
        sock.sendall(
            b"\x05\x01\x02"
            + userpass(USER, PASSWORD)
            + request("localhost", module_echo.port)
            + FIRST_PAYLOAD
        )
        _check_pipelined(sock, b"\x05\x02", expect_auth=True)


def test_pipelined_then_eof(open_server: ServerProcess) -> None:
    """Handshake + payload + EOF in one go: the target still gets the payload and answers."""
    target = EchoServer(mode="halfclose")
    try:
        import hashlib

        with connect_proxy(open_server) as sock:
            sock.sendall(b"\x05\x01\x00" + request("127.0.0.1", target.port) + FIRST_PAYLOAD)
            sock.shutdown(socket.SHUT_WR)
            assert recv_exact(sock, 2) == b"\x05\x00"
            raw, _, _ = read_reply(sock)
            assert raw[:2] == b"\x05\x00"
            assert recv_until_eof(sock, 15) == hashlib.sha256(FIRST_PAYLOAD).hexdigest().encode()
    finally:
        target.close()


@pytest.mark.parametrize("nodelay", [False, True], ids=["nagle", "nodelay"])
@pytest.mark.parametrize("auth", [False, True], ids=["noauth", "auth"])
def test_one_byte_at_a_time(
    open_server: ServerProcess,
    auth_server: ServerProcess,
    module_echo: EchoServer,
    nodelay: bool,
    auth: bool,
) -> None:
    server = auth_server if auth else open_server
    sock = socket.create_connection((server.host, server.port), timeout=15)
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        steps = [(b"\x05\x01\x02" if auth else b"\x05\x01\x00", 2)]
        if auth:
            steps.append((userpass(USER, PASSWORD), 2))
        steps.append((request("localhost", module_echo.port), 10))
        answers = []
        for message, answer_len in steps:
            for i in range(len(message)):
                sock.sendall(message[i : i + 1])
                time.sleep(0.005)
            answers.append(recv_exact(sock, answer_len))
        assert answers[0] == (b"\x05\x02" if auth else b"\x05\x00")
        if auth:
            assert answers[1] == b"\x01\x00"
        assert answers[-1][:4] == b"\x05\x00\x00\x01"
        for i in range(8):
            sock.sendall(bytes((i,)))
            time.sleep(0.005)
        assert recv_exact(sock, 8) == bytes(range(8))


def test_ipv6_target_atyp4(open_server: ServerProcess, echo6: EchoServer) -> None:
    with socks_open(open_server, "::1", echo6.port) as sock:
        echo_roundtrip(sock, b"over ipv6")


def test_server_on_ipv6_loopback(
    socksd: Callable[..., ServerProcess], echo6: EchoServer, module_echo: EchoServer
) -> None:
    if not has_ipv6():
        pytest.skip("::1 is not available")
    server = socksd("--listen", "[::1]:0")
    assert server.host == "::1"
    assert server.addresses == [f"[::1]:{server.port}"]
    with socks_open(server, "::1", echo6.port) as sock:
        echo_roundtrip(sock, b"v6 to v6")
    with socks_open(server, "localhost", module_echo.port) as sock:
        echo_roundtrip(sock, b"v6 proxy, v4 target")
    assert "[::1]:" in server.log()


def test_handshake_timeout_silent_client(
    socksd: Callable[..., ServerProcess], module_echo: EchoServer
) -> None:
    server = socksd("--handshake-timeout", "1")
    with connect_proxy(server) as sock:
        assert recv_until_eof(sock, CLOSE_TIMEOUT + 5) == b""
    # A partial greeting, and a complete greeting without a request, time out too.
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x02")
        assert recv_until_eof(sock, CLOSE_TIMEOUT + 5) == b""
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert recv_until_eof(sock, CLOSE_TIMEOUT + 5) == b"\x05\x00"
    with socks_open(server, "127.0.0.1", module_echo.port) as sock:
        time.sleep(1.5)  # the handshake timeout no longer applies once relaying
        echo_roundtrip(sock, b"relay outlives the handshake timeout")
    assert "handshake not done within 1s" in server.log()


GARBAGE = [
    b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
    b"CONNECT example.test:443 HTTP/1.1\r\n\r\n",
    b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00",  # SOCKS4
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # TLS ClientHello start
    b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50",  # greeting + bad request
    random.Random(7).randbytes(300),
    random.Random(8).randbytes(5000),
]


@pytest.mark.parametrize(
    "data",
    GARBAGE,
    ids=["http", "http-connect", "socks4", "tls", "bad-cmd", "random300", "random5000"],
)
def test_garbage_gets_a_clean_close(
    open_server: ServerProcess, module_echo: EchoServer, data: bytes
) -> None:
    with connect_proxy(open_server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # a reset while sending is a close too
        rest = recv_until_eof(sock)
        assert len(rest) <= 12, rest  # at most a refusal, never relayed data
    with socks_open(open_server, "127.0.0.1", module_echo.port) as sock:
        echo_roundtrip(sock, b"next client")
    assert open_server.alive()
    assert "Traceback" not in open_server.log()


BANNER = b"SSH-2.0-test\r\n"


def test_banner_first_target_reply_precedes_banner(open_server: ServerProcess) -> None:
    target = EchoServer(mode="echo", banner=BANNER)
    count = 50

    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection(open_server.host, open_server.port)
        try:
            host = "localhost" if i % 2 else "127.0.0.1"
            writer.write(b"\x05\x01\x00" + request(host, target.port))
            await writer.drain()
            head = await reader.readexactly(2 + 10 + len(BANNER))
            writer.write(b"bye")
            await writer.drain()
            tail = await reader.readexactly(3)
            return head + tail
        finally:
            writer.close()

    async def main() -> list[bytes | BaseException]:
        async with asyncio.timeout(60):
            return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        target.close()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for data in results:
        assert isinstance(data, bytes)
        assert data[:2] == b"\x05\x00"
        assert data[2:6] == b"\x05\x00\x00\x01", data.hex()
        assert data[12:] == BANNER + b"bye", data
