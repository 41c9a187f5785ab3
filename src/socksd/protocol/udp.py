"""The rules of UDP ASSOCIATE and BIND that need no socket: header framing, who may use a relay.

UDP ASSOCIATE (RFC 1928 section 7): every datagram between the client and the relay starts with
``RSV(2) FRAG ATYP DST.ADDR DST.PORT``. :func:`udp_header_length` finds where DATA starts without
building any object, so the relay can use the header bytes themselves as a cache key on its hot
path; :class:`~socksd.protocol.messages.UdpDatagram` is the full (slower) parse and build.
:func:`udp_reply_header` builds the header of a datagram going back to the client.

:class:`UdpClientFilter` decides which source address may use an association: the IP of the TCP
control connection's client always, and the port the client declared in its request when it
declared one for that IP, else the source port of the first datagram (which then stays fixed).

:class:`BindPeerFilter` decides which incoming connection a BIND accepts: one from an address the
request named (DST.ADDR; a name stands for the addresses it resolves to), or any peer when the
request gave the unspecified address. The port is not compared: the peer connects from a port of
its own choosing (an FTP server's data connection comes from port 20 or an ephemeral port, not
from the control port a client knows).
"""

from __future__ import annotations

from collections.abc import Iterable
from socket import AF_INET, AF_INET6, inet_pton

from socksd.protocol.address import Address
from socksd.protocol.constants import AddressType, ReplyCode
from socksd.protocol.errors import RemoteProtocolError

Buffer = bytes | bytearray | memoryview

MAX_UDP_PAYLOAD_IPV4 = 65507
"""The largest UDP payload over IPv4: 65535 - 20 (IP header) - 8 (UDP header)."""

MAX_UDP_PAYLOAD_IPV6 = 65527
"""The largest UDP payload over IPv6 without jumbograms: 65535 - 8."""

UDP_HEADER_IPV4 = 10
"""Length of a SOCKS UDP header carrying an IPv4 address."""

UDP_HEADER_IPV6 = 22
"""Length of a SOCKS UDP header carrying an IPv6 address."""

_UNSPECIFIED = frozenset(("0.0.0.0", "::"))


def udp_header_length(datagram: Buffer) -> int:
    """Where DATA starts in a SOCKS UDP datagram (the header's length).

    Raises RemoteProtocolError when the datagram is shorter than its header or its ATYP is
    unknown (reply code 0x08 attached, although a datagram is never answered).
    """
    n = len(datagram)
    if n < 4:
        raise RemoteProtocolError("UDP datagram shorter than its header")
    atyp = datagram[3]
    if atyp == AddressType.IPV4:
        end = UDP_HEADER_IPV4
    elif atyp == AddressType.IPV6:
        end = UDP_HEADER_IPV6
    elif atyp == AddressType.DOMAIN:
        if n < 5:
            raise RemoteProtocolError("UDP datagram header truncated")
        end = 7 + datagram[4]
    else:
        raise RemoteProtocolError(
            f"unknown address type {atyp:#04x}", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        )
    if n < end:
        raise RemoteProtocolError("UDP datagram header truncated")
    return end


def udp_reply_header(ip: str, port: int) -> bytes:
    """The header of a datagram from ``ip:port`` to the client (FRAG 0, IP literal address)."""
    if ":" in ip:
        return b"\x00\x00\x00\x04" + inet_pton(AF_INET6, ip) + port.to_bytes(2, "big")
    return b"\x00\x00\x00\x01" + inet_pton(AF_INET, ip) + port.to_bytes(2, "big")


def is_unspecified(address: Address) -> bool:
    """True for ``0.0.0.0`` and ``::`` (any port): "not known yet" in BIND and UDP requests."""
    return address.atyp != AddressType.DOMAIN and address.host in _UNSPECIFIED


class UdpClientFilter:
    """Which source (IP, port) may send datagrams into one association.

    ``client_ip`` is the address of the TCP control connection's client. ``declared`` is the
    DST.ADDR/DST.PORT of the UDP ASSOCIATE request: its port is enforced when it is non-zero and
    its address is the client's own or unspecified. An address other than the client's (a client
    behind NAT that declared its private address) says nothing reliable about the port the
    datagrams will come from, so then, as with port 0, the first datagram's port is learned.
    """

    __slots__ = ("ip", "port")

    def __init__(self, client_ip: str, declared: Address) -> None:
        self.ip = client_ip
        self.port = 0
        if declared.port and (is_unspecified(declared) or declared.host == client_ip):
            self.port = declared.port

    @property
    def fixed(self) -> bool:
        """True once the source port is known (declared or learned)."""
        return self.port != 0

    def accept(self, ip: str, port: int) -> bool:
        """True when a datagram from ``ip:port`` belongs to the client (learns the first port)."""
        if ip != self.ip or port == 0:  # source port 0 ("none", RFC 768) cannot be answered
            return False
        if self.port == 0:
            self.port = port
            return True
        return port == self.port


class BindPeerFilter:
    """Which incoming connection a BIND accepts: from one of ``expected``, or any when empty."""

    __slots__ = ("expected",)

    def __init__(self, expected: Iterable[str] = ()) -> None:
        self.expected = frozenset(expected) - _UNSPECIFIED

    @classmethod
    def for_request(cls, address: Address, resolved: Iterable[str] = ()) -> BindPeerFilter:
        """The filter for a BIND request's DST.ADDR (``resolved``: the addresses of a name)."""
        if address.atyp == AddressType.DOMAIN:
            return cls(resolved)
        return cls(() if is_unspecified(address) else (address.host,))

    @property
    def accepts_any(self) -> bool:
        return not self.expected

    def accept(self, ip: str) -> bool:
        """True when a connection from ``ip`` is the peer the client expects."""
        return not self.expected or ip in self.expected


__all__ = [
    "MAX_UDP_PAYLOAD_IPV4",
    "MAX_UDP_PAYLOAD_IPV6",
    "UDP_HEADER_IPV4",
    "UDP_HEADER_IPV6",
    "BindPeerFilter",
    "UdpClientFilter",
    "is_unspecified",
    "udp_header_length",
    "udp_reply_header",
]
