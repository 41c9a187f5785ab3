"""HTTP CONNECT: the request reader against curl's bytes and hand-written heads, the limits, Basic
credentials, the response builders (read back with h11's client role) and the status table."""

import base64
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from socksd.protocol import (
    CONNECTION_CLOSED,
    HTTP_STATUS_FOR,
    NEED_DATA,
    Address,
    AddressType,
    BasicCredentials,
    ConnectRequest,
    HttpConnectError,
    HttpConnectReader,
    LocalProtocolError,
    RemoteProtocolError,
    ReplyCode,
    http_status,
)
from socksd.protocol.http_connect import (
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    error_response,
    established,
    parse_authority,
    parse_basic_credentials,
    proxy_auth_required,
    response_for_reply,
)
from tests.protocol.test_properties import hostnames

PROPS = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# What curl 7.88.1 sent to a one-shot recorder on loopback (nothing resolved, nothing forwarded):
CURL_CONNECT = (
    b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n"
    b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)
"""curl -p -x http://127.0.0.1:PORT https://example.invalid"""
CURL_CONNECT_AUTH = (
    b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n"
    b"Proxy-Authorization: Basic dXNlcjpwdw==\r\n"
    b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)
"""curl -p -x http://user:pw@127.0.0.1:PORT https://example.invalid"""
CURL_CONNECT_IPV6 = (
    b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n"
    b"User-Agent: curl/7.88.1\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)
"""curl -p -x http://127.0.0.1:PORT https://[2001:db8::1]:8443/"""
CURL_GET = (
    b"GET http://example.invalid/ HTTP/1.1\r\nHost: example.invalid\r\n"
    b"User-Agent: curl/7.88.1\r\nAccept: */*\r\nProxy-Connection: Keep-Alive\r\n\r\n"
)
"""curl -x http://127.0.0.1:PORT http://example.invalid/ (a plain proxy request, no -p)"""
TLS_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32))


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")


def read(data: bytes, bytewise: bool, reader: HttpConnectReader | None = None) -> Any:
    """Feed ``data`` (at once or byte by byte) until the reader gives something but NEED_DATA."""
    reader = reader if reader is not None else HttpConnectReader()
    for chunk in [data[i : i + 1] for i in range(len(data))] if bytewise else [data]:
        reader.receive_data(chunk)
        if (event := reader.next_event()) is not NEED_DATA:
            return event
    return NEED_DATA


def head(target: str = "example.com:443", *headers: str, method: str = "CONNECT") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: example.com", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def refused(data: bytes, bytewise: bool = False, **limits: int) -> HttpConnectError:
    reader = HttpConnectReader(**limits)
    with pytest.raises(HttpConnectError) as info:
        read(data, bytewise, reader)
    return info.value


def basic(userpass: bytes) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(userpass).decode()


# --- curl's requests ------------------------------------------------------------------------------


def test_curl_connect(bytewise: bool) -> None:
    reader = HttpConnectReader()
    request = read(CURL_CONNECT, bytewise, reader)
    assert request == ConnectRequest(
        address=Address.of("example.invalid", 443),
        target="example.invalid:443",
        headers=(
            (b"Host", b"example.invalid:443"),
            (b"User-Agent", b"curl/7.88.1"),
            (b"Proxy-Connection", b"Keep-Alive"),
        ),
    )
    assert request.address.atyp is AddressType.DOMAIN
    assert request.credentials is None
    assert reader.trailing_data() == b""
    assert reader.next_event() is request  # asked again: the same request


def test_curl_connect_with_login(bytewise: bool) -> None:
    request = read(CURL_CONNECT_AUTH, bytewise)
    assert request.credentials == BasicCredentials(b"user", b"pw")
    assert "pw" not in repr(request)  # neither the credentials nor the header are shown
    assert "dXNlcjpwdw" not in repr(request)


def test_curl_connect_ipv6(bytewise: bool) -> None:
    request = read(CURL_CONNECT_IPV6, bytewise)
    assert request.address == Address(AddressType.IPV6, "2001:db8::1", 8443)
    assert request.target == "[2001:db8::1]:8443"


