"""Connections from a load balancer: who may send a PROXY protocol header, and what it means.

``proxy_protocol_from`` lists the balancers (:class:`TrustedProxies`). A connection from one of
them must start with a header (v1 or v2, ``socksd.protocol.proxy_header``); the session reads it
before anything else (bounded by the handshake timeout and the header's size cap), and from then
on the client is the header's source (:func:`client_of`): admission (rules, ``max_sessions_per_ip``,
the login throttle, ``protect_local``'s loopback exemption), the access log and what reads
``record.client`` all see the real client, and a UDP association expects its datagrams from
there. A connection from anywhere else is plain SOCKS: a header there is a protocol error (the
specification forbids guessing whether a header is present, or anyone could claim any address).

A header without an IP source (v2 LOCAL, sent by HAProxy's health checks; v1 ``UNKNOWN``; v2
family UNSPEC or UNIX) is the balancer's own connection: the client is the balancer's address,
and the SOCKS handshake goes on (a check may speak SOCKS after it).
"""

from __future__ import annotations

import ipaddress

from socksd.protocol.proxy_header import ProxyHeader
from socksd.rules import parse_ip


class TrustedProxies:
    """The networks of ``proxy_protocol_from``; empty: no connection carries a header."""

    __slots__ = ("_ranges",)

    def __init__(self, networks: tuple[str, ...] = ()) -> None:
        ranges: list[tuple[int, int, int]] = []
        for text in networks:
            network = ipaddress.ip_network(text, strict=False)
            ranges.append(
                (network.version, int(network.network_address), int(network.broadcast_address))
            )
        self._ranges = tuple(ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def trusts(self, host: str) -> bool:
        """True when a connection from ``host`` must start with a PROXY header."""
        if not self._ranges:
            return False
        ip = parse_ip(host)  # an IPv4-mapped IPv6 peer is matched as IPv4
        if ip is None:
            return False
        version, value = ip
        return any(v == version and start <= value <= end for v, start, end in self._ranges)


def client_of(header: ProxyHeader, peer: tuple[str, int]) -> tuple[str, int]:
    """The client of a connection from a balancer at ``peer``: the header's source, else the
    balancer itself. An IPv4-mapped IPv6 source (``::ffff:192.0.2.5``, from a balancer
    listening on ``[::]``) is the IPv4 address, as a direct client's would be."""
    if header.source is None:
        return peer
    host, port = header.source
    if host.startswith("::ffff:"):  # the form inet_ntop and ipaddress give a mapped address
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            host = str(mapped)
    return host, port
