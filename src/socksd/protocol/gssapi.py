"""RFC 1961, the GSS-API method of SOCKS5, without the mechanism and without I/O.

After the server selects method 0x01 the RFC runs in three phases:

1. Security context establishment (s. 3): the client sends MTYP=1 messages carrying the tokens of
   gss_init_sec_context; the server answers each one with an MTYP=1 message carrying the token of
   gss_accept_sec_context (a zero-length token when the context is complete and the mechanism has
   nothing more to say), or with the abort message ``01 FF`` when it refuses the client.
2. Protection-level sub-negotiation (s. 4): the client sends MTYP=2 whose token is
   gss_wrap(level octet, conf_req_flag FALSE); the server answers the same way with the level it
   agrees to, which may differ from the one asked for; a client that does not accept it closes.
3. Per-message protection (s. 5): everything after that, the SOCKS request and reply included,
   travels as MTYP=3 messages whose token is gss_wrap(data) with conf_req_flag FALSE at level 1,
   TRUE at level 2 and chosen per message by each sender at level 3.

:class:`GssapiServerNegotiation` and :class:`GssapiClientNegotiation` carry phases 1 and 2. They
never call the mechanism themselves: ``receive()`` hands back a :class:`MechanismStep` whose token
the caller passes to gss_accept_sec_context / gss_init_sec_context (the server does that on a
thread: it reads the keytab and the replay cache), and the caller reports the result with
``context_step()``. The MTYP=1 and MTYP=2 messages are parsed and sent by the ordinary
``ServerConnection`` / ``ClientConnection`` in their AUTH_GSSAPI state; the negotiations decide
which message may come when and what to answer.

:class:`GssapiEncapsulation` is phase 3: a codec given the security context's wrap and unwrap
functions (so it is tested without Kerberos). For a stream it turns bytes into MTYP=3 frames,
chunked so that each token fits the 16-bit length, and frames back into bytes, keeping at most one
partial frame; for UDP ASSOCIATE one datagram is one frame, both ways. A BIND relay is a stream.

How the request gets through: once the level is agreed the session calls
``conn.authentication_done(encapsulation)``. From then on the connection passes what it receives
through the codec before parsing and what it sends through the codec after building, so one
request/reply parser serves every method, and ``trailing_data()`` is plain bytes. The relay then
goes on with the same codec object, which still holds whatever part of a frame has arrived.

Every failure is a :class:`~socksd.protocol.errors.GssapiError`: the peer aborted, sent a message
type that is not allowed now, sent a token that fails verification (tampered, replayed, out of
sequence: the unwrap function raises GssapiError for those), or sent an unencrypted message at
level 2. A server answers it with the abort message and closes. A datagram is judged alone: a
failing one is dropped, and one that is only out of sequence (an earlier one lost, or overtaken:
RFC 2743's GSS_S_GAP_TOKEN and GSS_S_UNSEQ_TOKEN, supplementary status of a good message) is
delivered, since UDP loses and reorders; a replayed one is still refused.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import Enum, auto

from socksd.protocol.constants import GSSAPI_VERSION, GssapiMessageType, ProtectionLevel
from socksd.protocol.errors import GssapiError, GssapiOutOfSequence, LocalProtocolError
from socksd.protocol.messages import GssapiMessage

WrapFunction = Callable[[bytes, bool], bytes]
"""gss_wrap with the default QoP: ``(message, confidential) -> token``."""

UnwrapFunction = Callable[[bytes], tuple[bytes, bool]]
"""gss_unwrap: ``token -> (message, was_encrypted)``; raises GssapiError for a token that fails,
GssapiOutOfSequence for a good one after a gap or out of order (accepted only in a datagram)."""

MAX_TOKEN = 0xFFFF
"""The largest token an RFC 1961 message can carry (16-bit length)."""

FRAME_HEADER = 4
"""VER MTYP LEN(2) in front of every token."""

ABORT = bytes((GSSAPI_VERSION, GssapiMessageType.ABORT))
"""The abort message (RFC 1961 s. 3.8)."""

ALL_LEVELS = frozenset(ProtectionLevel)

_HEADER = struct.Struct("!BBH")
_ENCAPSULATION = int(GssapiMessageType.ENCAPSULATION)
_ABORT = int(GssapiMessageType.ABORT)

# Strongest first: what a server falls back to when the client asks for a level it does not accept.
_BY_STRENGTH = (
    ProtectionLevel.CONFIDENTIALITY,
    ProtectionLevel.SELECTIVE,
    ProtectionLevel.INTEGRITY,
)


def choose_level(requested: int, accepted: Collection[ProtectionLevel]) -> ProtectionLevel:
    """The level a server answers: the one requested if accepted, else the strongest accepted.

    Anything outside 1-3 (Dante's "clear" 0 included) is a level the server does not accept.
    """
    for level in accepted:
        if level == requested:
            return level
    for level in _BY_STRENGTH:
        if level in accepted:
            return level
    raise ValueError("no protection level is accepted")


def levels_at_least(level: ProtectionLevel) -> frozenset[ProtectionLevel]:
    """The levels protecting at least as much as ``level`` (1 < 3 < 2): what a client accepts."""
    rank = _BY_STRENGTH.index(level)
    return frozenset(_BY_STRENGTH[: rank + 1])


def parse_levels(text: str) -> tuple[ProtectionLevel, ...]:
    """``"1,2,3"`` -> the levels; ValueError naming what is wrong."""
    levels: list[ProtectionLevel] = []
    for raw in text.split(","):
        item = raw.strip()
        if item not in ("1", "2", "3"):
            raise ValueError(f"{item!r} is not a protection level (1, 2 or 3)")
        level = ProtectionLevel(int(item))
        if level not in levels:
            levels.append(level)
    return tuple(levels)


# -- phase 3: encapsulation ----------------------------------------------------------------------


class GssapiEncapsulation:
    """The MTYP=3 codec of one security context at one agreed protection level.

    Stream use: ``encode(data)`` returns the frames to write; ``receive_data(data)`` then ``read()``
    returns the plain bytes of every complete frame. Datagram use: ``encode_datagram`` /
    ``decode_datagram``. ``max_payload`` is the most plain bytes one token may carry (the
    mechanism's gss_wrap_size_limit for a 65535-byte token).
    """

    __slots__ = ("_buf", "_failed", "_unwrap", "_wrap", "confidential", "level", "max_payload")

    def __init__(
        self,
        level: ProtectionLevel,
        wrap: WrapFunction,
        unwrap: UnwrapFunction,
        max_payload: int = MAX_TOKEN - 128,
    ) -> None:
        if not 1 <= max_payload <= MAX_TOKEN:
            raise ValueError(f"max_payload must be 1-{MAX_TOKEN}, got {max_payload}")
        self.level = ProtectionLevel(level)
        self.max_payload = max_payload
        self.confidential = self.level != ProtectionLevel.INTEGRITY
        """Whether this side encrypts what it sends by default (level 3: socksd always does)."""
        self._wrap = wrap
        self._unwrap = unwrap
        self._buf = bytearray()
        self._failed: GssapiError | None = None

    def _conf(self, confidential: bool | None) -> bool:
        if confidential is None:
            return self.confidential
        if self.level != ProtectionLevel.SELECTIVE and confidential != self.confidential:
            raise LocalProtocolError(
                f"protection level {int(self.level)} fixes conf_req_flag to {self.confidential}"
            )
        return confidential

    def _token(self, data: bytes, conf: bool) -> bytes:
        token = self._wrap(data, conf)
        if len(token) > MAX_TOKEN:
            raise LocalProtocolError(
                f"gss_wrap made a {len(token)}-byte token of {len(data)} bytes; lower max_payload"
            )
        return _HEADER.pack(GSSAPI_VERSION, _ENCAPSULATION, len(token)) + token

    def encode(self, data: bytes, confidential: bool | None = None) -> bytes:
        """The MTYP=3 frames carrying ``data`` (one per ``max_payload`` bytes; none for b"")."""
        conf = self._conf(confidential)
        size = self.max_payload
        if len(data) <= size:
            return self._token(data, conf) if data else b""
        view = memoryview(data)
        return b"".join(
            self._token(bytes(view[i : i + size]), conf) for i in range(0, len(data), size)
        )

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the peer; ``read()`` decodes them."""
        self._buf += data

    @property
    def buffered(self) -> int:
        """Received bytes not decoded yet (at most one partial frame after ``read()``)."""
        return len(self._buf)

    def read(self) -> bytes:
        """The plain bytes of every complete frame received; raises GssapiError on a bad one.

        The plain bytes of good frames before a bad one are returned first; the error is raised
        by the next call, so nothing verified is lost.
        """
        if self._failed is not None:
            raise self._failed
        buf = self._buf
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        try:
            while n - pos >= 2:
                if buf[pos] != GSSAPI_VERSION:
                    raise GssapiError(
                        f"GSSAPI message version {buf[pos]:#04x}, expected {GSSAPI_VERSION:#04x}"
                    )
                if buf[pos + 1] != _ENCAPSULATION:
                    if buf[pos + 1] == _ABORT:
                        raise GssapiError("the peer aborted the GSSAPI session")
                    raise GssapiError(
                        f"GSSAPI message type {buf[pos + 1]:#04x} where encapsulated data "
                        "(0x03) is due"
                    )
                if n - pos < FRAME_HEADER:
                    break
                end = pos + FRAME_HEADER + ((buf[pos + 2] << 8) | buf[pos + 3])
                if end > n:
                    break
                # a fresh bytes object: some gss_unwrap implementations rotate the token in place
                out.append(self._unwrap_checked(bytes(buf[pos + FRAME_HEADER : end])))
                pos = end
        except GssapiError as e:
            self._failed = e  # the bad frame stays buffered: read() raises it again
            del buf[:pos]
            if not out:
                raise
            return b"".join(out)
        if pos:
            del buf[:pos]
        return out[0] if len(out) == 1 else b"".join(out)

    def _unwrap_checked(self, token: bytes, datagram: bool = False) -> bytes:
        try:
            data, encrypted = self._unwrap(token)
        except GssapiOutOfSequence as e:
            if not datagram:  # a stream neither loses nor reorders: someone meddled
                raise
            data, encrypted = e.message, e.encrypted  # UDP loses and reorders: a good datagram
        if not encrypted and self.level == ProtectionLevel.CONFIDENTIALITY:
            raise GssapiError("unencrypted message at protection level 2 (confidentiality)")
        return data

    def encode_datagram(self, payload: bytes, confidential: bool | None = None) -> bytes:
        """One UDP datagram: one MTYP=3 frame; ValueError when ``payload`` exceeds max_payload."""
        if len(payload) > self.max_payload:
            raise ValueError(
                f"a {len(payload)}-byte datagram does not fit one GSSAPI token "
                f"(at most {self.max_payload} bytes)"
            )
        return self._token(payload, self._conf(confidential))

    def decode_datagram(self, datagram: bytes) -> bytes:
        """The payload of one UDP datagram that is exactly one MTYP=3 frame; else GssapiError.

        A datagram after a lost one or overtaken by a later one is good (GssapiOutOfSequence from
        the unwrap function is accepted); a replayed one is not.
        """
        if len(datagram) < FRAME_HEADER:
            raise GssapiError(f"{len(datagram)}-byte datagram is shorter than a GSSAPI header")
        version, mtyp, length = _HEADER.unpack_from(datagram)
        if version != GSSAPI_VERSION or mtyp != _ENCAPSULATION:
            raise GssapiError(f"datagram is not an encapsulated GSSAPI message ({datagram[:2]!r})")
        if length != len(datagram) - FRAME_HEADER:
            raise GssapiError(
                f"datagram holds {len(datagram) - FRAME_HEADER} token bytes, header says {length}"
            )
        return self._unwrap_checked(bytes(datagram[FRAME_HEADER:]), datagram=True)


# -- phases 1 and 2: the sub-negotiation ----------------------------------------------------------


class NegotiationState(Enum):
    """Where an RFC 1961 sub-negotiation stands."""

    STEP = auto()  # the caller must run the mechanism, then call context_step()
    CONTEXT = auto()  # waiting for the peer's MTYP=1 message
    PROTECTION = auto()  # waiting for the peer's MTYP=2 message
    DONE = auto()  # the level is agreed: encapsulation() is ready
    FAILED = auto()


@dataclass(frozen=True, slots=True)
class MechanismStep:
    """Pass ``token`` (b"": none) to the mechanism, then report its output with context_step()."""

    token: bytes


@dataclass(frozen=True, slots=True)
class LevelAgreed:
    """The protection level is agreed; a server sends ``reply`` (a client has none to send)."""

    level: ProtectionLevel
    reply: GssapiMessage | None = None


class _Negotiation:
    """What both roles share: state, round-trip limit, level messages, the final codec."""

    def __init__(self, wrap: WrapFunction, unwrap: UnwrapFunction, max_round_trips: int) -> None:
        self.state = NegotiationState.CONTEXT
        self.level: ProtectionLevel | None = None
        self.round_trips = 0
        self._max_round_trips = max_round_trips
        self._wrap = wrap
        self._unwrap = unwrap

    def _fail(self, reason: str) -> GssapiError:
        self.state = NegotiationState.FAILED
        return GssapiError(reason)

    def _expect(self, message: GssapiMessage, mtyp: GssapiMessageType) -> None:
        if message.mtyp == GssapiMessageType.ABORT:
            raise self._fail("the peer aborted the GSSAPI negotiation")
        if message.mtyp != mtyp:
            raise self._fail(
                f"GSSAPI message type {int(message.mtyp):#04x} where {int(mtyp):#04x} is due"
            )

    def _count_round_trip(self) -> None:
        self.round_trips += 1
        if self.round_trips > self._max_round_trips:
            raise self._fail(
                f"security context not established after {self._max_round_trips} round trips"
            )

    def _level_message(self, level: int) -> GssapiMessage:
        return GssapiMessage(GssapiMessageType.PROTECTION, self._wrap(bytes((level,)), False))

    def _unwrap_level(self, token: bytes) -> int:
        try:
            data, _ = self._unwrap(token)
        except GssapiError as e:
            raise self._fail(f"protection-level message: {e}") from None
        if len(data) != 1:
            raise self._fail(f"protection-level message holds {len(data)} bytes, expected 1")
        return data[0]

    def abort(self) -> GssapiMessage:
        """The abort message to send before closing; the negotiation has failed."""
        self.state = NegotiationState.FAILED
        return GssapiMessage(GssapiMessageType.ABORT)

    def encapsulation(self, max_payload: int = MAX_TOKEN - 128) -> GssapiEncapsulation:
        """The codec of the agreed level (only once DONE)."""
        if self.state is not NegotiationState.DONE or self.level is None:
            raise LocalProtocolError(f"no protection level agreed (state {self.state.name})")
        return GssapiEncapsulation(self.level, self._wrap, self._unwrap, max_payload)


class GssapiServerNegotiation(_Negotiation):
    """The server's side of RFC 1961 s. 3-4.

    ``receive(message)`` for each GssapiMessage from the client: in context establishment it returns
    a MechanismStep (run gss_accept_sec_context on its token, then ``context_step()`` gives the
    MTYP=1 answer); for the protection-level message it returns LevelAgreed with the answer.
    """

    def __init__(
        self,
        wrap: WrapFunction,
        unwrap: UnwrapFunction,
        levels: Collection[ProtectionLevel] = ALL_LEVELS,
        *,
        max_round_trips: int = 8,
    ) -> None:
        super().__init__(wrap, unwrap, max_round_trips)
        if not levels:
            raise ValueError("at least one protection level must be accepted")
        self.levels = frozenset(ProtectionLevel(level) for level in levels)
        self.requested: int | None = None

    def receive(self, message: GssapiMessage) -> MechanismStep | LevelAgreed:
        """Take the client's next message (RemoteProtocolError: answer with ``abort()``)."""
        if self.state is NegotiationState.CONTEXT:
            self._expect(message, GssapiMessageType.AUTHENTICATION)
            self._count_round_trip()
            self.state = NegotiationState.STEP
            return MechanismStep(message.token)
        if self.state is NegotiationState.PROTECTION:
            self._expect(message, GssapiMessageType.PROTECTION)
            self.requested = self._unwrap_level(message.token)
            self.level = level = choose_level(self.requested, self.levels)
            self.state = NegotiationState.DONE
            return LevelAgreed(level, self._level_message(level))
        raise LocalProtocolError(f"no client message expected in state {self.state.name}")

    def context_step(
        self, output: bytes, complete: bool, *, confidentiality: bool = True
    ) -> GssapiMessage:
        """Report gss_accept_sec_context's result; returns the MTYP=1 message to send.

        A complete context is always answered (with a zero-length token when the mechanism gave
        none, RFC 1961 s. 3.5). ``confidentiality``: the context can encrypt; without it only
        level 1 remains, and a server that accepts no level 1 fails.
        """
        if self.state is not NegotiationState.STEP:
            raise LocalProtocolError(f"no mechanism step due (state {self.state.name})")
        if not complete and not output:
            raise self._fail("the mechanism wants another round trip but gave no token")
        if complete:
            if not confidentiality:
                self.levels = self.levels & {ProtectionLevel.INTEGRITY}
                if not self.levels:
                    raise self._fail(
                        "the security context cannot encrypt, and every accepted protection "
                        "level needs confidentiality"
                    )
            self.state = NegotiationState.PROTECTION
        else:
            self.state = NegotiationState.CONTEXT
        return GssapiMessage(GssapiMessageType.AUTHENTICATION, output)


class GssapiClientNegotiation(_Negotiation):
    """The client's side of RFC 1961 s. 3-4.

    It starts in STEP: run gss_init_sec_context with no token and report with ``context_step()``,
    which returns the message to send. ``receive(message)`` for each server message returns a
    MechanismStep (run the mechanism on its token), a GssapiMessage to send (the level request),
    or LevelAgreed. ``accepted``: the levels the client takes from the server (default: ``level``
    and the ones protecting more).
    """

    def __init__(
        self,
        wrap: WrapFunction,
        unwrap: UnwrapFunction,
        level: ProtectionLevel = ProtectionLevel.CONFIDENTIALITY,
        accepted: Collection[ProtectionLevel] | None = None,
        *,
        max_round_trips: int = 8,
    ) -> None:
        super().__init__(wrap, unwrap, max_round_trips)
        self.requested = ProtectionLevel(level)
        self.accepted = frozenset(accepted) if accepted is not None else levels_at_least(level)
        if self.requested not in self.accepted:
            raise ValueError(f"the requested level {int(level)} must be among the accepted ones")
        self.state = NegotiationState.STEP
        self._complete = False

    def context_step(self, output: bytes, complete: bool) -> GssapiMessage:
        """Report gss_init_sec_context's result; returns the message to send.

        That is the MTYP=1 token, or, when the context is complete and the mechanism has nothing
        more to send, the MTYP=2 level request.
        """
        if self.state is not NegotiationState.STEP:
            raise LocalProtocolError(f"no mechanism step due (state {self.state.name})")
        self._complete = complete
        if output:
            self.state = NegotiationState.CONTEXT  # the server answers every token
            return GssapiMessage(GssapiMessageType.AUTHENTICATION, output)
        if not complete:
            raise self._fail("the mechanism wants another round trip but gave no token")
        self.state = NegotiationState.PROTECTION
        return self._level_message(self.requested)

    def receive(self, message: GssapiMessage) -> MechanismStep | GssapiMessage | LevelAgreed:
        """Take the server's next message (GssapiError: close the connection)."""
        if self.state is NegotiationState.CONTEXT:
            self._expect(message, GssapiMessageType.AUTHENTICATION)
            if self._complete:
                if message.token:
                    raise self._fail("the proxy sent a context token after the context was done")
                self.state = NegotiationState.PROTECTION
                return self._level_message(self.requested)
            self._count_round_trip()
            self.state = NegotiationState.STEP
            return MechanismStep(message.token)
        if self.state is NegotiationState.PROTECTION:
            self._expect(message, GssapiMessageType.PROTECTION)
            chosen = self._unwrap_level(message.token)
            if chosen not in self.accepted:
                raise self._fail(
                    f"the proxy chose protection level {chosen}; accepted: "
                    + ", ".join(str(int(level)) for level in sorted(self.accepted))
                )
            self.level = ProtectionLevel(chosen)
            self.state = NegotiationState.DONE
            return LevelAgreed(self.level)
        raise LocalProtocolError(f"no server message expected in state {self.state.name}")


__all__ = [
    "ABORT",
    "ALL_LEVELS",
    "FRAME_HEADER",
    "MAX_TOKEN",
    "GssapiClientNegotiation",
    "GssapiEncapsulation",
    "GssapiServerNegotiation",
    "LevelAgreed",
    "MechanismStep",
    "NegotiationState",
    "UnwrapFunction",
    "WrapFunction",
    "choose_level",
    "levels_at_least",
    "parse_levels",
]
