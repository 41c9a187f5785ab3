"""The one address value type of SOCKS5: IPv4, IPv6 or a domain name, with a port.

Wire form (RFC 1928 section 5): ``ATYP`` then ``DST.ADDR`` (4 bytes, 16 bytes, or a length byte and
1-255 name bytes) then a 2-byte port. Domain names are checked before anything uses them: only the
characters a host name can have are accepted (a NUL would make getaddrinfo resolve a prefix of the
name), so ``localhost\\0junk`` is refused with reply 0x04 rather than connected to ``localhost``.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from socksd.protocol.constants import AddressType, ReplyCode
from socksd.protocol.errors import RemoteProtocolError

_PORT = struct.Struct("!H")
_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rb"(?:" + _LABEL + rb"\.)*" + _LABEL + rb"\.?")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_valid_hostname(name: bytes) -> bool:
    """True when ``name`` is a syntactically possible host name (or an IP literal)."""
    if not 0 < len(name) <= 255:
        return False
    if _HOSTNAME.fullmatch(name):
        return True
    if b"%" in name:  # an IPv6 scope id ("fe80::1%...") may hold any byte, NUL and space too
        return False
    try:
        ipaddress.ip_address(name.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Address:
    """A SOCKS address: ``atyp`` tells whether ``host`` is an IPv4, IPv6 literal or a domain name.

    IP literals are kept in their canonical text form (``::1``, not ``0:0::1``). Build one with
    :meth:`of` unless the type is already known.
    """

    atyp: AddressType
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        if self.atyp == AddressType.DOMAIN and not is_valid_hostname(
            self.host.encode("ascii", "replace")
        ):
            raise ValueError(f"not a valid host name: {self.host!r}")

    @classmethod
    def of(cls, host: str | IPAddress, port: int) -> Address:
        """Build an address from an IP literal (text or ipaddress object) or a host name."""
        if not isinstance(host, str):
            if host.version == 4:
                return cls(AddressType.IPV4, str(host), port)
            # inet_ntop, not str(): parse_address's text (str() writes ::ffff:102:304 on 3.11)
            return cls(AddressType.IPV6, inet_ntop(AF_INET6, host.packed), port)
        if host.startswith("["):
            host = host[1:-1] if host.endswith("]") else host
        try:
            return cls(AddressType.IPV4, inet_ntop(AF_INET, inet_pton(AF_INET, host)), port)
        except (OSError, ValueError):  # ValueError: an embedded NUL
            pass
        if ":" in host:
            # A scope id ("fe80::1%eth0", as getsockname gives) has no wire form: it is dropped.
            literal = host.partition("%")[0]
            try:
                packed = inet_pton(AF_INET6, literal)
                return cls(AddressType.IPV6, inet_ntop(AF_INET6, packed), port)
            except (OSError, ValueError):
                pass
        return cls(AddressType.DOMAIN, host, port)

    @classmethod
    def unspecified(cls, port: int = 0) -> Address:
        """``0.0.0.0:port``, the address used in failure replies."""
        return cls(AddressType.IPV4, "0.0.0.0", port)

    @property
    def ip(self) -> IPAddress | None:
        """The IP address, or None for a domain name."""
        if self.atyp == AddressType.DOMAIN:
            return None
        return ipaddress.ip_address(self.host)

    def pack(self) -> bytes:
        """The wire form: ATYP, ADDR, PORT."""
        if self.atyp == AddressType.IPV4:
            return b"\x01" + inet_pton(AF_INET, self.host) + _PORT.pack(self.port)
        if self.atyp == AddressType.IPV6:
            return b"\x04" + inet_pton(AF_INET6, self.host) + _PORT.pack(self.port)
        name = self.host.encode("ascii")
        return b"\x03" + bytes((len(name),)) + name + _PORT.pack(self.port)

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)  # brackets IPv6, also when sent as a name


def parse_address(buf: bytes | bytearray | memoryview, offset: int) -> tuple[Address, int] | None:
    """Parse ATYP ADDR PORT at ``offset``; return (address, end offset) or None if incomplete.

    Raises RemoteProtocolError with reply 0x08 for an unknown ATYP and 0x04 for a domain name no
    host can have.
    """
    n = len(buf)
    if n <= offset:
        return None
    atyp = buf[offset]
    if atyp == 0x01:
        end = offset + 7
        if n < end:
            return None
        host = inet_ntop(AF_INET, bytes(buf[offset + 1 : offset + 5]))
        return Address(AddressType.IPV4, host, (buf[end - 2] << 8) | buf[end - 1]), end
    if atyp == 0x04:
        end = offset + 19
        if n < end:
            return None
        host = inet_ntop(AF_INET6, bytes(buf[offset + 1 : offset + 17]))
        return Address(AddressType.IPV6, host, (buf[end - 2] << 8) | buf[end - 1]), end
    if atyp == 0x03:
        if n < offset + 2:
            return None
        length = buf[offset + 1]
        end = offset + 4 + length
        if n < end:
            return None
        name = bytes(buf[offset + 2 : offset + 2 + length])
        if not is_valid_hostname(name):
            raise RemoteProtocolError(f"invalid domain name {name!r}", ReplyCode.HOST_UNREACHABLE)
        return Address(
            AddressType.DOMAIN, name.decode("ascii"), (buf[end - 2] << 8) | buf[end - 1]
        ), end
    raise RemoteProtocolError(
        f"unknown address type {atyp:#04x}", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    )
