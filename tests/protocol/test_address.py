"""Address: construction, canonical form, wire form and the domain-name check (RFC 1928 s. 5)."""

import ipaddress

import pytest

from socksd.protocol import (
    Address,
    AddressType,
    RemoteProtocolError,
    ReplyCode,
    is_valid_hostname,
    parse_address,
)

NAME_255 = b".".join([b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 63])  # 4 * 63 + 3 dots
assert len(NAME_255) == 255


# --- Address.of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "atyp", "canonical"),
    [
        ("127.0.0.1", AddressType.IPV4, "127.0.0.1"),
        ("0.0.0.0", AddressType.IPV4, "0.0.0.0"),
        ("255.255.255.255", AddressType.IPV4, "255.255.255.255"),
        ("::1", AddressType.IPV6, "::1"),
        ("0:0::1", AddressType.IPV6, "::1"),
        ("0000:0000:0000:0000:0000:0000:0000:0001", AddressType.IPV6, "::1"),
        ("[::1]", AddressType.IPV6, "::1"),
        ("[0:0::1]", AddressType.IPV6, "::1"),
        ("2001:DB8::1", AddressType.IPV6, "2001:db8::1"),
        ("2001:0db8:0000:0000:0000:ff00:0042:8329", AddressType.IPV6, "2001:db8::ff00:42:8329"),
        ("[2001:db8:1:2:3:4:5:6]", AddressType.IPV6, "2001:db8:1:2:3:4:5:6"),
        ("localhost", AddressType.DOMAIN, "localhost"),
        ("example.com", AddressType.DOMAIN, "example.com"),
        ("example.com.", AddressType.DOMAIN, "example.com."),
        ("_srv.my-host.example", AddressType.DOMAIN, "_srv.my-host.example"),
        ("a", AddressType.DOMAIN, "a"),
    ],
)
def test_of_text(host: str, atyp: AddressType, canonical: str) -> None:
    address = Address.of(host, 1080)
    assert address.atyp is atyp
    assert address.host == canonical
    assert address.port == 1080


def test_of_ipaddress_objects() -> None:
    assert Address.of(ipaddress.IPv4Address("10.1.2.3"), 80) == Address(
        AddressType.IPV4, "10.1.2.3", 80
    )
    assert Address.of(ipaddress.IPv6Address("0:0::1"), 80) == Address(AddressType.IPV6, "::1", 80)


def test_of_canonical_forms_are_equal() -> None:
    assert Address.of("0:0::1", 1) == Address.of("::1", 1) == Address.of("[::1]", 1)
    assert hash(Address.of("0:0::1", 1)) == hash(Address.of("::1", 1))


@pytest.mark.parametrize(
    "host",
    ["", "a b", "localhost\x00junk", "ex\u00e4mple.com", "-leading.dash", "trailing-.dash", "a..b"],
)
def test_of_rejects_invalid_names(host: str) -> None:
    with pytest.raises(ValueError, match="host name"):
        Address.of(host, 80)


@pytest.mark.parametrize(
    "text", ["::ffff:1.2.3.4", "::ffff:102:304", "::ffff:0:0", "64:ff9b::1.2.3.4"]
)
def test_ipv6_canonical_form_is_one_form(text: str) -> None:
    """Text, ipaddress object and wire bytes of one IPv6 address give one equal Address."""
    ip = ipaddress.IPv6Address(text)
    from_text = Address.of(text, 1)
    from_object = Address.of(ip, 1)
    from_wire = parse_address(b"\x04" + ip.packed + b"\x00\x01", 0)
    assert from_wire is not None
    assert from_text == from_object == from_wire[0]
    assert from_text.ip == from_object.ip == ip
    assert from_object.pack() == b"\x04" + ip.packed + b"\x00\x01"


@pytest.mark.parametrize("host", ["fe80::1%eth0", "fe80::1%3", "[fe80::1%lo]"])
def test_of_drops_ipv6_scope(host: str) -> None:
    """A link-local sockname ("fe80::1%eth0") still makes a reply address: 16 bytes, no scope."""
    assert Address.of(host, 22) == Address(AddressType.IPV6, "fe80::1", 22)
    assert Address.of(ipaddress.IPv6Address(host.strip("[]")), 22) == Address.of("fe80::1", 22)


def test_unspecified() -> None:
    assert Address.unspecified() == Address(AddressType.IPV4, "0.0.0.0", 0)
    assert Address.unspecified(53) == Address(AddressType.IPV4, "0.0.0.0", 53)


def test_ip_property() -> None:
    assert Address.of("1.2.3.4", 1).ip == ipaddress.IPv4Address("1.2.3.4")
    assert Address.of("::1", 1).ip == ipaddress.IPv6Address("::1")
    assert Address.of("example.com", 1).ip is None


def test_str() -> None:
    assert str(Address.of("1.2.3.4", 80)) == "1.2.3.4:80"
    assert str(Address.of("::1", 443)) == "[::1]:443"
    assert str(Address.of("example.com", 8080)) == "example.com:8080"


# --- ports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["1.2.3.4", "::1", "example.com"])
@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_bounds_accepted(host: str, port: int) -> None:
    address = Address.of(host, port)
    assert address.port == port
    assert address.pack()[-2:] == port.to_bytes(2, "big")


