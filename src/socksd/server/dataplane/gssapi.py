"""The relay of a GSSAPI session: RFC 1961 encapsulation on the client's side, plain on the other.

A :class:`GssapiRelay` is a :class:`~socksd.server.dataplane.relay.Relay` whose two endpoints translate:
:class:`UnwrappingEndpoint` (the client's connection) feeds what it reads to the session's
:class:`~socksd.protocol.gssapi.GssapiEncapsulation` and writes the verified plain bytes to the
target; :class:`WrappingEndpoint` (the target's connection, or a BIND's incoming one) wraps what it
reads into MTYP=3 frames of at most the codec's ``max_payload`` plain bytes each (the 65535-byte
token limit minus the mechanism's overhead) and writes them to the client. Everything else is the
plain relay's: half-close (EOF becomes shutdown(SHUT_WR) on the other side; no RFC 1961 message
marks it), backpressure (a full write buffer pauses the other side's reading), closing a transport
once both its directions are done. The plain relay's endpoints are untouched, so its hot path
costs nothing more.

Byte counters are plain bytes: ``up`` what reached the target, ``down`` what the target sent.

A frame that fails verification (tampered, replayed, out of sequence, unencrypted at level 2) or an
abort from the client ends the session: the plain bytes verified before it are still delivered,
the client gets the abort message ``01 FF``, both connections are closed and the reason goes to
the log and the access-log line.
"""

from __future__ import annotations

import logging

from socksd.protocol import GssapiEncapsulation, GssapiError
from socksd.protocol.gssapi import ABORT
from socksd.server.dataplane.relay import Relay, RelayEndpoint, RelayOwner

log = logging.getLogger("socksd.gssapi")


class UnwrappingEndpoint(RelayEndpoint):
    """The client's side: RFC 1961 frames in, verified plain bytes out to the peer."""

    __slots__ = ()

    relay: GssapiRelay

    def data_received(self, data: bytes) -> None:
        codec = self.relay.codec
        codec.receive_data(data)
        self.decode()

    def decode(self) -> None:
        """Pass the plain bytes of every complete frame received to the peer."""
        try:
            plain = self.relay.codec.read()
        except GssapiError as e:
            self.relay.fail(str(e))
            return
        if plain:
            self.received += len(plain)
            self.forward(plain)

    def eof_received(self) -> bool:
        if self.relay.codec.buffered:
            self.relay.note_error("client closed in the middle of a GSSAPI message")
        return super().eof_received()


class WrappingEndpoint(RelayEndpoint):
    """The target's side: plain bytes in, RFC 1961 frames out to the client."""

    __slots__ = ()

    relay: GssapiRelay

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.forward(data)

    def emit(self, data: bytes) -> None:
        try:
            frames = self.relay.codec.encode(data)
        except GssapiError as e:
            self.relay.fail(str(e))
            return
        self.peer.transport.write(frames)  # type: ignore[union-attr]


class GssapiRelay(Relay):
    """A relay whose client connection carries RFC 1961 encapsulated data."""

    __slots__ = ("codec",)

    client: UnwrappingEndpoint
    target: WrappingEndpoint

    def __init__(
        self,
        owner: RelayOwner,
        codec: GssapiEncapsulation,
        *,
        high_water: int = 256 * 1024,
        idle_timeout: float = 0.0,
        endpoints: tuple[UnwrappingEndpoint, WrappingEndpoint] | None = None,
    ) -> None:
        self.codec = codec
        super().__init__(
            owner,
            high_water=high_water,
            idle_timeout=idle_timeout,
            endpoints=endpoints or (UnwrappingEndpoint(), WrappingEndpoint()),
        )

    def _client_first(self, first_data: bytes, client_eof: bool) -> None:
        """``first_data`` is plain (already unwrapped by the session); frames the session
        received but did not decode are still in the codec: decoded here."""
        client = self.client
        client.transport.resume_reading()  # type: ignore[union-attr]
        if first_data:
            client.received += len(first_data)
            client.forward(first_data)
        if self.codec.buffered:
            client.decode()
        if client_eof and not client.lost and not client.read_done:
            client.eof_received()

    def note_error(self, error: str) -> None:
        """Record why the session ended badly, for the access log (first reason wins)."""
        if self._error is None:
            self._error = error

    def fail(self, error: str) -> None:
        """A GSSAPI failure: abort message to the client, then close both connections."""
        if self._done:
            return
        log.warning("GSSAPI session ended: %s", error)
        self.note_error(f"GSSAPI: {error}")
        client = self.client
        if client.transport is not None and not client.lost and not client.write_done:
            client.transport.write(ABORT)
        self.close()
