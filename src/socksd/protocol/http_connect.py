"""HTTP CONNECT, sans I/O: the proxy's side of one ``CONNECT host:port`` request, on h11.

:class:`HttpConnectReader` is fed the client's bytes (``receive_data``; ``b""`` is the end of the
stream); ``next_event()`` returns ``NEED_DATA`` until the request head is whole, then one
:class:`ConnectRequest` (target as an :class:`~socksd.protocol.address.Address`, headers,
``Proxy-Authorization: Basic`` credentials), or ``CONNECTION_CLOSED`` when the client closed before
sending a byte. ``trailing_data()`` then gives the bytes the client sent after the blank line (a
TLS ClientHello, say): they belong to the relay and must be sent on first, not dropped. h11 parses
the head (request line, header syntax, framing); this module adds what a proxy needs on top.

Refusals are exceptions, as in the SOCKS cores: :class:`HttpConnectError` carries the status to
answer and ``refusal(error)`` gives the response bytes (after which the connection is closed):

* any method but CONNECT (``GET http://...``, ``OPTIONS *``): 405 with ``Allow: CONNECT``. 405
  rather than 501 because socksd knows these methods and the answer can say what it does support;
* a target that is not ``host:port`` (IPv6 in brackets, port 1-65535, a valid host name or IP
  literal): 400; so are a request body (Content-Length other than 0, or Transfer-Encoding) and a
  ``Proxy-Authorization: Basic`` header that does not decode (bad base64, no ``:``, two headers);
* a head over ``max_head_size`` bytes (h11's ``max_incomplete_event_size`` while incomplete, the
  same bound checked again on a head that arrived whole) or with over ``max_headers`` fields: 431;
* anything h11 refuses: the status h11 hints (400, 431, 501 for an unknown transfer coding).

``Proxy-Authorization`` with a scheme other than Basic is treated as absent (``credentials`` None),
so the shell answers 407 with its Basic challenge when it requires a login, and ignores it when it
does not. The shell owns the header timeout (a slow-loris client is fed byte by byte, forever, and
the reader just keeps answering ``NEED_DATA`` within its size bound).

The ``Host`` header is not compared with the target (the target decides, as RFC 9112 s. 3.2.3
has it for CONNECT); other headers (``Proxy-Connection``, ``User-Agent``) are kept and ignored.

Responses are fixed text, built here: :func:`established`, :func:`error_response`,
:func:`proxy_auth_required`, :func:`response_for_reply` (not re-exported by ``socksd.protocol``:
call them as ``http_connect.error_response(503)``). ``200 Connection established`` with no header (RFC 9110 s. 9.3.6:
no Content-Length in a 2xx to CONNECT), errors with ``Content-Type: text/plain``, Content-Length, a
one-line body and ``Connection: close``; 407 adds ``Proxy-Authenticate: Basic realm="socksd"``,
405 ``Allow: CONNECT``.

Outcome -> status, the same outcomes that give SOCKS5's reply codes (:data:`HTTP_STATUS_FOR`):

=========================================================  ======  ======
outcome (SOCKS5 REP)                                       REP     status
=========================================================  ======  ======
succeeded                                                  0x00    200
general failure                                            0x01    502
not allowed by the rules                                   0x02    403
network unreachable                                        0x03    502
host unreachable (also: the name does not resolve)         0x04    502
connection refused                                         0x05    502
TTL expired (socksd: connect timeout)                      0x06    504
command not supported                                      0x07    405
address type not supported                                 0x08    400
a session limit (``max_sessions``, per IP / per user)      --      503
login missing or wrong                                     --      407
=========================================================  ======  ======

502 says "the proxy could not get through to the target" for every connect failure but a timeout,
which 504 (Gateway Timeout) names; the body says which (refused, unreachable, ...). Limits are not
reply codes: the shell answers them with :data:`LIMIT_STATUS` (``error_response(503)``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from http import HTTPStatus
from socket import AF_INET6, inet_pton
from typing import Final

import h11

from socksd.protocol.address import Address, is_valid_hostname
from socksd.protocol.connection import CONNECTION_CLOSED, NEED_DATA, _Closed, _NeedData
from socksd.protocol.constants import ReplyCode
from socksd.protocol.errors import LocalProtocolError, RemoteProtocolError

MAX_HEAD_SIZE: Final = 16 * 1024
"""Default cap of a request head (request line and header fields), in bytes; h11's default."""
MAX_HEADERS: Final = 100
"""Default cap of the number of header fields (http.client's and many servers' bound)."""
REALM: Final = "socksd"
"""The realm of the Basic challenge (``Proxy-Authenticate``)."""
LIMIT_STATUS: Final = 503
"""The status a session limit (not a reply code) is answered with."""

