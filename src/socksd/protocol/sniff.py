"""Which protocol a client speaks, from the first byte it sends (one listener for all of them).

====================  ==========================================================
first byte            protocol
====================  ==========================================================
``0x05``              SOCKS5 (VER of the greeting)
``0x04``              SOCKS4 and SOCKS4a (VN of the request)
``A``-``Z``           HTTP (the first letter of a method: CONNECT, or GET & co.)
anything else         unknown: close the connection without an answer
====================  ==========================================================

The first byte is enough and no later byte can change the verdict, so a server reads one chunk and
decides; it never waits for more. A PROXY protocol header comes before all of this (it starts with
``P`` or ``\\r``): read it first, then sniff the bytes after it.
"""

from __future__ import annotations

from enum import Enum


class WireProtocol(Enum):
    """A client's protocol; the values are the names ``protocols`` settings use."""

    SOCKS5 = "socks5"
    SOCKS4 = "socks4"
    HTTP = "http"
    UNKNOWN = "unknown"


def sniff(data: bytes | bytearray | memoryview) -> WireProtocol:
    """The protocol of a connection whose first bytes are ``data`` (at least one byte)."""
    if not data:
        raise ValueError("sniff needs the first byte")
    first = data[0]
    if first == 0x05:
        return WireProtocol.SOCKS5
    if first == 0x04:
        return WireProtocol.SOCKS4
    if 0x41 <= first <= 0x5A:
        return WireProtocol.HTTP
    return WireProtocol.UNKNOWN


__all__ = ["WireProtocol", "sniff"]
