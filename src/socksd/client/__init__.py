"""socksd's client library: SOCKS5 through asyncio streams or blocking sockets.

>>> reader, writer = await socksd.client.open_connection("socks5://user:pw@127.0.0.1:1080",
...                                                       "example.com", 80)
"""

from socksd.client.connect import (
    Proxy,
    create_connection,
    create_gssapi_connection,
    open_connection,
)
from socksd.client.errors import (
    AuthenticationError,
    ProxyConnectionError,
    ProxyError,
    ProxyTimeoutError,
    ReplyError,
)
from socksd.client.gssapi import GssapiOptions, GssapiSocket
from socksd.client.handshake import ClientHandshake

__all__ = [
    "AuthenticationError",
    "ClientHandshake",
    "GssapiOptions",
    "GssapiSocket",
    "Proxy",
    "ProxyConnectionError",
    "ProxyError",
    "ProxyTimeoutError",
    "ReplyError",
    "create_connection",
    "create_gssapi_connection",
    "open_connection",
]
