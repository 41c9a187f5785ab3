"""Third-party Python SOCKS clients (python-socks, httpx + httpx-socks) and socksd.client."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from urllib.parse import quote

import httpx
import pytest
from httpx_socks import AsyncProxyTransport, SyncProxyTransport
from python_socks import ProxyError as PySocksProxyError
from python_socks.async_.asyncio import Proxy as AsyncioProxy

import socksd.client
from socksd.client import (
    AuthenticationError,
    Proxy,
    ProxyConnectionError,
    ProxyError,
    ReplyError,
)
from tests.e2e.support import PASSWORD, USER, HttpServer, access_lines, recv_exact, wait_for
from tests.helpers import refused_port
from tests.servers import EchoServer, ServerProcess

PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value


def url(server: ServerProcess, user: str | None = None, password: str | None = None) -> str:
    host = f"[{server.host}]" if ":" in server.host else server.host
    cred = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
    return f"socks5://{cred}{host}:{server.port}"


def logged_target(server: ServerProcess, target: str) -> str:
    """The access-log line of the session to ``target`` (waits for it)."""
    needle = f"CONNECT {target} "
    wait_for(lambda: any(needle in line for line in access_lines(server)), timeout=10)
    lines = [line for line in access_lines(server) if needle in line]
    assert lines, f"no access line for {target}:\n{server.log()}"
    return lines[-1]


async def _echo_over(sock: socket.socket, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 15)
    finally:
        writer.close()
        await writer.wait_closed()


# -- python-socks --------------------------------------------------------------------------------


@pytest.mark.parametrize("rdns", [True, False])
def test_python_socks_no_auth(
    open_server: ServerProcess, module_echo: EchoServer, rdns: bool
) -> None:
    async def main() -> bytes:
        proxy = AsyncioProxy.from_url(url(open_server), rdns=rdns)
        sock = await proxy.connect("localhost", module_echo.port, timeout=15)
        return await _echo_over(sock, PAYLOAD)

    assert asyncio.run(main()) == PAYLOAD
    # rdns=True sends the name to the proxy; rdns=False resolves it here and sends the address.
    target = f"localhost:{module_echo.port}" if rdns else f"127.0.0.1:{module_echo.port}"
    assert "rep=0x00" in logged_target(open_server, target)


@pytest.mark.parametrize("rdns", [True, False])
def test_python_socks_auth(auth_server: ServerProcess, module_echo: EchoServer, rdns: bool) -> None:
    async def main() -> bytes:
        proxy = AsyncioProxy.from_url(url(auth_server, USER, PASSWORD), rdns=rdns)
        sock = await proxy.connect("localhost", module_echo.port, timeout=15)
        return await _echo_over(sock, PAYLOAD)

    assert asyncio.run(main()) == PAYLOAD
    assert PASSWORD not in auth_server.log()


def test_python_socks_wrong_password(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    async def main() -> None:
        proxy = AsyncioProxy.from_url(url(auth_server, USER, "wrong"))
        await proxy.connect("127.0.0.1", module_echo.port, timeout=15)

    with pytest.raises(PySocksProxyError):
        asyncio.run(main())


def test_python_socks_refused_reports_code_5(open_server: ServerProcess) -> None:
    port = refused_port()

    async def main() -> None:
        proxy = AsyncioProxy.from_url(url(open_server))
        await proxy.connect("127.0.0.1", port, timeout=15)

    with pytest.raises(PySocksProxyError) as info:
        asyncio.run(main())
    assert info.value.error_code == 5


def test_python_socks_ipv6_target(open_server: ServerProcess, echo6: EchoServer) -> None:
    async def main() -> bytes:
        proxy = AsyncioProxy.from_url(url(open_server))
        sock = await proxy.connect("::1", echo6.port, timeout=15)
        return await _echo_over(sock, PAYLOAD)

    assert asyncio.run(main()) == PAYLOAD


# -- httpx + httpx-socks -------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [False, True], ids=["noauth", "auth"])
def test_httpx_async(
    open_server: ServerProcess, auth_server: ServerProcess, http4: HttpServer, auth: bool
) -> None:
    proxy_url = url(auth_server, USER, PASSWORD) if auth else url(open_server)

    async def main() -> httpx.Response:
        transport = AsyncProxyTransport.from_url(proxy_url, rdns=True)
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=15) as client:
            return await client.get(f"http://localhost:{http4.port}/async")

    response = asyncio.run(main())
    assert response.status_code == 200
    assert response.content == HttpServer.body
    server = auth_server if auth else open_server
    line = logged_target(server, f"localhost:{http4.port}")
    assert "rep=0x00" in line
    if auth:
        assert f"user={USER} " in line


@pytest.mark.parametrize("auth", [False, True], ids=["noauth", "auth"])
def test_httpx_sync(
    open_server: ServerProcess, auth_server: ServerProcess, http4: HttpServer, auth: bool
) -> None:
    proxy_url = url(auth_server, USER, PASSWORD) if auth else url(open_server)
    transport = SyncProxyTransport.from_url(proxy_url)
    with httpx.Client(transport=transport, trust_env=False, timeout=15) as client:
        responses = [client.get(f"http://127.0.0.1:{http4.port}/sync{i}") for i in range(3)]
    for response in responses:
        assert response.status_code == 200
        assert response.content == HttpServer.body


def test_httpx_ipv6(open_server: ServerProcess, http6: HttpServer) -> None:
    transport = SyncProxyTransport.from_url(url(open_server))
    with httpx.Client(transport=transport, trust_env=False, timeout=15) as client:
        response = client.get(http6.url)
    assert response.status_code == 200
    assert response.content == HttpServer.body


def test_httpx_wrong_password(auth_server: ServerProcess, http4: HttpServer) -> None:
    transport = SyncProxyTransport.from_url(url(auth_server, USER, "wrong"))
    with (
        httpx.Client(transport=transport, trust_env=False, timeout=15) as client,
        pytest.raises((httpx.HTTPError, PySocksProxyError)),
    ):
        client.get(http4.url)


# -- socksd.client -------------------------------------------------------------------------------


def test_proxy_parse() -> None:
    p = Proxy.parse("socks5://al%40ice:p%3Ass@127.0.0.1:1081")
    assert (p.host, p.port, p.username, p.password) == ("127.0.0.1", 1081, "al@ice", "p:ss")
    assert "p:ss" not in repr(p)
    p = Proxy.parse("[::1]:1082")
    assert (p.host, p.port, p.username, p.password) == ("::1", 1082, None, None)
    assert Proxy.parse("socks5h://localhost").port == 1080
    with pytest.raises(ValueError, match="socks5"):
        Proxy.parse("http://127.0.0.1:3128")


def test_own_open_connection(open_server: ServerProcess, module_echo: EchoServer) -> None:
    async def main() -> bytes:
        reader, writer = await socksd.client.open_connection(
            url(open_server), "localhost", module_echo.port
        )
        try:
            writer.write(PAYLOAD)
            await writer.drain()
            return await asyncio.wait_for(reader.readexactly(len(PAYLOAD)), 15)
        finally:
            writer.close()

    assert asyncio.run(main()) == PAYLOAD
    assert "rep=0x00" in logged_target(open_server, f"localhost:{module_echo.port}")


def test_own_open_connection_auth(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    proxy = Proxy(auth_server.host, auth_server.port, USER, PASSWORD)

    async def main() -> bytes:
        reader, writer = await socksd.client.open_connection(proxy, "127.0.0.1", module_echo.port)
        try:
            writer.write(b"ping")
            await writer.drain()
            return await asyncio.wait_for(reader.readexactly(4), 15)
        finally:
            writer.close()

    assert asyncio.run(main()) == b"ping"


def test_own_create_connection(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    with socksd.client.create_connection(
        url(auth_server, USER, PASSWORD), ("localhost", module_echo.port)
    ) as sock:
        sock.settimeout(15)
        sock.sendall(PAYLOAD)
        assert (
            hashlib.sha256(recv_exact(sock, len(PAYLOAD))).digest()
            == hashlib.sha256(PAYLOAD).digest()
        )


def test_own_create_connection_ipv6(open_server: ServerProcess, echo6: EchoServer) -> None:
    with socksd.client.create_connection(url(open_server), ("::1", echo6.port)) as sock:
        sock.settimeout(15)
        sock.sendall(b"v6")
        assert recv_exact(sock, 2) == b"v6"


def test_own_client_refused_is_reply_5(open_server: ServerProcess) -> None:
    port = refused_port()
    with pytest.raises(ReplyError) as info:
        socksd.client.create_connection(url(open_server), ("127.0.0.1", port))
    assert info.value.reply == 5
    assert isinstance(info.value, ConnectionError)

    async def main() -> None:
        await socksd.client.open_connection(url(open_server), "127.0.0.1", port)

    with pytest.raises(ReplyError) as info:
        asyncio.run(main())
    assert info.value.reply == 5


def test_own_client_bad_password(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    with pytest.raises(AuthenticationError):
        socksd.client.create_connection(
            url(auth_server, USER, "wrong"), ("127.0.0.1", module_echo.port)
        )


def test_own_client_bad_password_async(auth_server: ServerProcess, module_echo: EchoServer) -> None:
    async def main() -> None:
        await socksd.client.open_connection(
            url(auth_server, USER, "wrong"), "127.0.0.1", module_echo.port
        )

    with pytest.raises(AuthenticationError):
        asyncio.run(main())


def test_own_client_no_credentials_to_auth_server(
    auth_server: ServerProcess, module_echo: EchoServer
) -> None:
    with pytest.raises(AuthenticationError):
        socksd.client.create_connection(url(auth_server), ("127.0.0.1", module_echo.port))


def test_own_client_proxy_down() -> None:
    port = refused_port()
    with pytest.raises(ProxyConnectionError) as info:
        socksd.client.create_connection(f"socks5://127.0.0.1:{port}", ("127.0.0.1", 9))
    assert isinstance(info.value, ProxyError)


def test_own_blocking_client_keeps_bytes_that_follow_the_reply(server: ServerProcess) -> None:
    """A target that speaks first: its banner may arrive in the same segment as the reply."""
    banner = b"SSH-2.0-banner-first\r\n"
    target = EchoServer(banner=banner)
    try:
        for _ in range(50):
            with socksd.client.create_connection(
                f"127.0.0.1:{server.port}", ("127.0.0.1", target.port), timeout=10
            ) as sock:
                got = b""
                while len(got) < len(banner):
                    chunk = sock.recv(4096)
                    assert chunk, got
                    got += chunk
                assert got == banner
    finally:
        target.close()
