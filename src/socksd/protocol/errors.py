"""Exceptions of the protocol core.

``RemoteProtocolError``: the peer sent something the protocol does not allow. It carries the reply
code that a server should answer with (``None`` when the RFC has no answer and the connection is
simply closed); its subclass ``GssapiError`` is an RFC 1961 failure, answered with the abort
message (``GssapiOutOfSequence``: one that is only a failure on a stream). ``LocalProtocolError``: this side misused the API (sent a message out of order).
"""

from socksd.protocol.constants import ReplyCode


class ProtocolError(Exception):
    """Base class of protocol violations."""


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; ``reply`` is the REP code to answer with, if any."""

    def __init__(self, message: str, reply: ReplyCode | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class GssapiError(RemoteProtocolError):
    """An RFC 1961 failure: the peer aborted, or a token failed the GSS-API checks.

    It is answered with the RFC 1961 abort message (``01 FF``), never with a SOCKS reply.
    """


class GssapiOutOfSequence(GssapiError):
    """A token that passed every check but came after a gap or out of order (RFC 2743 s. 1.2.3).

    An error on a stream, where nothing is lost or reordered unless someone meddles; over UDP the
    datagram is good, and ``message`` / ``encrypted`` are what gss_unwrap gave for it.
    """

    def __init__(self, reason: str, message: bytes, encrypted: bool) -> None:
        super().__init__(reason)
        self.message = message
        self.encrypted = encrypted


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol state does not allow."""