HTTP_STATUS_FOR: Final[dict[ReplyCode, int]] = {
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
"""SOCKS5 outcome -> HTTP status (the table in the module docstring)."""

_REPLY_DETAIL: Final[dict[ReplyCode, str]] = {
    ReplyCode.GENERAL_FAILURE: "the proxy could not connect to the target",
    ReplyCode.NOT_ALLOWED: "the proxy's rules do not allow this connection",
    ReplyCode.NETWORK_UNREACHABLE: "the target's network is unreachable",
    ReplyCode.HOST_UNREACHABLE: "the target host is unreachable or its name does not resolve",
    ReplyCode.CONNECTION_REFUSED: "the target refused the connection",
    ReplyCode.TTL_EXPIRED: "the connection to the target timed out",
    ReplyCode.COMMAND_NOT_SUPPORTED: "this proxy supports CONNECT only",
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: "the target address is not supported",
}

_DEFAULT_DETAIL: Final[dict[int, str]] = {
    400: "malformed CONNECT request",
    403: "the proxy's rules do not allow this connection",
    405: "this proxy supports CONNECT only",
    407: "this proxy needs a user name and password",
    431: "request header fields too large",
    502: "the proxy could not connect to the target",
    503: "the proxy is at its session limit, try again later",
    504: "the connection to the target timed out",
}


def http_status(outcome: ReplyCode) -> int:
    """The status that tells an HTTP client the outcome SOCKS5 would answer with ``outcome``."""
    return HTTP_STATUS_FOR[outcome]


class HttpConnectError(RemoteProtocolError):
    """The client's request cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class BasicCredentials:
    """``Proxy-Authorization: Basic``: user and password as sent (opaque bytes, like RFC 1929)."""

    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """One CONNECT request: where to, and what the client said."""

    address: Address
    """The target; IP literals are IPV4/IPV6 addresses, anything else a DOMAIN to resolve."""
    target: str
    """The request target as sent (``host:port``, ``[v6]:port``)."""
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)
    """Header fields in order, names as sent (Proxy-Authorization among them: do not log it)."""
    credentials: BasicCredentials | None = field(default=None, repr=False)
    """From ``Proxy-Authorization: Basic``; None when absent or another scheme."""
    http_version: str = "1.1"


def parse_authority(target: bytes | str) -> Address:
    """The ``host:port`` of a CONNECT target as an Address; HttpConnectError (400) if invalid."""
    text = target.decode("ascii", "replace") if isinstance(target, bytes) else target
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise HttpConnectError(f"CONNECT target {text!r}: expected [IPv6]:port")
        try:
            inet_pton(AF_INET6, host)
        except (OSError, ValueError):
            raise HttpConnectError(f"CONNECT target {text!r}: not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise HttpConnectError(f"CONNECT target {text!r}: expected host:port")
        if ":" in host:
            raise HttpConnectError(f"CONNECT target {text!r}: an IPv6 host needs brackets")
        if not is_valid_hostname(host.encode("ascii", "replace")):
            raise HttpConnectError(f"CONNECT target {text!r}: not a valid host name")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise HttpConnectError(f"CONNECT target {text!r}: port is not a number")
    port = int(port_text)
    if not 1 <= port <= 0xFFFF:
        raise HttpConnectError(f"CONNECT target {text!r}: port {port} is out of range")
    return Address.of(host, port)


def parse_basic_credentials(value: bytes) -> BasicCredentials | None:
    """A ``Proxy-Authorization`` value: Basic credentials, or None for another scheme.

    HttpConnectError (400) for Basic that does not decode: no token, bad base64, no ``:``.
    """
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    token = token.strip()
    if not token:
        raise HttpConnectError("Proxy-Authorization: Basic without credentials")
    try:
        decoded = base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        raise HttpConnectError("Proxy-Authorization: Basic credentials are not base64") from None
    username, colon, password = decoded.partition(b":")
    if not colon:
        raise HttpConnectError("Proxy-Authorization: Basic credentials have no ':'")
    return BasicCredentials(username, password)


class HttpConnectReader:
    """Reads one CONNECT request head from a client (the proxy's side), incrementally."""

    __slots__ = ("_h11", "_max_head_size", "_max_headers", "_received", "_request", "_trailing")

    def __init__(self, max_head_size: int = MAX_HEAD_SIZE, max_headers: int = MAX_HEADERS) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_size)
        self._max_head_size = max_head_size
        self._max_headers = max_headers
        self._received = 0
        self._request: ConnectRequest | None = None
        self._trailing: bytes | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the client; ``b""`` means the client closed its side."""
        if self._request is not None:
            raise LocalProtocolError("the request is read: later bytes belong to the relay")
        self._received += len(data)
        try:
            self._h11.receive_data(data)
        except RuntimeError:  # h11: data after the end of stream
            raise LocalProtocolError("data received after end of stream") from None

    def next_event(self) -> ConnectRequest | _NeedData | _Closed:
        """The request once its head is whole, ``NEED_DATA`` or ``CONNECTION_CLOSED``.

        Raises :class:`HttpConnectError` (carrying the status to answer) for a request socksd
        does not serve.
        """
        if self._request is not None:
            return self._request
        pending: ConnectRequest | None = None
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                raise HttpConnectError(str(e), _known_status(e.error_status_hint)) from None
            if event is h11.NEED_DATA:
                return NEED_DATA
            if isinstance(event, h11.ConnectionClosed):
                return CONNECTION_CLOSED
            if isinstance(event, h11.Request):
                pending = self._check(event)
            elif isinstance(event, h11.EndOfMessage):
                continue
            elif event is h11.PAUSED and pending is not None:  # whole; h11 awaits our answer
                data, _ = self._h11.trailing_data
                if self._received - len(data) > self._max_head_size:
                    raise HttpConnectError(f"request head over {self._max_head_size} bytes", 431)
                self._trailing = bytes(data)
                self._request = pending
                return pending
            else:  # pragma: no cover - a body is refused with its header, before any Data
                raise HttpConnectError(f"unexpected {type(event).__name__} in a CONNECT request")

    def _check(self, event: h11.Request) -> ConnectRequest:
        if event.method != b"CONNECT":
            method = event.method.decode("ascii", "replace")
            raise HttpConnectError(f"method {method} is not supported, only CONNECT", 405)
        headers = event.headers
        if len(headers) > self._max_headers:
            raise HttpConnectError(f"over {self._max_headers} header fields", 431)
        credentials = None
        seen_auth = False
        for name, value in headers:
            if name == b"proxy-authorization":
                if seen_auth:
                    raise HttpConnectError("more than one Proxy-Authorization header")
                seen_auth = True
                credentials = parse_basic_credentials(value)
            elif name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                raise HttpConnectError("a CONNECT request has no body")
        target = event.target.decode("ascii", "replace")
        return ConnectRequest(
            address=parse_authority(target),
            target=target,
            headers=tuple((bytes(n), bytes(v)) for n, v in headers.raw_items()),
            credentials=credentials,
            http_version=event.http_version.decode("ascii"),
        )

    def trailing_data(self) -> bytes:
        """The bytes after the request head (given once); only after the ConnectRequest."""
        if self._trailing is None:
            raise LocalProtocolError("no trailing data before the request is read")
        data, self._trailing = self._trailing, b""
        return data

    def refusal(self, error: HttpConnectError) -> bytes:
        """The response to answer ``error`` with (the connection is closed after it)."""
        return error_response(error.status)


def _known_status(hint: int) -> int:
    """h11's status hint when it is a known error status, else 400."""
    try:
        return hint if 400 <= hint <= 599 and HTTPStatus(hint) else 400
    except ValueError:
        return 400


# -- responses -------------------------------------------------------------------------------------

ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"


def established() -> bytes:
    """The answer to a CONNECT that went through; the relay starts after it."""
    return ESTABLISHED


def error_response(status: int, detail: str | None = None, realm: str = REALM) -> bytes:
    """An error response with a one-line plain-text body and ``Connection: close``.

    405 carries ``Allow: CONNECT``, 407 ``Proxy-Authenticate: Basic realm=...``.
    """
    if not 400 <= status <= 599:
        raise ValueError(f"{status} is not an error status")
    if any(c in realm for c in '"\\\r\n'):
        raise ValueError(f"realm {realm!r} cannot be quoted as is")
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    text = detail if detail is not None else _DEFAULT_DETAIL.get(status, phrase.lower())
    body = f"{status} {phrase}: {text}\n".encode("utf-8", "replace")
    lines = [f"HTTP/1.1 {status} {phrase}"]
    if status == 405:
        lines.append("Allow: CONNECT")
    elif status == 407:
        lines.append(f'Proxy-Authenticate: Basic realm="{realm}"')
    lines += [
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body


def proxy_auth_required(realm: str = REALM) -> bytes:
    """407 with the Basic challenge: no login, a wrong one, or another scheme."""
    return error_response(407, realm=realm)


def response_for_reply(outcome: ReplyCode) -> bytes:
    """The response for a SOCKS5 outcome (200 for success, else an error per the table)."""
    if outcome is ReplyCode.SUCCEEDED:
        return ESTABLISHED
    return error_response(HTTP_STATUS_FOR[outcome], _REPLY_DETAIL[outcome])


__all__ = [
    "ESTABLISHED",
    "HTTP_STATUS_FOR",
    "LIMIT_STATUS",
    "MAX_HEADERS",
    "MAX_HEAD_SIZE",
    "REALM",
    "BasicCredentials",
    "ConnectRequest",
    "HttpConnectError",
    "HttpConnectReader",
    "error_response",
    "established",
    "http_status",
    "parse_authority",
    "parse_basic_credentials",
    "proxy_auth_required",
    "response_for_reply",
]