def test_curl_plain_get_is_405(bytewise: bool) -> None:
    reader = HttpConnectReader()
    with pytest.raises(HttpConnectError) as info:
        read(CURL_GET, bytewise, reader)
    assert info.value.status == 405
    assert isinstance(info.value, RemoteProtocolError)
    response = reader.refusal(info.value)
    assert response.startswith(b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\n")
    assert response.endswith(b"\r\n\r\n405 Method Not Allowed: this proxy supports CONNECT only\n")


# --- bytes after the head -------------------------------------------------------------------------


@pytest.mark.parametrize("after", [TLS_HELLO, b"x", b"\r\n", b"GET / HTTP/1.1\r\n\r\n" * 3])
def test_bytes_after_the_head_are_kept(after: bytes) -> None:
    reader = HttpConnectReader()
    reader.receive_data(CURL_CONNECT + after)
    assert isinstance(reader.next_event(), ConnectRequest)
    assert reader.trailing_data() == after
    assert reader.trailing_data() == b""  # given once: the relay owns them
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")  # later bytes go to the relay, not here


def test_head_split_before_the_blank_line_then_data() -> None:
    reader = HttpConnectReader()
    reader.receive_data(CURL_CONNECT[:-2])
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"\r\n" + TLS_HELLO)
    assert isinstance(reader.next_event(), ConnectRequest)
    assert reader.trailing_data() == TLS_HELLO


def test_no_trailing_data_before_the_request() -> None:
    reader = HttpConnectReader()
    reader.receive_data(CURL_CONNECT[:10])
    assert reader.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        reader.trailing_data()


# --- targets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("example.com:443", Address(AddressType.DOMAIN, "example.com", 443)),
        ("EXAMPLE.com.:1", Address(AddressType.DOMAIN, "EXAMPLE.com.", 1)),
        ("localhost:65535", Address(AddressType.DOMAIN, "localhost", 65535)),
        ("192.0.2.1:80", Address(AddressType.IPV4, "192.0.2.1", 80)),
        ("[::1]:22", Address(AddressType.IPV6, "::1", 22)),
        ("[2001:DB8:0:0::1]:8443", Address(AddressType.IPV6, "2001:db8::1", 8443)),
        ("[::ffff:192.0.2.1]:443", Address(AddressType.IPV6, "::ffff:192.0.2.1", 443)),
        ("example.com:0443", Address(AddressType.DOMAIN, "example.com", 443)),
    ],
)
def test_targets(target: str, address: Address) -> None:
    assert parse_authority(target) == address
    assert parse_authority(target.encode()) == address
    assert read(head(target), False).address == address


@pytest.mark.parametrize(
    "target",
    [
        "example.com",  # no port
        "example.com:",
        ":443",
        "example.com:0",
        "example.com:65536",
        "example.com:123456",
        "example.com:+443",
        "example.com:44 3",
        "example.com:https",
        "::1:443",  # IPv6 without brackets
        "[::1]",
        "[::1]443",
        "[::1:443",
        "[example.com]:443",
        "[fe80::1%25eth0]:443",  # no zone ids
        "user@example.com:443",
        "http://example.com:443",
        "exa_mple..com:443",
        "-example.com:443",
        "/path",
        "*",
    ],
)
def test_bad_targets_are_400(target: str) -> None:
    with pytest.raises(HttpConnectError) as info:
        parse_authority(target)
    assert info.value.status == 400
    error = refused(head(target))
    assert error.status == 400
    assert target in str(error) or target in {"*", "/path"}


# --- limits ---------------------------------------------------------------------------------------


def test_oversized_head_is_431_while_it_arrives(bytewise: bool) -> None:
    big = head("example.com:443", "X-Pad: " + "a" * 1200)
    assert isinstance(read(big, bytewise, HttpConnectReader(max_head_size=2048)), ConnectRequest)
    error = refused(big, bytewise, max_head_size=1024)
    assert error.status == 431


