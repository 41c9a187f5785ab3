"""Matching: the compiled fields of a rule and how one request is tested against them. No I/O.

A :class:`Rule` has an action (allow or deny) and any of: client networks, users (names and
``@group``\\ s), commands, destinations (``to``: networks and domain patterns) and destination
ports. A field a rule leaves out (None) matches anything; a rule matches when every field it has
matches. Which rules are tried, in which order and with which destination, is for
``socksd.rules.evaluate``.

Addresses are :data:`IP` pairs (version, integer), IPv4-mapped IPv6 addresses counting as IPv4
since they reach IPv4. Networks and port ranges are compiled when the rules are loaded into sorted,
merged ranges, so ``ip in networks`` and ``port in ports`` are one bisect each. Domain patterns
(:class:`DomainSet`): ``example.org`` is that name only; ``*.example.org`` is any name below it but
not ``example.org`` itself; ``.example.org`` is the name and any name below it. Names compare
without case and without a trailing dot (:func:`normalize_name`), one set look-up per label.

A rule carries the :class:`Decision` it makes, built once, so a checkpoint that finds a matching
rule returns it without allocating.
"""

from __future__ import annotations

import enum
import ipaddress
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_pton

from socksd.outgoing import SourceAddresses
from socksd.protocol import Command

IP = tuple[int, int]
"""An address as (version, integer): IPv4-mapped IPv6 addresses are IPv4 (they reach IPv4)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(enum.Enum):
    """What a rule does with a matching session."""

    ALLOW = "allow"
    DENY = "deny"


def parse_ip(text: str) -> IP | None:
    """The :data:`IP` of an address literal (a scope id is ignored), or None for anything else."""
    try:
        return 4, int.from_bytes(inet_pton(AF_INET, text), "big")
    except OSError:
        pass
    text = text.partition("%")[0]
    try:
        value = int.from_bytes(inet_pton(AF_INET6, text), "big")
    except OSError:
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def normalize_name(name: str) -> str:
    """The form names are compared in: lower case, without one trailing dot."""
    return name.lower().removesuffix(".")


def _range_of(network: Network) -> IP | tuple[int, int, int]:
    start = int(network.network_address)
    end = int(network.broadcast_address)
    if network.version == 6 and start >> 32 == 0xFFFF and end >> 32 == 0xFFFF:
        return 4, start & 0xFFFFFFFF, end & 0xFFFFFFFF
    return network.version, start, end


def _merge(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Sorted, non-overlapping ranges as (starts, ends), ready for bisect."""
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(ranges):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return tuple(starts), tuple(ends)


class NetworkSet:
    """A set of IPv4 and IPv6 networks; ``ip in networks`` is a bisect over merged ranges."""

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for network in self.networks:
            version, start, end = _range_of(network)  # type: ignore[misc]
            (v4 if version == 4 else v6).append((start, end))
        self._v4 = _merge(v4)
        self._v6 = _merge(v6)

    def __contains__(self, ip: IP) -> bool:
        starts, ends = self._v4 if ip[0] == 4 else self._v6
        i = bisect_right(starts, ip[1]) - 1
        return i >= 0 and ip[1] <= ends[i]

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetworkSet) and (self._v4, self._v6) == (other._v4, other._v6)

    def __hash__(self) -> int:
        return hash((self._v4, self._v6))

    def __repr__(self) -> str:
        return f"NetworkSet({[str(n) for n in self.networks]})"


class PortSet:
    """Port ranges; ``port in ports`` is a bisect over merged ranges."""

    __slots__ = ("_ends", "_starts", "ranges")

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self.ranges = tuple(ranges)
        self._starts, self._ends = _merge(self.ranges)

    def __contains__(self, port: int) -> bool:
        i = bisect_right(self._starts, port) - 1
        return i >= 0 and port <= self._ends[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PortSet) and (self._starts, self._ends) == (
            other._starts,
            other._ends,
        )

    def __hash__(self) -> int:
        return hash((self._starts, self._ends))

    def __repr__(self) -> str:
        return f"PortSet({list(self.ranges)})"


