"""protocol/udp.py: UDP header framing, reply headers, the association's source filter and the
BIND peer filter; byte-exact cases and hypothesis properties."""

from __future__ import annotations

from socket import AF_INET6, inet_ntop

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socksd.protocol import (
    MAX_UDP_PAYLOAD_IPV4,
    Address,
    BindPeerFilter,
    RemoteProtocolError,
    ReplyCode,
    UdpClientFilter,
    UdpDatagram,
    udp_header_length,
    udp_reply_header,
)
from socksd.protocol.udp import is_unspecified
from tests.protocol.test_messages import UDP_CASES
from tests.protocol.test_properties import addresses, datagrams

ports = st.integers(0, 0xFFFF)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda ip: inet_ntop(AF_INET6, ip.packed))


# -- header framing --------------------------------------------------------------------------------


@pytest.mark.parametrize(("datagram", "wire"), UDP_CASES)
def test_header_length_byte_exact(datagram: UdpDatagram, wire: bytes) -> None:
    for kind in (bytes, bytearray, memoryview):
        assert udp_header_length(kind(wire)) == len(datagram.header())


@pytest.mark.parametrize(
    ("wire", "length"),
    [
        (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35", 10),
        (b"\x00\x00\x00\x04" + bytes(16) + b"\x00\x35DATA", 22),
        (b"\x00\x00\x00\x03\x00\x00\x35", 7),  # an empty name: framed, refused by the parser
        (b"\x00\x00\x00\x03\x01a\x00\x35", 8),
    ],
)
def test_header_length_cases(wire: bytes, length: int) -> None:
    assert udp_header_length(wire) == length


@pytest.mark.parametrize(("datagram", "wire"), UDP_CASES)
def test_header_length_truncated(datagram: UdpDatagram, wire: bytes) -> None:
    for cut in range(len(datagram.header())):
        with pytest.raises(RemoteProtocolError):
            udp_header_length(wire[:cut])


@pytest.mark.parametrize("atyp", [0, 2, 5, 0xFF])
def test_header_length_unknown_atyp(atyp: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        udp_header_length(bytes((0, 0, 0, atyp)) + bytes(20))
    assert info.value.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


@given(datagrams)
def test_header_length_matches_the_parser(datagram: UdpDatagram) -> None:
    wire = datagram.to_bytes()
    end = udp_header_length(wire)
    assert end == len(datagram.header())
    assert wire[end:] == datagram.data


@given(st.binary(max_size=300))
def test_header_length_on_garbage(buf: bytes) -> None:
    try:
        end = udp_header_length(buf)
    except RemoteProtocolError:
        return
    assert 7 <= end <= len(buf)
    try:
        parsed = UdpDatagram.parse(buf)
    except RemoteProtocolError:
        return  # framed, but a name no host can have
    assert len(parsed.data) == len(buf) - end


# -- reply headers ---------------------------------------------------------------------------------


def test_reply_header_byte_exact() -> None:
    assert udp_reply_header("127.0.0.1", 53) == b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35"
    assert udp_reply_header("::1", 5353) == b"\x00\x00\x00\x04" + bytes(15) + b"\x01\x14\xe9"


@given(st.one_of(ipv4, ipv6), ports, st.binary(max_size=100))
def test_reply_header_round_trip(ip: str, port: int, data: bytes) -> None:
    wire = udp_reply_header(ip, port) + data
    assert UdpDatagram.parse(wire) == UdpDatagram(Address.of(ip, port), data)


def test_max_payload() -> None:
    assert MAX_UDP_PAYLOAD_IPV4 == 65535 - 20 - 8


# -- who may send into an association --------------------------------------------------------------


def test_client_filter_learns_the_first_port() -> None:
    f = UdpClientFilter("192.0.2.1", Address.unspecified())
    assert not f.fixed
    assert not f.accept("192.0.2.2", 4000)  # another host never
    assert not f.fixed
    assert f.accept("192.0.2.1", 4000)
    assert f.fixed and f.port == 4000
    assert f.accept("192.0.2.1", 4000)
    assert not f.accept("192.0.2.1", 4001)


def test_client_filter_enforces_the_declared_port() -> None:
    for declared in (Address.of("192.0.2.1", 5000), Address.of("0.0.0.0", 5000)):
        f = UdpClientFilter("192.0.2.1", declared)
        assert f.fixed
        assert not f.accept("192.0.2.1", 4000)  # not even first
        assert f.accept("192.0.2.1", 5000)
        assert not f.accept("192.0.2.9", 5000)


def test_client_filter_other_declared_address_learns() -> None:
    """A client behind NAT declares its private address: its port says nothing reliable."""
    f = UdpClientFilter("198.51.100.7", Address.of("10.0.0.5", 5000))
    assert not f.fixed
    assert f.accept("198.51.100.7", 61000)
    assert not f.accept("198.51.100.7", 5000)


def test_client_filter_ipv6() -> None:
    f = UdpClientFilter("::1", Address.of("::", 0))
    assert f.accept("::1", 1)
    assert not f.accept("::2", 1)


@given(
    st.one_of(ipv4, ipv6),
    addresses,
    st.lists(st.tuples(st.one_of(ipv4, ipv6), ports), max_size=20),
)
def test_client_filter_accepts_one_source_only(
    client: str, declared: Address, sources: list[tuple[str, int]]
) -> None:
    f = UdpClientFilter(client, declared)
    accepted = {source for source in sources if f.accept(*source)}
    assert all(ip == client for ip, _ in accepted)
    assert len(accepted) <= 1
    if accepted and declared.port and (is_unspecified(declared) or declared.host == client):
        assert accepted == {(client, declared.port)}


# -- BIND's expected peer --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", [Address.of("0.0.0.0", 0), Address.of("::", 21), Address.of("0.0.0.0", 20)]
)
def test_bind_unspecified_accepts_any(address: Address) -> None:
    f = BindPeerFilter.for_request(address)
    assert f.accepts_any
    assert f.accept("203.0.113.9") and f.accept("::1")


def test_bind_address_accepts_that_host_only() -> None:
    f = BindPeerFilter.for_request(Address.of("203.0.113.5", 21))
    assert f.accept("203.0.113.5")
    assert not f.accept("203.0.113.6")
    assert not f.accepts_any


def test_bind_name_accepts_its_addresses() -> None:
    f = BindPeerFilter.for_request(Address.of("ftp.example", 21), ["192.0.2.1", "2001:db8::1"])
    assert f.accept("192.0.2.1") and f.accept("2001:db8::1")
    assert not f.accept("192.0.2.2")


@given(addresses, st.one_of(ipv4, ipv6))
def test_bind_filter_property(address: Address, peer: str) -> None:
    f = BindPeerFilter.for_request(address, ["192.0.2.77"])
    if is_unspecified(address):
        assert f.accept(peer)
    elif address.atyp.name == "DOMAIN":
        assert f.accept(peer) == (peer == "192.0.2.77")
    else:
        assert f.accept(peer) == (peer == address.host)