def test_oversized_head_arriving_whole_is_431() -> None:
    # one read holding the whole head: h11's bound covers incomplete heads only; ours covers this
    big = head("example.com:443", "X-Pad: " + "a" * 1200) + TLS_HELLO
    assert refused(big, max_head_size=1024).status == 431


def test_default_head_limit() -> None:
    fits = head("example.com:443", "X-Pad: " + "a" * (MAX_HEAD_SIZE - 200))
    assert isinstance(read(fits, False), ConnectRequest)
    over = head("example.com:443", "X-Pad: " + "a" * MAX_HEAD_SIZE)
    assert refused(over).status == 431


def test_too_many_headers_is_431() -> None:
    fields = [f"X-{i}: v" for i in range(MAX_HEADERS - 1)]  # plus Host: MAX_HEADERS
    assert isinstance(read(head("example.com:443", *fields), False), ConnectRequest)
    assert refused(head("example.com:443", *fields, "X-One-More: v")).status == 431
    assert refused(head("example.com:443", "A: 1", "B: 2"), max_headers=2).status == 431


def test_slow_header_is_bounded_in_size_not_time() -> None:
    reader = HttpConnectReader(max_head_size=1024)
    reader.receive_data(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\nX-Slow: ")
    for _ in range(900):  # a slow-loris client: the shell's header timeout ends this
        assert reader.next_event() is NEED_DATA
        reader.receive_data(b"a")
    reader.receive_data(b"a" * 200)
    with pytest.raises(HttpConnectError) as info:
        reader.next_event()
    assert info.value.status == 431


# --- malformed requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"CONNECT example.com:443\r\nHost: x\r\n\r\n", 400),  # no version
        (b"CONNECT  example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"\r\nCONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost x\r\n\r\n", 400),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400),
        (head("example.com:443", "Content-Length: 5") + b"hello", 400),
        (head("example.com:443", "Transfer-Encoding: chunked") + b"0\r\n\r\n", 400),
        (head("example.com:443", "Transfer-Encoding: gzip"), 501),  # h11's hint
        (head("example.com:443", method="GET"), 405),
        (head("example.com:443", method="connect"), 405),  # methods are case-sensitive
        (head("*", method="OPTIONS"), 405),
        (head("/", "Content-Length: 3", method="POST") + b"abc", 405),
    ],
)
def test_malformed_requests(data: bytes, status: int) -> None:
    assert refused(data).status == status


def test_content_length_zero_is_no_body() -> None:
    assert isinstance(read(head("example.com:443", "Content-Length: 0"), False), ConnectRequest)


def test_http_10_needs_no_host() -> None:
    request = read(b"CONNECT example.com:443 HTTP/1.0\r\n\r\n", True)
    assert request.http_version == "1.0"
    assert request.address == Address.of("example.com", 443)


def test_end_of_stream() -> None:
    reader = HttpConnectReader()
    reader.receive_data(b"")
    assert reader.next_event() is CONNECTION_CLOSED
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"x")

    reader = HttpConnectReader()
    reader.receive_data(CURL_CONNECT[:20])
    reader.receive_data(b"")
    with pytest.raises(HttpConnectError) as info:
        reader.next_event()
    assert info.value.status == 400


