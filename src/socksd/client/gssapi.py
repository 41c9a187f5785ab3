"""The client's GSSAPI (RFC 1961) options and the streams and socket that encapsulate its data.

After a GSSAPI handshake every byte to and from the target travels as RFC 1961 MTYP=3 frames
(``socksd.protocol.gssapi.GssapiEncapsulation``), so the caller cannot be handed the bare
connection. For asyncio, :func:`encapsulated_streams` puts two thin layers on the proxy
connection's transport: :class:`_UnwrappingProtocol` (frames in, plain bytes to an ordinary
``StreamReaderProtocol``) and :class:`EncapsulatingTransport` (plain writes out as frames), and
returns an ordinary ``StreamReader`` / ``StreamWriter`` pair on top: flow control, ``drain()``,
``write_eof()`` and ``close()`` behave as usual. For blocking code :class:`GssapiSocket` is a small
socket-like object with ``sendall``/``recv``/``shutdown``/``close``.

A frame that fails verification ends the connection with a ``ProxyConnectionError``
(a ConnectionError): the data of the frames before it is delivered first.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from socksd.client.errors import ProxyConnectionError
from socksd.protocol import GssapiEncapsulation, GssapiError, ProtectionLevel

DEFAULT_SERVICE = "rcmd"


@dataclass(frozen=True, slots=True)
class GssapiOptions:
    """How to authenticate to the proxy with GSS-API (Kerberos), RFC 1961.

    ``service``/``hostname``: the proxy's host-based service name ``service@hostname``
    (hostname defaults to the proxy's host as given). ``level``: the protection level asked for
    (1 integrity, 2 confidentiality, 3 selective); ``accept_levels``: the levels taken from the
    proxy (default: ``level`` and those protecting more; 1 < 3 < 2). ``credentials``: a
    ``gssapi.Credentials`` to initiate with (default: the user's ticket cache).
    """

    service: str = DEFAULT_SERVICE
    hostname: str | None = None
    level: int = ProtectionLevel.CONFIDENTIALITY
    accept_levels: Collection[int] | None = None
    credentials: Any = field(default=None, repr=False)


class EncapsulatingTransport(asyncio.Transport):
    """The proxy connection's transport, with every write gss_wrap'ed into RFC 1961 frames."""

    def __init__(self, transport: asyncio.Transport, codec: GssapiEncapsulation) -> None:
        super().__init__()
        self._transport = transport
        self._codec = codec

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            self._transport.write(self._codec.encode(bytes(data)))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


class _UnwrappingProtocol(asyncio.Protocol):
    """On the proxy connection: unwraps frames and hands the plain bytes to ``inner``."""

    def __init__(
        self,
        codec: GssapiEncapsulation,
        inner: asyncio.StreamReaderProtocol,
        reader: asyncio.StreamReader,
        transport: asyncio.Transport,
        handshake_writer: asyncio.StreamWriter,
    ) -> None:
        self._codec = codec
        self._inner = inner
        self._reader = reader
        self._transport = transport
        # Held so that it is not collected: StreamWriter.__del__ closes an open transport.
        self._handshake_writer = handshake_writer

    def data_received(self, data: bytes) -> None:
        self._codec.receive_data(data)
        self.decode()

    def decode(self) -> None:
        """Deliver the plain bytes of every complete frame; a bad one ends the connection."""
        try:
            plain = self._codec.read()
        except GssapiError as e:
            self._reader.set_exception(ProxyConnectionError(f"GSSAPI: {e}"))
            self._transport.abort()
            return
        if plain:
            self._inner.data_received(plain)

    def eof_received(self) -> bool | None:
        if self._codec.buffered:
            self._reader.set_exception(
                ProxyConnectionError("GSSAPI: the proxy closed in the middle of a message")
            )
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)


def encapsulated_streams(
    writer: asyncio.StreamWriter, codec: GssapiEncapsulation, early: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """New streams over ``writer``'s connection that unwrap what they read and wrap what they write.

    ``early``: plain bytes already decoded during the handshake (they come first). The old streams
    must not be used any more; the handshake must have left nothing in the old reader.
    """
    loop = asyncio.get_running_loop()
    raw = writer.transport
    assert isinstance(raw, asyncio.Transport)
    reader = asyncio.StreamReader(loop=loop)
    inner = asyncio.StreamReaderProtocol(reader, loop=loop)
    wrapped = EncapsulatingTransport(raw, codec)
    inner.connection_made(wrapped)
    protocol = _UnwrappingProtocol(codec, inner, reader, raw, writer)
    raw.set_protocol(protocol)
    if early:
        inner.data_received(early)
    if codec.buffered:
        protocol.decode()
    return reader, asyncio.StreamWriter(wrapped, inner, reader, loop)


class GssapiSocket:
    """A connected, socket-like object whose traffic is RFC 1961-encapsulated on the wire.

    ``sendall``/``send`` wrap, ``recv`` unwraps; ``shutdown``, ``close``, ``settimeout``,
    ``fileno``, ``getpeername`` and ``getsockname`` are the underlying socket's. Use it as a
    context manager to close it.
    """

    RECV_SIZE = 65536 + 4

    def __init__(self, sock: socket.socket, codec: GssapiEncapsulation, early: bytes = b"") -> None:
        self.sock = sock
        self.codec = codec
        self._plain = bytearray(early)
        self._eof = False
        if codec.buffered:
            self._decode()

    def _decode(self) -> None:
        try:
            self._plain += self.codec.read()
        except GssapiError as e:
            raise ProxyConnectionError(f"GSSAPI: {e}") from None

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Wrap ``data`` and send all of it."""
        if data:
            self.sock.sendall(self.codec.encode(bytes(data)))

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Like ``sendall`` (a wrapped token is sent whole); returns ``len(data)``."""
        self.sendall(data)
        return len(data)

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` plain bytes; b"" at the end of the stream."""
        while not self._plain and not self._eof:
            chunk = self.sock.recv(self.RECV_SIZE)
            if not chunk:
                self._eof = True
                if self.codec.buffered:
                    raise ProxyConnectionError(
                        "GSSAPI: the proxy closed in the middle of a message"
                    )
                break
            self.codec.receive_data(chunk)
            self._decode()
        out = bytes(self._plain[:bufsize])
        del self._plain[:bufsize]
        return out

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def fileno(self) -> int:
        return self.sock.fileno()

    def getpeername(self) -> Any:
        return self.sock.getpeername()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def __enter__(self) -> GssapiSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
