"""The PROXY protocol header reader: spec examples byte for byte, whole and one byte at a time."""

from __future__ import annotations

import contextlib
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.protocol import NEED_DATA
from socksd.protocol.proxy_header import (
    MAX_HEADER_SIZE,
    SIGNATURE_V2,
    ProxyCommand,
    ProxyFamily,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    ProxyTransport,
    build_v1,
    build_v2,
    looks_like_header,
    parse_header,
)

TRAILER = b"\x05\x01\x00"
"""A SOCKS greeting after the header: it must come out untouched."""


def read_whole(data: bytes) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    reader.receive_data(data)
    header = reader.next_event()
    assert isinstance(header, ProxyHeader)
    return header, reader.trailing_data()


def read_bytewise(data: bytes) -> tuple[ProxyHeader, bytes]:
    reader = ProxyHeaderReader()
    for i in range(len(data)):
        reader.receive_data(data[i : i + 1])
        event = reader.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            return event, reader.trailing_data() + data[i + 1 :]
    raise AssertionError("the header never completed")


READERS = pytest.mark.parametrize("read", [read_whole, read_bytewise], ids=["whole", "bytewise"])

V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # the spec's example
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::11 56324 1080\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_WORST = (  # the spec's longest line: 107 bytes
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)
# What HAProxy 2.6 sends with send-proxy-v2 for a client 172.19.0.1:42578 -> 172.19.0.3:80.
V2_TCP4 = bytes.fromhex("0d0a0d0a000d0a515549540a 21 11 000c ac130001 ac130003 a652 0050")
V2_TCP6 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a 21 21 0024"
    "20010db8000000000000000000000001 20010db8000000000000000000000011 04d2 0438"
)
V2_LOCAL = bytes.fromhex("0d0a0d0a000d0a515549540a 20 00 0000")  # a HAProxy health check
V2_TLVS = bytes.fromhex(
    "0d0a0d0a000d0a515549540a 21 11 0015 c0000201 c0000202 3039 0438"
    "04 0000"  # PP2_TYPE_NOOP, empty
    "05 0003 616263"  # PP2_TYPE_UNIQUE_ID "abc"
)
V2_UNIX = (
    bytes.fromhex("0d0a0d0a000d0a515549540a 21 31 00d8")
    + b"/run/a".ljust(108, b"\0")
    + b"/run/b".ljust(108, b"\0")
)


@READERS
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            V1_TCP4,
            ProxyHeader(
                1,
                ProxyCommand.PROXY,
                ProxyFamily.INET,
                ProxyTransport.STREAM,
                ("192.168.0.1", 56324),
                ("192.168.0.11", 443),
            ),
        ),
        (
            V1_TCP6,
            ProxyHeader(
                1,
                ProxyCommand.PROXY,
                ProxyFamily.INET6,
                ProxyTransport.STREAM,
                ("2001:db8::1", 56324),
                ("2001:db8::11", 1080),
            ),
        ),
        (V1_UNKNOWN, ProxyHeader(1)),
        (V1_WORST, ProxyHeader(1)),
        (
            V2_TCP4,
            ProxyHeader(
                2,
                ProxyCommand.PROXY,
                ProxyFamily.INET,
                ProxyTransport.STREAM,
                ("172.19.0.1", 42578),
                ("172.19.0.3", 80),
            ),
        ),
        (
            V2_TCP6,
            ProxyHeader(
                2,
                ProxyCommand.PROXY,
                ProxyFamily.INET6,
                ProxyTransport.STREAM,
                ("2001:db8::1", 1234),
                ("2001:db8::11", 1080),
            ),
        ),
        (V2_LOCAL, ProxyHeader(2, ProxyCommand.LOCAL)),
        (
            V2_TLVS,
            ProxyHeader(
                2,
                ProxyCommand.PROXY,
                ProxyFamily.INET,
                ProxyTransport.STREAM,
                ("192.0.2.1", 12345),
                ("192.0.2.2", 1080),
                ((4, b""), (5, b"abc")),
            ),
        ),
        (V2_UNIX, ProxyHeader(2, ProxyCommand.PROXY, ProxyFamily.UNIX, ProxyTransport.STREAM)),
    ],
    ids=[
        "v1-tcp4",
        "v1-tcp6",
        "v1-unknown",
        "v1-107-bytes",
        "v2-tcp4",
        "v2-tcp6",
        "v2-local",
        "v2-tlvs",
        "v2-unix",
    ],
)
def test_valid_headers(read: object, data: bytes, expected: ProxyHeader) -> None:
    header, rest = read(data + TRAILER)  # type: ignore[operator]
    assert header == expected
    assert rest == TRAILER