# --- Proxy-Authorization --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "credentials"),
    [
        (basic(b"alice:secret"), BasicCredentials(b"alice", b"secret")),
        (basic(b"alice:"), BasicCredentials(b"alice", b"")),
        (basic(b":pw"), BasicCredentials(b"", b"pw")),
        (basic(b"a:b:c"), BasicCredentials(b"a", b"b:c")),  # the first ':' separates (RFC 7617)
        (basic("j\u00fcrgen:p\u00e4ss".encode()), BasicCredentials("j\u00fcrgen".encode(), "p\u00e4ss".encode())),
        (basic(b"\xff\x00:\x00"), BasicCredentials(b"\xff\x00", b"\x00")),  # opaque bytes
        ("Proxy-Authorization: basic " + base64.b64encode(b"u:p").decode(), BasicCredentials(b"u", b"p")),
        ("Proxy-Authorization: BASIC   " + base64.b64encode(b"u:p").decode() + "  ", BasicCredentials(b"u", b"p")),
        ("Proxy-Authorization: Bearer abc.def", None),  # another scheme: as if absent
        ("Proxy-Authorization: Digest username=\"u\"", None),
        ("Proxy-Authorization: Basicdeadbeef", None),  # not "Basic" followed by a token
    ],
)  # fmt: skip
def test_basic_credentials(header: str, credentials: BasicCredentials | None) -> None:
    assert read(head("example.com:443", header), False).credentials == credentials


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("Basic", "without credentials"),
        ("Basic ", "without credentials"),
        ("Basic dXNlcjpwdw", "not base64"),  # padding missing
        ("Basic dXNl*cjpwdw==", "not base64"),
        ("Basic dXNlcjpwdw== extra", "not base64"),
        ("Basic " + base64.b64encode(b"no-colon").decode(), "no ':'"),
        ("Basic " + base64.b64encode(b"").decode() + "=", "not base64"),
    ],
)
def test_bad_basic_credentials_are_400(value: str, why: str) -> None:
    with pytest.raises(HttpConnectError, match=why) as info:
        parse_basic_credentials(value.encode())
    assert info.value.status == 400
    error = refused(head("example.com:443", f"Proxy-Authorization: {value}"))
    assert error.status == 400
    assert why in str(error)


def test_two_authorization_headers_are_400() -> None:
    error = refused(head("example.com:443", basic(b"a:b"), basic(b"c:d")))
    assert error.status == 400
    assert "more than one" in str(error)


# --- responses ------------------------------------------------------------------------------------


