"""socksd's client library: SOCKS5 through asyncio streams or blocking sockets.

>>> reader, writer = await socksd.client.open_connection("socks5://user:pw@127.0.0.1:1080",
...                                                       "example.com", 80)
>>> async with socksd.client.bind(proxy, (peer_host, 0)) as listener: ...
>>> async with socksd.client.udp_associate(proxy) as assoc: ...

Layout: ``proxy`` (where and how to log in), ``handshake`` (the sans-I/O handshake and the one
function building it for every command), ``sync_io`` / ``async_io`` (the one blocking and the one
asyncio send/receive loop), ``errors`` (the exceptions and the one mapping to them), ``gssapi``
(RFC 1961 options, streams and socket), and one module per command on top.
"""

from socksd.client.bind import (
    BindListener,
    BlockingBind,
    GssapiBind,
    bind,
    create_bind,
    create_gssapi_bind,
)
from socksd.client.connect import create_connection, create_gssapi_connection, open_connection
from socksd.client.errors import (
    AuthenticationError,
    ProxyConnectionError,
    ProxyError,
    ProxyTimeoutError,
    ReplyError,
)
from socksd.client.gssapi import GssapiOptions, GssapiSocket
from socksd.client.handshake import ClientHandshake
from socksd.client.proxy import Proxy
from socksd.client.udp import (
    BlockingUdpAssociation,
    UdpAssociation,
    create_udp_association,
    udp_associate,
)

__all__ = [
    "AuthenticationError",
    "BindListener",
    "BlockingBind",
    "BlockingUdpAssociation",
    "ClientHandshake",
    "GssapiBind",
    "GssapiOptions",
    "GssapiSocket",
    "Proxy",
    "ProxyConnectionError",
    "ProxyError",
    "ProxyTimeoutError",
    "ReplyError",
    "UdpAssociation",
    "bind",
    "create_bind",
    "create_connection",
    "create_gssapi_bind",
    "create_gssapi_connection",
    "create_udp_association",
    "open_connection",
    "udp_associate",
]