@dataclass(frozen=True, slots=True)
class DomainSet:
    """Domain patterns: exact names and the parents whose subdomains match."""

    exact: frozenset[str] = frozenset()
    parents: frozenset[str] = frozenset()

    def matches(self, name: str) -> bool:
        """True when the normalized ``name`` matches a pattern (one set look-up per label)."""
        if name in self.exact:
            return True
        parents = self.parents
        if not parents:
            return False
        dot = name.find(".")
        while dot != -1:
            if name[dot + 1 :] in parents:
                return True
            dot = name.find(".", dot + 1)
        return False


DIRECT = "direct"
"""The ``upstream`` of a rule that connects directly, whatever the global ``upstream`` says."""

NO_GROUPS: frozenset[str] = frozenset()
"""A user in no directory group (a user from a file, or no user)."""

DIRECTORY_GROUP_PREFIXES = ("ldap:",)
"""``@ldap:NAME`` in ``users`` names a group of the user directory (``socksd.auth.ldap``),
matched against the groups a login brought, not expanded from ``[groups]``."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a checkpoint: allowed or not, and which rule said so."""

    allowed: bool
    label: str
    """``rule N`` (1-based, in file order), ``default`` or ``protect_local``; empty at an
    accept checkpoint that leaves the decision to the request."""
    rule: Rule | None = None

    @property
    def idle_timeout(self) -> float | None:
        """The matched rule's ``idle_timeout``, if it has one."""
        return self.rule.idle_timeout if self.rule is not None else None

    @property
    def via(self) -> SourceAddresses | None:
        """The matched rule's ``via`` (its outgoing addresses), if it has one."""
        return self.rule.via if self.rule is not None else None


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule; a field that is None matches anything."""

    number: int
    action: Action
    clients: NetworkSet | None = None
    users: frozenset[str] | None = None
    user_groups: frozenset[str] | None = None
    """Directory groups (``ldap:NAME``, written ``@ldap:NAME``) whose members match too; with
    them ``users`` holds the names listed besides (maybe none)."""
    commands: frozenset[Command] | None = None
    to_networks: NetworkSet | None = None
    to_domains: DomainSet | None = None
    ports: PortSet | None = None
    idle_timeout: float | None = None
    upstream: str | None = None
    """The ``[upstreams]`` name the requests it allows go through, ``"direct"``, or None: the
    global ``upstream`` (``RuleSet.route``)."""
    socks4: bool = False
    """``socks4 = true``: SOCKS4 requests from ``clients`` are let in although the server
    requires a login (``RuleSet.socks4_rule``)."""
    via: SourceAddresses | None = None
    """The addresses the requests it allows go out from, in place of ``bind_out``."""
    spec: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """The fields as written (``users`` with groups unexpanded), for printing."""
    decision: Decision = field(init=False, compare=False, repr=False)
    has_to: bool = field(init=False, compare=False, repr=False)
    deny: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        decision = Decision(self.action is Action.ALLOW, f"rule {self.number}", self)
        object.__setattr__(self, "decision", decision)
        has_to = self.to_networks is not None or self.to_domains is not None
        object.__setattr__(self, "has_to", has_to)
        object.__setattr__(self, "deny", self.action is Action.DENY)

    @property
    def client_only(self) -> bool:
        """True when the client's address alone decides whether the rule matches."""
        return (
            self.users is None and self.commands is None and not self.has_to and self.ports is None
        )

    def matches_request(
        self, user: str | None, command: int, port: int | None, groups: frozenset[str] = NO_GROUPS
    ) -> bool:
        """The user, command and port fields (the client's and the destination's are apart);
        ``port`` None (no destination yet) matches any ``ports``; ``groups`` are the user's
        directory groups."""
        return (
            (
                self.users is None
                or (
                    user is not None
                    and (
                        user in self.users
                        or (
                            self.user_groups is not None and not self.user_groups.isdisjoint(groups)
                        )
                    )
                )
            )
            and (self.commands is None or command in self.commands)
            and (self.ports is None or port is None or port in self.ports)
        )

    def describe(self) -> str:
        """One line: ``rule N: allow clients=... to=...``."""
        parts = [f"rule {self.number}: {self.action.value}"]
        parts += [f"{key}={','.join(values)}" for key, values in self.spec]
        if self.idle_timeout is not None:
            parts.append(f"idle_timeout={self.idle_timeout:g}")
        return " ".join(parts)
