"""Client-side exceptions; each also subclasses the stdlib error callers already catch."""

from __future__ import annotations

from socksd.protocol import ReplyCode


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
