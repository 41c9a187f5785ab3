"""Which relay a session gets: one factory for every command.

:func:`relay_terms` decides, once per session, what limits its data: the idle timeout (the
allow rule's ``idle_timeout``, else ``udp_idle_timeout`` for UDP ASSOCIATE and ``idle_timeout``
for the others), the user's bandwidth buckets (``[bandwidth]``), the write-buffer mark.
:func:`make_relay` builds the TCP relay of CONNECT and BIND from those terms and the session's
GSSAPI codec, if any: plain, throttled, encapsulating, or both; a plain session (no codec, no
buckets) gets the :class:`~socksd.server.dataplane.splice.SpliceRelay` where ``splice`` allows
(a copying relay that moves to ``os.splice`` once the session carries bulk data). A UDP association takes the same
terms (``socksd.server.commands.udp``). So no command can forget a limit another one applies.

Each kind of endpoint does one job (``RelayEndpoint`` copies, ``ThrottledEndpoint`` holds what
the bucket does not grant, ``UnwrappingEndpoint``/``WrappingEndpoint`` translate RFC 1961 frames);
the two combined classes below only stack them: unwrap, then throttle the plain bytes; throttle
the plain bytes, then wrap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from socksd.limits import TokenBucket
from socksd.protocol import Command, GssapiEncapsulation
from socksd.server.dataplane.bandwidth import ThrottledEndpoint
from socksd.server.dataplane.gssapi import GssapiRelay, UnwrappingEndpoint, WrappingEndpoint
from socksd.server.dataplane.relay import Relay, RelayOwner
from socksd.server.dataplane.splice import AVAILABLE as SPLICE_AVAILABLE
from socksd.server.dataplane.splice import SpliceRelay
from socksd.server.process.context import ServerContext


@dataclass(frozen=True, slots=True)
class RelayTerms:
    """What limits one session's data, whatever its command."""

    idle_timeout: float
    """Seconds without traffic before the session is closed; 0 never."""
    buckets: tuple[TokenBucket, TokenBucket] | None
    """The user's (client to target, target to client) buckets; None when unlimited."""
    high_water: int
    """Bytes buffered for a connection before the other side is paused."""
    splice: bool = False
    """A plain session may move to the zero-copy relay (``splice``)."""


def relay_terms(
    ctx: ServerContext, command: int, user: str | None, rule_idle_timeout: float | None
) -> RelayTerms:
    """The terms of a session of ``user`` whose request an allow rule with
    ``rule_idle_timeout`` (None: none) let through."""
    config = ctx.config
    if rule_idle_timeout is not None:
        idle = rule_idle_timeout
    elif command == Command.UDP_ASSOCIATE:
        idle = config.udp_idle_timeout
    else:
        idle = config.idle_timeout
    buckets = ctx.limits.buckets_for(user, time.monotonic()) if user is not None else None
    splice = config.splice == "on" or (config.splice == "auto" and SPLICE_AVAILABLE)
    return RelayTerms(idle, buckets, config.relay_buffer, splice)


class ThrottledUnwrappingEndpoint(UnwrappingEndpoint, ThrottledEndpoint):
    """A GSSAPI client's side with a bandwidth limit: frames in, plain bytes out as allowed."""

    __slots__ = ()


class ThrottledWrappingEndpoint(WrappingEndpoint, ThrottledEndpoint):
    """A target's side towards a GSSAPI client with a bandwidth limit: wrapped as allowed."""

    __slots__ = ()


def make_relay(
    owner: RelayOwner, terms: RelayTerms, codec: GssapiEncapsulation | None = None
) -> Relay:
    """The relay of a CONNECT or BIND session under ``terms``; ``codec`` after GSSAPI."""
    buckets = terms.buckets
    if codec is None:
        if buckets is None:
            if terms.splice:
                return SpliceRelay(
                    owner, high_water=terms.high_water, idle_timeout=terms.idle_timeout
                )
            return Relay(owner, high_water=terms.high_water, idle_timeout=terms.idle_timeout)
        return Relay(
            owner,
            high_water=terms.high_water,
            idle_timeout=terms.idle_timeout,
            endpoints=(ThrottledEndpoint(buckets[0]), ThrottledEndpoint(buckets[1])),
        )
    endpoints: tuple[UnwrappingEndpoint, WrappingEndpoint] | None = None
    if buckets is not None:
        endpoints = (ThrottledUnwrappingEndpoint(buckets[0]), ThrottledWrappingEndpoint(buckets[1]))
    return GssapiRelay(
        owner,
        codec,
        high_water=terms.high_water,
        idle_timeout=terms.idle_timeout,
        endpoints=endpoints,
    )