def parse_response(data: bytes, method: bytes = b"CONNECT") -> tuple[h11.Response, bytes]:
    """Read a response with h11's client role (a well-kept parser, not ours)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="example.com:443", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    client.receive_data(b"")
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage | h11.PAUSED):
        if isinstance(event, h11.Data):
            body += event.data
        if event is h11.PAUSED:
            break
    return response, body


def test_established() -> None:
    assert established() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    response, _ = parse_response(established())
    assert response.status_code == 200
    assert list(response.headers) == []  # no Content-Length in a 2xx to CONNECT


def test_proxy_auth_required() -> None:
    body = b"407 Proxy Authentication Required: this proxy needs a user name and password\n"
    assert (
        proxy_auth_required()
        == (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="socksd"\r\n'
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        + body
    )
    response, read_body = parse_response(proxy_auth_required())
    assert (b"proxy-authenticate", b'Basic realm="socksd"') in list(response.headers)
    assert read_body == body
    assert b'realm="other"' in proxy_auth_required("other")
    with pytest.raises(ValueError, match="realm"):
        proxy_auth_required('a"b')


@pytest.mark.parametrize("status", [400, 403, 405, 407, 431, 501, 502, 503, 504])
def test_error_responses(status: int) -> None:
    data = error_response(status)
    response, body = parse_response(data)
    assert response.status_code == status
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert headers[b"content-length"] == str(len(body)).encode()
    assert body.startswith(f"{status} ".encode())
    assert body.endswith(b"\n")
    assert body.count(b"\n") == 1
    assert (b"allow" in headers) is (status == 405)
    assert (b"proxy-authenticate" in headers) is (status == 407)


def test_error_response_detail_and_bounds() -> None:
    assert error_response(503).endswith(
        b"503 Service Unavailable: the proxy is at its session limit, try again later\n"
    )
    assert error_response(502, "no route").endswith(b"502 Bad Gateway: no route\n")
    for status in (200, 302, 600):
        with pytest.raises(ValueError, match="error status"):
            error_response(status)


def test_status_table() -> None:
    assert set(HTTP_STATUS_FOR) == set(ReplyCode)
    assert {code: http_status(code) for code in ReplyCode} == {
        ReplyCode.SUCCEEDED: 200,
        ReplyCode.GENERAL_FAILURE: 502,
        ReplyCode.NOT_ALLOWED: 403,
        ReplyCode.NETWORK_UNREACHABLE: 502,
        ReplyCode.HOST_UNREACHABLE: 502,
        ReplyCode.CONNECTION_REFUSED: 502,
        ReplyCode.TTL_EXPIRED: 504,
        ReplyCode.COMMAND_NOT_SUPPORTED: 405,
        ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: 400,
    }


@pytest.mark.parametrize("outcome", list(ReplyCode))
def test_response_for_reply(outcome: ReplyCode) -> None:
    response, body = parse_response(response_for_reply(outcome))
    assert response.status_code == HTTP_STATUS_FOR[outcome]
    if outcome is not ReplyCode.SUCCEEDED:
        assert len(body) > 10
    assert response_for_reply(ReplyCode.CONNECTION_REFUSED).endswith(
        b"502 Bad Gateway: the target refused the connection\n"
    )


# --- properties -----------------------------------------------------------------------------------

ports = st.integers(1, 0xFFFF)
targets = st.one_of(
    st.builds(lambda ip, p: (f"{ip}:{p}", Address.of(ip, p)), st.ip_addresses(v=4), ports),
    st.builds(lambda ip, p: (f"[{ip}]:{p}", Address.of(ip, p)), st.ip_addresses(v=6), ports),
    st.builds(lambda n, p: (f"{n}:{p}", Address.of(n, p)), hostnames, ports),
)
userpass = st.tuples(
    st.binary(max_size=60).map(lambda b: b.replace(b":", b"")), st.binary(max_size=60)
)


@PROPS
@given(targets, st.one_of(st.none(), userpass), st.binary(max_size=50), st.data())
def test_built_requests_read_back(
    target: tuple[str, Address],
    login: tuple[bytes, bytes] | None,
    after: bytes,
    data: st.DataObject,
) -> None:
    text, address = target
    fields = [basic(login[0] + b":" + login[1])] if login is not None else []
    wire = head(text, *fields) + after
    cut = data.draw(st.integers(1, len(wire)))
    reader = HttpConnectReader()
    reader.receive_data(wire[:cut])
    event = reader.next_event()
    if event is NEED_DATA:
        reader.receive_data(wire[cut:])
        event = reader.next_event()
        cut = len(wire)
    assert isinstance(event, ConnectRequest)
    assert event.address == address
    assert event.credentials == (BasicCredentials(*login) if login is not None else None)
    # what came with the head is handed over; later reads go to the relay directly
    assert reader.trailing_data() == wire[len(head(text, *fields)) : cut]


PLAUSIBLE = [
    b"",
    b"CONNECT ",
    b"CONNECT a:1 HTTP/1.1\r\n",
    CURL_CONNECT[:-2],
    b"GET / HTTP/1.1\r\n",
]
garbage = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda h, t: h + t, st.sampled_from(PLAUSIBLE), st.binary(max_size=200)),
    st.builds(
        lambda h, t: h + t,
        st.sampled_from(PLAUSIBLE),
        st.text(st.characters(codec="latin-1"), max_size=200).map(lambda t: t.encode("latin-1")),
    ),
    st.builds(
        lambda i, b: CURL_CONNECT_AUTH[:i] + bytes((b,)) + CURL_CONNECT_AUTH[i + 1 :],
        st.integers(0, len(CURL_CONNECT_AUTH) - 1),
        st.integers(0, 255),
    ),
)


@PROPS
@given(garbage, st.integers(1, 50), st.booleans())
def test_garbage_raises_only_http_connect_errors(buf: bytes, step: int, eof: bool) -> None:
    reader = HttpConnectReader(max_head_size=256, max_headers=8)
    refusal: HttpConnectError | None = None
    try:
        for i in range(0, len(buf), step):
            reader.receive_data(buf[i : i + step])
            if isinstance(reader.next_event(), ConnectRequest):
                reader.trailing_data()
                return
        if eof:
            reader.receive_data(b"")
            assert reader.next_event() in (NEED_DATA, CONNECTION_CLOSED)
    except HttpConnectError as error:
        refusal = error
    if refusal is not None:
        assert 400 <= refusal.status <= 599
        response, _ = parse_response(reader.refusal(refusal))
        assert response.status_code == refusal.status
