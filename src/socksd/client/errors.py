"""Client-side exceptions, and the one place that turns other failures into them.

Each exception also subclasses the stdlib error callers already catch. The sans-I/O
``ClientHandshake`` raises them for what the proxy answers (a refused method or login, a failure
reply); :func:`proxy_errors` maps everything else met while talking to a proxy (the socket's
errors, timeouts, a proxy breaking the protocol or an RFC 1961 frame failing its check), so the
blocking and the asyncio drivers and every command fail the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from socksd.protocol import GssapiError, RemoteProtocolError, ReplyCode


class ProxyError(Exception):
    """Something went wrong talking to the SOCKS proxy."""


class ProxyConnectionError(ProxyError, ConnectionError):
    """The proxy could not be reached, or closed the connection during the handshake."""


class ProxyTimeoutError(ProxyError, TimeoutError):
    """The proxy did not finish the handshake in time."""


class AuthenticationError(ProxyError, PermissionError):
    """No acceptable method, or the proxy rejected the credentials."""


class ReplyError(ProxyError, ConnectionError):
    """The proxy answered the request with a failure reply; ``reply`` is its code."""

    def __init__(self, reply: ReplyCode) -> None:
        super().__init__(
            f"proxy replied {reply.value:#04x} ({reply.name.lower().replace('_', ' ')})"
        )
        self.reply = reply


@contextlib.contextmanager
def proxy_errors(doing: str) -> Iterator[None]:
    """Raise what fails while ``doing`` (e.g. "SOCKS handshake with host:port") as a ProxyError.

    ProxyError passes unchanged; TimeoutError becomes ProxyTimeoutError; OSError and protocol
    violations by the proxy (GSSAPI frames included) become ProxyConnectionError.
    """
    try:
        yield
    except ProxyError:
        raise
    except TimeoutError:
        raise ProxyTimeoutError(f"{doing}: timed out") from None
    except GssapiError as e:
        raise ProxyConnectionError(f"{doing}: GSSAPI: {e}") from None
    except RemoteProtocolError as e:
        raise ProxyConnectionError(f"{doing}: the proxy broke the protocol: {e}") from None
    except OSError as e:
        raise ProxyConnectionError(f"{doing}: {e}") from e
