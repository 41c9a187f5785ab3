"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2), sans I/O.

A load balancer in TCP mode that connects to socksd on behalf of a client puts one header before
the client's bytes, naming the client's address and port (the source) and the address it
connected to (the destination). :class:`ProxyHeaderReader` is fed what arrives
(``receive_data``); ``next_event`` returns ``NEED_DATA`` until the header is whole, then the
:class:`ProxyHeader`; ``trailing_data`` gives the bytes after it (the client's SOCKS greeting).
:func:`parse_header` is the same thing on one buffer.

Strict, as the specification asks ("any sequence which does not exactly match the protocol must be
discarded"): every violation is a :class:`ProxyHeaderError`, raised as soon as the bytes so far
cannot start a header (a SOCKS greeting is refused at its first byte, never waited on).

- Version 1, one text line: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` (canonical addresses, no
  leading zeros in IPv4 numbers and ports, single spaces) or ``PROXY UNKNOWN ...\\r\\n`` (the rest
  ignored); at most 107 bytes with the CRLF; a lone CR or LF is an error.
- Version 2, binary: the 12-byte signature, version 2, command LOCAL (the balancer's own
  connection, a health check: the address block is skipped whatever its family) or PROXY; family
  UNSPEC, INET, INET6 or UNIX and transport UNSPEC, STREAM or DGRAM; the address block's length
  must hold the family's addresses. TLVs after the addresses are checked for framing and kept as
  ``(type, value)`` pairs, not interpreted. The whole header is capped (``max_size``, default
  :data:`MAX_HEADER_SIZE`) so a peer cannot make the reader buffer without bound.

A header with no IP source (v2 LOCAL, v1 UNKNOWN, v2 family UNSPEC or UNIX) has ``source`` None:
what that means for a connection is the server's decision, not this module's.
:func:`build_v1` and :func:`build_v2` make headers (tests, clients).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from socksd.protocol.connection import NEED_DATA, _NeedData
from socksd.protocol.errors import RemoteProtocolError

SIGNATURE_V1 = b"PROXY "
SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_LENGTH = 107
"""The longest version 1 line, CRLF included (``PROXY UNKNOWN`` with two full IPv6 addresses)."""
V2_FIXED = 16
"""Signature, version and command, family and transport, address block length."""
MAX_HEADER_SIZE = 2048
"""Default cap of a version 2 header (fixed part, addresses and TLVs)."""

_V2_HEAD = struct.Struct("!12sBBH")
_TLV = struct.Struct("!BH")

SockAddr = tuple[str, int]


class ProxyHeaderError(RemoteProtocolError):
    """The bytes are not a valid PROXY protocol header (answered by closing, no reply)."""


class ProxyCommand(IntEnum):
    """Version 2 commands (a version 1 header is always PROXY)."""

    LOCAL = 0
    PROXY = 1


class ProxyFamily(IntEnum):
    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class ProxyTransport(IntEnum):
    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


_ADDRESS_BLOCK = {ProxyFamily.INET: 12, ProxyFamily.INET6: 36, ProxyFamily.UNIX: 216}


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. ``source``/``destination`` are ``(ip, port)``, or None when the header
    carries no IP address (LOCAL, UNKNOWN, UNSPEC, UNIX)."""

    version: int
    command: ProxyCommand = ProxyCommand.PROXY
    family: ProxyFamily = ProxyFamily.UNSPEC
    transport: ProxyTransport = ProxyTransport.UNSPEC
    source: SockAddr | None = None
    destination: SockAddr | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


def _show(data: bytes) -> str:
    return data[:16].hex(" ") + (" ..." if len(data) > 16 else "")


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (text[0] == "0" and text != "0"):
        raise ProxyHeaderError(f"PROXY v1: port {text!r} is not a decimal number without zeros")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1: port {port} is out of range")
    return port


def _v1_address(text: str, family: ProxyFamily) -> str:
    """The address in the form ``inet_ntop`` gives (as a v2 header's); IPv4 must be canonical."""
    af = AF_INET if family is ProxyFamily.INET else AF_INET6
    try:
        address = inet_ntop(af, inet_pton(af, text))
    except OSError:
        address = ""
    if not address or (af == AF_INET and address != text):
        kind = "IPv4" if af == AF_INET else "IPv6"
        raise ProxyHeaderError(f"PROXY v1: {text!r} is not a canonical {kind} address")
    return address


def _parse_v1(line: bytes) -> ProxyHeader:
    """``line`` without its CRLF."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1: the line is not US-ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1)  # the rest of the line is to be ignored
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(
            f"PROXY v1: expected 'PROXY TCP4|TCP6 SRC DST SPORT DPORT' or 'PROXY UNKNOWN', "
            f"got {text!r}"
        )
    family = ProxyFamily.INET if fields[1] == "TCP4" else ProxyFamily.INET6
    source = (_v1_address(fields[2], family), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], family), _v1_port(fields[5]))
    return ProxyHeader(1, ProxyCommand.PROXY, family, ProxyTransport.STREAM, source, destination)


def _v1(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    cr, lf = data.find(b"\r", 0, V1_MAX_LENGTH - 1), data.find(b"\n", 0, V1_MAX_LENGTH)
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyHeaderError("PROXY v1: a lone LF before the CRLF")
    if cr == -1 or cr + 1 == len(data):
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1: no CRLF in the first {V1_MAX_LENGTH} bytes")
        return None
    if data[cr + 1] != 0x0A:
        raise ProxyHeaderError("PROXY v1: a lone CR before the CRLF")
    return _parse_v1(bytes(data[:cr])), cr + 2


def _ip(raw: bytes | bytearray) -> str:
    return inet_ntop(AF_INET if len(raw) == 4 else AF_INET6, bytes(raw))


def _tlvs(block: bytes | bytearray) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(block):
        if offset + _TLV.size > len(block):
            raise ProxyHeaderError("PROXY v2: a truncated TLV after the addresses")
        kind, length = _TLV.unpack_from(block, offset)
        start = offset + _TLV.size
        if start + length > len(block):
            raise ProxyHeaderError(f"PROXY v2: TLV {kind:#04x} is longer than the header")
        out.append((kind, bytes(block[start : start + length])))
        offset = start + length
    return tuple(out)


def _v2(data: bytes | bytearray, max_size: int) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_FIXED:
        return None
    _, ver_cmd, fam, length = _V2_HEAD.unpack_from(data)
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2: version {ver_cmd >> 4}, expected 2")
    if ver_cmd & 0xF not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2: unknown command {ver_cmd & 0xF:#x}")
    size = V2_FIXED + length
    if size > max_size:
        raise ProxyHeaderError(f"PROXY v2: a {size}-byte header is over the {max_size}-byte limit")
    if len(data) < size:
        return None
    command = ProxyCommand(ver_cmd & 0xF)
    if command is ProxyCommand.LOCAL:  # the family and the address block are to be ignored
        return ProxyHeader(2, command), size
    if fam >> 4 > 3 or fam & 0xF > 2:
        raise ProxyHeaderError(f"PROXY v2: unknown family/transport byte {fam:#04x}")
    family, transport = ProxyFamily(fam >> 4), ProxyTransport(fam & 0xF)
    block = data[V2_FIXED:size]
    if family is ProxyFamily.UNSPEC:  # address information to be ignored
        return ProxyHeader(2, command, family, transport), size
    need = _ADDRESS_BLOCK[family]
    if length < need:
        raise ProxyHeaderError(
            f"PROXY v2: {family.name} needs {need} address bytes, the header has {length}"
        )
    tlvs = _tlvs(block[need:])
    if family is ProxyFamily.UNIX:
        return ProxyHeader(2, command, family, transport, tlvs=tlvs), size
    half = (need - 4) // 2
    sport, dport = struct.unpack_from("!HH", block, 2 * half)
    source = (_ip(block[:half]), sport)
    destination = (_ip(block[half : 2 * half]), dport)
    return ProxyHeader(2, command, family, transport, source, destination, tlvs), size


def parse_header(
    data: bytes | bytearray, max_size: int = MAX_HEADER_SIZE
) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length, or None when more bytes are needed.

    Raises :class:`ProxyHeaderError` as soon as ``data`` cannot start a valid header.
    """
    if data[:12] == SIGNATURE_V2[: len(data)]:
        return _v2(data, max_size) if len(data) >= 12 else None
    if data[:6] == SIGNATURE_V1[: len(data)]:
        return _v1(data) if len(data) >= 6 else None
    raise ProxyHeaderError(f"not a PROXY protocol header: {_show(bytes(data))}")


def looks_like_header(data: bytes | bytearray) -> bool:
    """True when ``data`` (non-empty) starts like a PROXY header of either version."""
    return bool(data) and (
        data[:12] == SIGNATURE_V2[: len(data)] or data[:6] == SIGNATURE_V1[: len(data)]
    )


class ProxyHeaderReader:
    """Incremental reader of one header: feed bytes, ask for the header, take what follows."""

    __slots__ = ("_buffer", "_header", "_max_size")

    def __init__(self, max_size: int = MAX_HEADER_SIZE) -> None:
        self._buffer = bytearray()
        self._header: ProxyHeader | None = None
        self._max_size = max_size

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer (more than the header is fine: the rest is kept)."""
        self._buffer += data

    def next_event(self) -> ProxyHeader | _NeedData:
        """The header once whole, else ``NEED_DATA``; ProxyHeaderError when invalid."""
        if self._header is not None:
            return self._header
        result = parse_header(self._buffer, self._max_size)
        if result is None:
            return NEED_DATA
        self._header, size = result
        del self._buffer[:size]
        return self._header

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed (before the header is whole: all of them)."""
        return len(self._buffer)

    def trailing_data(self) -> bytes:
        """The bytes after the header (given once; the reader keeps nothing after)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _pack_ip(host: str) -> bytes:
    return ipaddress.ip_address(host).packed


def build_v1(source: SockAddr | None = None, destination: SockAddr | None = None) -> bytes:
    """A version 1 line; without addresses ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError("source and destination must be of one address family")
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src} {dst} {source[1]} {destination[1]}\r\n".encode("ascii")


def build_v2(
    command: ProxyCommand = ProxyCommand.PROXY,
    source: SockAddr | None = None,
    destination: SockAddr | None = None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    transport: ProxyTransport = ProxyTransport.STREAM,
) -> bytes:
    """A version 2 header; LOCAL (or no addresses) has family UNSPEC and no address block."""
    block = b""
    fam = 0
    if command is ProxyCommand.PROXY and source is not None and destination is not None:
        src, dst = _pack_ip(source[0]), _pack_ip(destination[0])
        if len(src) != len(dst):
            raise ValueError("source and destination must be of one address family")
        family = ProxyFamily.INET if len(src) == 4 else ProxyFamily.INET6
        fam = family << 4 | transport
        block = src + dst + struct.pack("!HH", source[1], destination[1])
    block += b"".join(_TLV.pack(kind, len(value)) + value for kind, value in tlvs)
    return _V2_HEAD.pack(SIGNATURE_V2, 0x20 | command, fam, len(block)) + block
