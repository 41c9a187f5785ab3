"""A health probe: does a SOCKS5 server answer at an address?

:func:`probe` connects, sends a greeting offering every method socksd knows (GSSAPI,
username/password, none) and waits for the method selection, then closes. Any selection is an
answer, "no acceptable method" (0xFF) included: a server requiring a login the probe cannot give
is up all the same. So no credentials are needed, none are sent, and a server with passwords
counts no failed login. ``socksd health`` is this probe on the command line (Docker's
HEALTHCHECK, monitoring scripts).
"""

from __future__ import annotations

from socksd.client.errors import ProxyConnectionError, proxy_errors
from socksd.client.proxy import ProxyLike, as_proxy
from socksd.client.sync_io import connect_to_proxy
from socksd.protocol import NEED_DATA, AuthMethod, ClientConnection, Greeting, MethodSelection

OFFERED = (AuthMethod.GSSAPI, AuthMethod.USERNAME_PASSWORD, AuthMethod.NO_AUTH)


def probe(proxy: ProxyLike, timeout: float = 5.0) -> int:
    """The METHOD the SOCKS5 server at ``proxy`` selects from a greeting offering ``OFFERED``.

    ``timeout`` bounds connecting and each read. Raises ProxyConnectionError when the server
    cannot be reached, closes, or answers something that is not SOCKS5; ProxyTimeoutError when
    it says nothing in time.
    """
    p = as_proxy(proxy)
    sock = connect_to_proxy(p, timeout)
    with sock, proxy_errors(f"SOCKS5 greeting to {p.where}"):
        conn = ClientConnection()
        sock.sendall(conn.send(Greeting(OFFERED)))
        while True:  # two bytes to read: at most two reads that return data
            data = sock.recv(512)
            conn.receive_data(data)
            event = conn.next_event()
            if isinstance(event, MethodSelection):
                return event.method
            if event is not NEED_DATA or not data:
                raise ProxyConnectionError(
                    f"SOCKS5 greeting to {p.where}: closed without a method selection"
                )


def method_name(method: int) -> str:
    """``username/password``, ``no acceptable method`` ... for a METHOD value."""
    names: dict[int, str] = {
        AuthMethod.NO_AUTH: "no authentication",
        AuthMethod.GSSAPI: "GSSAPI",
        AuthMethod.USERNAME_PASSWORD: "username/password",
        AuthMethod.NO_ACCEPTABLE: "no acceptable method",
    }
    return names.get(method, f"method {method:#04x}")