def test_v2_local_ignores_its_address_block() -> None:
    """LOCAL: the family is ignored and the block skipped by its length, not assumed empty."""
    data = bytes.fromhex("0d0a0d0a000d0a515549540a 20 ff 0004 01020304")
    assert parse_header(data + TRAILER) == (ProxyHeader(2, ProxyCommand.LOCAL), 20)


def test_v1_ipv4_mapped_ipv6_as_haproxy_prints_it() -> None:
    header, _ = read_whole(b"PROXY TCP6 ::ffff:192.0.2.5 ::ffff:192.0.2.1 4000 1080\r\n")
    assert header.source == ("::ffff:192.0.2.5", 4000)


BAD = [
    (b"\x05\x01\x00", "not a PROXY protocol header"),  # a SOCKS greeting: refused at once
    (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\n", "lone CR"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "expected 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected 'PROXY TCP4|TCP6"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "expected 'PROXY TCP4|TCP6"),
    (b"PROXY UNKNOWNX\r\n", "expected 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "canonical IPv4"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "canonical IPv4"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "canonical IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "canonical IPv6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port '01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "out of range"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "port '+1'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xb2\r\n", "US-ASCII"),
    (b"PROXY UNKNOWN " + b"f" * 100, "no CRLF in the first 107 bytes"),
    (V1_WORST[:-2] + b"f\r\n", "no CRLF in the first 107 bytes"),
    (SIGNATURE_V2 + bytes.fromhex("11 11 000c") + bytes(12), "version 1, expected 2"),
    (SIGNATURE_V2 + bytes.fromhex("22 11 000c") + bytes(12), "unknown command 0x2"),
    (SIGNATURE_V2 + bytes.fromhex("21 41 000c") + bytes(12), "family/transport byte 0x41"),
    (SIGNATURE_V2 + bytes.fromhex("21 13 000c") + bytes(12), "family/transport byte 0x13"),
    (SIGNATURE_V2 + bytes.fromhex("21 11 000b") + bytes(11), "INET needs 12 address bytes"),
    (SIGNATURE_V2 + bytes.fromhex("21 21 000c") + bytes(12), "INET6 needs 36 address bytes"),
    (SIGNATURE_V2 + bytes.fromhex("21 11 000e") + bytes(14), "truncated TLV"),
    (SIGNATURE_V2 + bytes.fromhex("21 11 0010") + bytes(12) + b"\x04\x00\x05x", "longer than"),
    (SIGNATURE_V2 + bytes.fromhex("21 11 ffff"), "over the 2048-byte limit"),
    (b"\r\n\r\n\x00\r\nQUIT\r", "not a PROXY protocol header"),
]


@READERS
@pytest.mark.parametrize(("data", "message"), BAD)
def test_invalid_headers(read: object, data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message.replace("|", r"\|").replace("+", r"\+")):
        read(data + TRAILER)  # type: ignore[operator]


def test_refused_at_the_first_byte_that_cannot_start_a_header() -> None:
    """A client speaking SOCKS to a listener that expects the header is not waited for."""
    reader = ProxyHeaderReader()
    reader.receive_data(b"\x05")
    with pytest.raises(ProxyHeaderError) as raised:
        reader.next_event()
    assert raised.value.reply is None  # closed without a SOCKS reply
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXZ")
    with pytest.raises(ProxyHeaderError):
        reader.next_event()


def test_buffered_counts_what_waits() -> None:
    reader = ProxyHeaderReader()
    assert reader.buffered == 0
    reader.receive_data(V1_TCP4[:10])
    assert reader.next_event() is NEED_DATA
    assert reader.buffered == 10
    reader.receive_data(V1_TCP4[10:] + TRAILER)
    assert isinstance(reader.next_event(), ProxyHeader)
    assert reader.buffered == len(TRAILER)
    assert reader.trailing_data() == TRAILER
    assert reader.buffered == 0


def test_partial_headers_need_data() -> None:
    for data in (V1_TCP4, V2_TCP6, V2_LOCAL):
        for cut in range(len(data)):
            assert parse_header(data[:cut]) is None


def test_size_cap_is_checked_before_the_body_arrives() -> None:
    reader = ProxyHeaderReader(max_size=64)
    reader.receive_data(SIGNATURE_V2 + bytes.fromhex("21 11 0040"))  # 16 + 64 > 64
    with pytest.raises(ProxyHeaderError, match="over the 64-byte limit"):
        reader.next_event()


def test_looks_like_header() -> None:
    assert looks_like_header(b"P")
    assert looks_like_header(b"PROXY TCP4")
    assert looks_like_header(b"\r\n")
    assert looks_like_header(V2_LOCAL)
    assert not looks_like_header(b"\x05\x01\x00")
    assert not looks_like_header(b"")


def test_builders_match_the_spec_bytes() -> None:
    assert build_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == V1_TCP4
    assert build_v1() == V1_UNKNOWN
    assert build_v2(ProxyCommand.PROXY, ("172.19.0.1", 42578), ("172.19.0.3", 80)) == V2_TCP4
    assert build_v2(ProxyCommand.LOCAL) == V2_LOCAL
    assert (
        build_v2(
            ProxyCommand.PROXY, ("192.0.2.1", 12345), ("192.0.2.2", 1080), ((4, b""), (5, b"abc"))
        )
        == V2_TLVS
    )
    with pytest.raises(ValueError, match="one address family"):
        build_v1(("192.0.2.1", 1), ("::1", 2))


# -- properties ----------------------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoints = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5).map(tuple)


def same(parsed: tuple[str, int] | None, built: tuple[str, int]) -> bool:
    """One address and port (``::ffff:0:0`` and ``::ffff:0.0.0.0`` are one address)."""
    assert parsed is not None
    return ip_address(parsed[0]) == ip_address(built[0]) and parsed[1] == built[1]


@settings(max_examples=300)
@given(endpoints, st.binary(max_size=32))
def test_v1_round_trip(ends: tuple[tuple[str, int], tuple[str, int]], rest: bytes) -> None:
    source, destination = ends
    data = build_v1(source, destination)
    assert len(data) <= 107
    for read in (read_whole, read_bytewise):
        header, trailing = read(data + rest)
        assert header.version == 1
        assert same(header.source, source) and same(header.destination, destination)
        assert trailing == rest


@settings(max_examples=300)
@given(endpoints, tlv_lists, st.binary(max_size=32))
def test_v2_round_trip(
    ends: tuple[tuple[str, int], tuple[str, int]], tlvs: tuple[tuple[int, bytes], ...], rest: bytes
) -> None:
    source, destination = ends
    data = build_v2(ProxyCommand.PROXY, source, destination, tlvs)
    for read in (read_whole, read_bytewise):
        header, trailing = read(data + rest)
        assert (header.version, header.command) == (2, ProxyCommand.PROXY)
        assert same(header.source, source) and same(header.destination, destination)
        assert header.tlvs == tlvs
        assert trailing == rest


def _feed(data: bytes, chunk: int) -> None:
    reader = ProxyHeaderReader(max_size=MAX_HEADER_SIZE)
    for i in range(0, len(data), chunk):
        reader.receive_data(data[i : i + chunk])
        if reader.next_event() is not NEED_DATA:
            reader.trailing_data()
            return


@settings(max_examples=1000)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: SIGNATURE_V2 + b),
        st.builds(
            lambda v, f, n, body: SIGNATURE_V2 + bytes((v, f)) + n.to_bytes(2, "big") + body,
            st.integers(0, 255),
            st.integers(0, 255),
            st.integers(0, 300),
            st.binary(max_size=300),
        ),
    ),
    st.integers(1, 17),
)
def test_garbage_never_crashes(data: bytes, chunk: int) -> None:
    """Any bytes give a header, NEED_DATA or ProxyHeaderError: never another exception."""
    with contextlib.suppress(ProxyHeaderError):
        _feed(data, chunk)