@pytest.mark.parametrize("host", ["1.2.3.4", "::1", "example.com"])
@pytest.mark.parametrize("port", [-1, 65536, 1 << 20])
def test_port_bounds_rejected(host: str, port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        Address.of(host, port)


def test_direct_construction_checks_domain() -> None:
    with pytest.raises(ValueError, match="host name"):
        Address(AddressType.DOMAIN, "bad name", 80)
    with pytest.raises(ValueError, match="host name"):
        Address(AddressType.DOMAIN, "x" * 256, 80)
    assert Address(AddressType.DOMAIN, NAME_255.decode(), 80).host == NAME_255.decode()


# --- wire form -----------------------------------------------------------------------------------

IPV6_FULL = "2001:db8:85a3:8d3:1319:8a2e:370:7348"
IPV6_FULL_PACKED = bytes.fromhex("20010db885a308d313198a2e03707348")

WIRE = [
    (Address.of("127.0.0.1", 80), b"\x01\x7f\x00\x00\x01\x00\x50"),
    (Address.of("192.168.1.254", 65535), b"\x01\xc0\xa8\x01\xfe\xff\xff"),
    (Address.unspecified(), b"\x01\x00\x00\x00\x00\x00\x00"),
    (Address.of("::1", 8080), b"\x04" + b"\x00" * 15 + b"\x01" + b"\x1f\x90"),
    (Address.of("::", 0), b"\x04" + b"\x00" * 16 + b"\x00\x00"),
    (Address.of(IPV6_FULL, 443), b"\x04" + IPV6_FULL_PACKED + b"\x01\xbb"),
    (Address.of("a", 1), b"\x03\x01a\x00\x01"),
    (Address.of("example.com", 443), b"\x03\x0bexample.com\x01\xbb"),
    (Address.of(NAME_255.decode(), 80), b"\x03\xff" + NAME_255 + b"\x00\x50"),
]


@pytest.mark.parametrize(("address", "wire"), WIRE, ids=[str(a) for a, _ in WIRE])
def test_pack(address: Address, wire: bytes) -> None:
    assert address.pack() == wire


@pytest.mark.parametrize(("address", "wire"), WIRE, ids=[str(a) for a, _ in WIRE])
def test_parse(address: Address, wire: bytes) -> None:
    assert parse_address(wire, 0) == (address, len(wire))
    # at an offset, followed by more bytes, from any buffer type
    buf = b"\xaa\xbb" + wire + b"tail"
    for kind in (bytes, bytearray, memoryview):
        assert parse_address(kind(buf), 2) == (address, 2 + len(wire))


@pytest.mark.parametrize(("address", "wire"), WIRE, ids=[str(a) for a, _ in WIRE])
def test_parse_incomplete(address: Address, wire: bytes) -> None:
    for cut in range(len(wire)):
        assert parse_address(wire[:cut], 0) is None
        assert parse_address(b"xyz" + wire[:cut], 3) is None


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0x06, 0x7F, 0xFF])
def test_unknown_address_type(atyp: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_address(bytes((atyp,)) + b"\x00" * 20, 0)
    assert info.value.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
    assert info.value.reply == 0x08


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"localhost\x00junk",
        b"localhost\x00",
        b"\x00",
        b"local host",
        b" localhost",
        b"ex\xc3\xa4mple.com",
        b"\xff",
        b"a/b",
        b"a:80",
        b"[::1]",
        b"a..b",
        b".",
        b"-a",
        b"a-",
        b"x" * 64,
        b"localhost\n",
        b"::1%eth0",
        b"fe80::1%\x00junk",
        b"fe80::1% x",
    ],
)
def test_invalid_domain_is_host_unreachable(name: bytes) -> None:
    wire = b"\x03" + bytes((len(name),)) + name + b"\x00\x50"
    with pytest.raises(RemoteProtocolError) as info:
        parse_address(wire, 0)
    assert info.value.reply is ReplyCode.HOST_UNREACHABLE
    assert info.value.reply == 0x04


@pytest.mark.parametrize("name", [b"::1", b"2001:db8::1", b"127.0.0.1", b"0:0::1"])
def test_ip_literal_in_domain_form_is_accepted(name: bytes) -> None:
    wire = b"\x03" + bytes((len(name),)) + name + b"\x01\xbb"
    address, end = parse_address(wire, 0)  # type: ignore[misc]
    assert end == len(wire)
    assert address == Address(AddressType.DOMAIN, name.decode(), 443)
    assert address.pack() == wire


# --- is_valid_hostname ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        b"a",
        b"localhost",
        b"example.com",
        b"example.com.",
        b"xn--bcher-kva.example",
        b"_dmarc.example.com",
        b"0",
        b"123.example",
        b"x" * 63,
        NAME_255,
        b"1.2.3.4",
        b"::1",
        b"2001:db8::ff00:42:8329",
    ],
)
def test_valid_hostnames(name: bytes) -> None:
    assert is_valid_hostname(name)


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"x" * 64,
        NAME_255 + b"e",
        b"a" * 256,
        b"a..b",
        b"..",
        b".example",
        b"a b",
        b"a\x00",
        b"a\tb",
        b"a\r\nb",
        b"\xc3\xa4",
        b"a*b",
        b"a@b",
        b"[::1]",
        b"fe80::1%eth0",
        b"::1%\x00",
        b"::1%",
    ],
)
def test_invalid_hostnames(name: bytes) -> None:
    assert not is_valid_hostname(name)
