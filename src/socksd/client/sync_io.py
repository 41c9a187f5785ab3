"""The blocking driver: the one send/receive loop over a plain socket, for every command.

:func:`open_session` connects to the proxy and runs the handshake that
:func:`~socksd.client.handshake.client_handshake` builds; :func:`handshake_over_socket` is the
loop itself (BIND's second reply goes through it again). Failures come out as the client's errors
(``proxy_errors``), and the socket is closed on any failure.

Reading: once the request is out, the target's (or BIND peer's) first bytes may follow the reply
in the same segment, and a plain socket cannot give them back to the caller. So a reply is peeked
at (MSG_PEEK) and only its own bytes are consumed. After GSSAPI nothing is left in the socket that
matters: every byte goes through the RFC 1961 codec, whose plain output after the reply is
returned (``early``) for the :class:`~socksd.client.gssapi.GssapiSocket` to hand out first.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from socksd.client.errors import ProxyError, proxy_errors
from socksd.client.gssapi import GssapiSocket
from socksd.client.handshake import ClientHandshake, client_handshake
from socksd.client.proxy import Proxy
from socksd.protocol import Address, Command, Reply, State

_READ = 65536


def connect_to_proxy(p: Proxy, timeout: float) -> socket.socket:
    """A blocking TCP connection to the proxy, failures as the client's errors."""
    with proxy_errors(f"cannot reach proxy {p.where}"):
        return socket.create_connection((p.host, p.port), timeout=timeout)


def open_session(
    p: Proxy,
    command: Command,
    address: Address | Callable[[socket.socket], Address],
    timeout: float,
) -> tuple[socket.socket, ClientHandshake, bytes]:
    """Connect to ``p`` and run the handshake of ``command``: (socket, handshake, early bytes).

    ``address`` may be a function of the connected socket (UDP ASSOCIATE declares the address of
    a UDP socket bound beside it). ``timeout`` bounds connecting and each read of the handshake;
    the returned socket is blocking again. ``early`` is never empty without GSSAPI.
    """
    sock = connect_to_proxy(p, timeout)
    try:
        with proxy_errors(f"SOCKS handshake with {p.where}"):
            hs = client_handshake(p, command, address(sock) if callable(address) else address)
            early = handshake_over_socket(sock, hs)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock, hs, early


def check_style(p: Proxy, *, gssapi: bool, other: str) -> None:
    """ValueError, before connecting, when a blocking call is for the other kind of proxy.

    The calls that return a plain ``socket.socket`` cannot carry RFC 1961 frames (a GSSAPI proxy
    needs the ``create_gssapi_*`` call that returns a GssapiSocket), and the reverse: ``other``
    names the call to use instead.
    """
    if (p.gssapi is not None) != gssapi:
        why = "a GSSAPI proxy encapsulates the data" if p.gssapi else "proxy.gssapi is not set"
        raise ValueError(f"{why}: use {other}()")


def wait_second_reply(sock: socket.socket, hs: ClientHandshake, timeout: float | None) -> bytes:
    """BIND: wait for the second reply (the peer connected); return the early bytes after it."""
    hs.expect_second_reply()
    sock.settimeout(timeout)
    with proxy_errors("waiting for the BIND peer through the proxy"):
        early = handshake_over_socket(sock, hs)
    sock.settimeout(None)
    return early


def handshake_over_socket(sock: socket.socket, hs: ClientHandshake) -> bytes:
    """Run ``hs`` to completion over a blocking socket; return plain bytes read past the reply."""
    pending = bytearray()  # the start of a reply consumed while it was incomplete
    while True:
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
        if hs.done:
            return hs.trailing_data()
        if hs.step_pending:
            try:
                hs.run_step()
            except ProxyError:
                sock.sendall(hs.data_to_send())  # the abort message, as a courtesy
                raise
            continue
        if hs.encapsulation is None and hs.conn.state in (State.REPLY, State.BIND_WAIT):
            hs.receive_data(_recv_reply_bytes(sock, pending))
        else:  # the proxy says nothing more before our next message, or it is all framed
            hs.receive_data(sock.recv(_READ))


def _recv_reply_bytes(sock: socket.socket, pending: bytearray) -> bytes:
    """Read from ``sock`` but never past the end of the reply being received."""
    peek = sock.recv(_READ, socket.MSG_PEEK)
    if not peek:
        return b""
    parsed = Reply.parse(bytes(pending) + peek)
    data = sock.recv(parsed[1] - len(pending) if parsed else len(peek))
    if parsed:
        pending.clear()
    else:
        pending += data
    return data


def gssapi_socket(sock: socket.socket, hs: ClientHandshake, early: bytes) -> GssapiSocket:
    """The socket-like object that carries the rest of a GSSAPI session (RFC 1961 frames)."""
    assert hs.encapsulation is not None
    return GssapiSocket(sock, hs.encapsulation, early)
