"""First-byte sniffing: which protocol a client speaks."""

import string

import pytest

from socksd.protocol import Greeting, WireProtocol, sniff
from socksd.protocol.proxy_header import build_v1, build_v2


@pytest.mark.parametrize(
    ("data", "protocol"),
    [
        (Greeting((0,)).to_bytes(), WireProtocol.SOCKS5),
        (b"\x05", WireProtocol.SOCKS5),
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", WireProtocol.SOCKS4),
        (b"\x04", WireProtocol.SOCKS4),
        (b"CONNECT example.com:443 HTTP/1.1\r\n", WireProtocol.HTTP),
        (b"GET http://example.com/ HTTP/1.1\r\n", WireProtocol.HTTP),
        (bytearray(b"C"), WireProtocol.HTTP),
        (memoryview(b"\x04rest"), WireProtocol.SOCKS4),
        (b"\x16\x03\x01\x02\x00", WireProtocol.UNKNOWN),  # TLS ClientHello
        (b"connect example.com:443", WireProtocol.UNKNOWN),  # methods are upper case
        (b"\x00", WireProtocol.UNKNOWN),
        (b"\x01\x05", WireProtocol.UNKNOWN),
        (b"\r\n", WireProtocol.UNKNOWN),
        (build_v2(), WireProtocol.UNKNOWN),  # a PROXY header is read before sniffing
    ],
)
def test_sniff(data: bytes, protocol: WireProtocol) -> None:
    assert sniff(data) is protocol


def test_every_byte() -> None:
    http = {ord(c) for c in string.ascii_uppercase}
    for byte in range(256):
        expected = {5: WireProtocol.SOCKS5, 4: WireProtocol.SOCKS4}.get(
            byte, WireProtocol.HTTP if byte in http else WireProtocol.UNKNOWN
        )
        assert sniff(bytes((byte,))) is expected


def test_proxy_v1_header_looks_like_http() -> None:
    # "PROXY ..." starts with an upper-case letter: the header must be consumed before sniffing
    assert sniff(build_v1()) is WireProtocol.HTTP


def test_needs_a_byte() -> None:
    with pytest.raises(ValueError, match="first byte"):
        sniff(b"")


def test_values_are_the_setting_names() -> None:
    assert [p.value for p in WireProtocol] == ["socks5", "socks4", "http", "unknown"]
