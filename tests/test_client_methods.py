"""The methods socksd.client offers, for every command and both I/O styles (issue 11, defect 5).

A fake proxy on loopback records the greeting and answers "no acceptable method" (05 FF), so the
client stops right after it: no Kerberos is needed to see what it offered. A GSSAPI Proxy must
offer GSSAPI (plus username/password when it has credentials) and never "no authentication".
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import socksd.client as client
from socksd.client import AuthenticationError, GssapiOptions, Proxy

pytest.importorskip("gssapi")

NO_AUTH, GSSAPI, USERPASS = 0x00, 0x01, 0x02


class FakeProxy:
    """Accepts connections one by one, records each greeting's methods, answers ``answer``."""

    def __init__(self, answer: bytes = b"\x05\xff") -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.greetings: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                head = recv_exact(conn, 2)
                methods = recv_exact(conn, head[1]) if len(head) == 2 else b""
                self.greetings.append(head + methods)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        self.listener.close()
        self._thread.join(5)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def fake() -> Iterator[FakeProxy]:
    proxy = FakeProxy()
    yield proxy
    proxy.close()


def gss(port: int, **credentials: str) -> Proxy:
    return Proxy("127.0.0.1", port, gssapi=GssapiOptions(hostname="localhost"), **credentials)


async def _bind(p: Proxy) -> None:
    listener = await client.bind(p, ("127.0.0.1", 0), timeout=10)
    await listener.aclose()


async def _udp(p: Proxy) -> None:
    assoc = await client.udp_associate(p, timeout=10)
    await assoc.aclose()


async def _connect(p: Proxy) -> None:
    await client.open_connection(p, "127.0.0.1", 9, timeout=10)


ENTRY_POINTS: dict[str, Callable[[Proxy], Any]] = {
    "create_gssapi_connection": lambda p: client.create_gssapi_connection(p, ("127.0.0.1", 9)),
    "create_gssapi_bind": lambda p: client.create_gssapi_bind(p, ("127.0.0.1", 0)),
    "create_udp_association": client.create_udp_association,
    "open_connection": lambda p: asyncio.run(_connect(p)),
    "bind": lambda p: asyncio.run(_bind(p)),
    "udp_associate": lambda p: asyncio.run(_udp(p)),
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_gssapi_proxy_offers_gssapi_only(fake: FakeProxy, name: str) -> None:
    with pytest.raises(AuthenticationError):
        ENTRY_POINTS[name](gss(fake.port))
    assert fake.greetings == [bytes((5, 1, GSSAPI))]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_gssapi_proxy_with_credentials_adds_userpass_never_no_auth(
    fake: FakeProxy, name: str
) -> None:
    with pytest.raises(AuthenticationError):
        ENTRY_POINTS[name](gss(fake.port, username="alice", password="pw"))
    assert fake.greetings == [bytes((5, 2, GSSAPI, USERPASS))]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("create_connection", bytes((5, 1, NO_AUTH))),
        ("create_bind", bytes((5, 1, NO_AUTH))),
        ("create_udp_association", bytes((5, 1, NO_AUTH))),
        ("open_connection", bytes((5, 1, NO_AUTH))),
        ("bind", bytes((5, 1, NO_AUTH))),
        ("udp_associate", bytes((5, 1, NO_AUTH))),
    ],
)
def test_plain_proxy_offers_no_auth(fake: FakeProxy, name: str, expected: bytes) -> None:
    calls: dict[str, Callable[[Proxy], Any]] = {
        **ENTRY_POINTS,
        "create_connection": lambda p: client.create_connection(p, ("127.0.0.1", 9)),
        "create_bind": lambda p: client.create_bind(p, ("127.0.0.1", 0)),
    }
    with pytest.raises(AuthenticationError):
        calls[name](Proxy("127.0.0.1", fake.port))
    assert fake.greetings == [expected]
    with pytest.raises(AuthenticationError):
        calls[name](Proxy("127.0.0.1", fake.port, "alice", "pw"))
    assert fake.greetings[1] == bytes((5, 2, USERPASS, NO_AUTH))


@pytest.mark.parametrize("name", ["create_connection", "create_bind"])
def test_blocking_plain_socket_calls_refuse_a_gssapi_proxy_before_connecting(name: str) -> None:
    """A plain socket cannot carry RFC 1961 frames: these point to the create_gssapi_* calls."""
    call = getattr(client, name)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(ValueError, match="create_gssapi_"):
            call(gss(port), ("127.0.0.1", 0), timeout=2)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected: nothing was offered at all
            listener.accept()


@pytest.mark.parametrize("name", ["create_connection", "create_bind", *ENTRY_POINTS])
@pytest.mark.parametrize(
    "answer", [b"\x04\x00", b"\x05\x07"], ids=["version-4", "method-not-offered"]
)
def test_a_proxy_breaking_the_protocol_is_a_proxy_connection_error(
    name: str, answer: bytes
) -> None:
    """Every command and driver maps a malformed answer (wrong version, a method never offered)
    to ProxyConnectionError, never a bare protocol exception."""
    calls: dict[str, Callable[[Proxy], Any]] = {
        **ENTRY_POINTS,
        "create_connection": lambda p: client.create_connection(p, ("127.0.0.1", 9)),
        "create_bind": lambda p: client.create_bind(p, ("127.0.0.1", 0)),
    }
    fake = FakeProxy(answer)
    try:
        plain = name in ("create_connection", "create_bind")
        proxy = Proxy("127.0.0.1", fake.port) if plain else gss(fake.port)
        with pytest.raises(client.ProxyConnectionError, match="broke the protocol"):
            calls[name](proxy)
    finally:
        fake.close()
