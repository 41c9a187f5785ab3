"""The outgoing address: where connections and datagrams to targets leave from.

``bind_out`` (the server's) and a rule's ``via`` (for the sessions that rule allows, in place of
``bind_out``) are :class:`SourceAddresses`: at most one IPv4 and one IPv6 address of this host, as
Dante's ``external``. A target is reached from the address of its own family; a target of a
family with no address there is not tried from another address (that would leave from an address
the admin did not choose): :meth:`SourceAddresses.usable` raises :class:`NoSourceAddress`, an
``ENETUNREACH`` (reply 0x03) whose message names the setting. Without ``bind_out`` or ``via`` the
kernel picks the source address by its routes, as before.

Where they apply: CONNECT's connection to the target, the connection to an upstream proxy (so
``via`` on a rule with ``upstream`` is the address the upstream is reached from), BIND's
listening socket (the peer is a host of the targets' side), and the sockets a UDP association
sends to targets from (the socket facing the client stays on the address the client came in on).

Parsing is pure (:func:`parse_source_addresses`, used by the config and the rules). Whether an
address is this host's is asked of the kernel with a bind on port 0 (:func:`bind_error`), the
same probe BIND and UDP ASSOCIATE use for ``advertise``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

AddrInfo = tuple[Any, ...]
"""A ``getaddrinfo`` entry: (family, type, proto, canonname, sockaddr)."""


class NoSourceAddress(OSError):
    """A target's address family has no outgoing address (``bind_out``/``via``): 0x03."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENETUNREACH, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class SourceAddresses:
    """At most one IPv4 and one IPv6 address to send from; ``where`` names the setting."""

    v4: str | None = None
    v6: str | None = None
    where: str = field(default="bind_out", compare=False)
    addr_infos: tuple[AddrInfo, ...] = field(init=False, compare=False, repr=False)
    """Local ``getaddrinfo`` entries (TCP, port 0) for ``aiohappyeyeballs.start_connection``."""

    def __post_init__(self) -> None:
        infos: list[AddrInfo] = []
        if self.v4 is not None:
            infos.append((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (self.v4, 0)))
        if self.v6 is not None:
            infos.append(
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (self.v6, 0, 0, 0))
            )
        object.__setattr__(self, "addr_infos", tuple(infos))

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses, IPv4 first."""
        return tuple(a for a in (self.v4, self.v6) if a is not None)

    def for_family(self, family: int) -> str | None:
        """The address of ``family`` (``AF_INET``/``AF_INET6``), if there is one."""
        return self.v6 if family == socket.AF_INET6 else self.v4

    def for_ip(self, ip: str, *, any_family: bool = False) -> str:
        """The address to reach ``ip`` from; NoSourceAddress when its family has none (with
        ``any_family``: the other family's address then)."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        address = self.for_family(family)
        if address is None:
            if any_family:
                return self.addresses[0]
            raise self.unreachable(family, ip)
        return address

    def usable(self, infos: Sequence[AddrInfo]) -> list[AddrInfo]:
        """The entries of ``infos`` of a family with an address here; NoSourceAddress when none
        is (the first one's family named)."""
        kept = [info for info in infos if self.for_family(info[0]) is not None]
        if not kept and infos:
            raise self.unreachable(infos[0][0], str(infos[0][4][0]))
        return kept

    def unreachable(self, family: int, ip: str) -> NoSourceAddress:
        """The error for a target ``ip`` of ``family``, which has no address here."""
        name = "IPv6" if family == socket.AF_INET6 else "IPv4"
        return NoSourceAddress(
            f"{ip} is {name} and {self.where} has no {name} address ({self} only)"
        )

    def __str__(self) -> str:
        return ", ".join(self.addresses)


def parse_source_addresses(value: Any, where: str) -> SourceAddresses | None:
    """An address or a list of at most one IPv4 and one IPv6 address; None for ``""`` or an
    empty list. ValueError, naming ``where``, otherwise."""
    items = [value] if isinstance(value, str) else value
    hint = (
        f"{where}: expected this host's IP addresses, at most one of each family, "
        'e.g. ["192.0.2.1", "2001:db8::1"]'
    )
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ValueError(hint)
    found: dict[int, str] = {}
    for item in items:
        text = item.strip()
        if not text:
            continue
        if "%" in text:
            raise ValueError(
                f"{where}: {item!r}: scope ids are not supported; give a global address"
            )
        try:
            ip = ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            raise ValueError(f"{hint}, got {item!r} (no names, no port)") from None
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(
                f"{where}: {item!r} is not an address to send from; give a unicast address "
                "of this host"
            )
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            raise ValueError(f"{where}: {item!r} is an IPv4-mapped address; write {ip.ipv4_mapped}")
        if ip.version in found:
            raise ValueError(
                f"{where}: {found[ip.version]} and {ip} are both IPv{ip.version}; give at most "
                "one address of each family (a target is reached from the one of its family)"
            )
        found[ip.version] = str(ip)
    if not found:
        return None
    return SourceAddresses(found.get(4), found.get(6), where)


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2+


def unbound_port_socket(info: AddrInfo) -> socket.socket:
    """A TCP socket for ``info`` whose bind to a source address takes no port until it connects
    (``IP_BIND_ADDRESS_NO_PORT``): without it, each bind on port 0 claims a port of its own
    among all the source address's connections (a search the kernel does on every bind), and
    the ephemeral range (28,000 ports, TIME_WAIT included) is spent at 28,000 connections in a
    minute whatever the targets; with it, the port is chosen at connect, per target, as without
    a source address. Where the option is missing the socket binds as usual."""
    sock = socket.socket(info[0], info[1], info[2])
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    return sock


def bind_error(ip: str) -> OSError | None:
    """Why this host cannot send from ``ip`` (a bind on port 0 fails), or None when it can.

    Asked of the kernel each time, so an address added or removed later counts at once."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError as e:
        return e
    return None


def check_own(addresses: SourceAddresses | None) -> None:
    """ValueError, naming the setting, when an address is not this host's."""
    if addresses is None:
        return
    for ip in addresses.addresses:
        error = bind_error(ip)
        if error is not None:
            raise ValueError(
                f"{addresses.where}: {ip} is not an address of this host "
                f"({error.strerror or error}); give one `ip address` lists"
            )
