"""Access rules: an ordered list, first match wins, then a default action. Pure code, no I/O.

A :class:`Rule` has an action (allow or deny) and any of: client networks, users (names and
``@group``\\ s), commands, destinations (``to``: networks and domain patterns) and destination
ports. A field a rule leaves out matches anything; a rule matches when every field it has matches.

Two checkpoints, as Dante has:

- at accept (:meth:`RuleSet.check_client`), knowing only the client's address: the client is
  refused when every request it could make would be denied (a rule that names only ``clients``
  decides; an ``allow`` rule with more fields might still match later, so the client is accepted);
- at request (:meth:`RuleSet.check_request`), knowing everything the client asked for.

Domain names cannot be trusted to say where a connection goes, so a request for a name is
matched by its name *and* by the addresses it resolves to. :meth:`RuleSet.check_request` decides
at once when no address could change the outcome (a deny rule that matches by name, or a rule
with no ``to``), and otherwise answers :class:`NeedAddresses`; each resolved address then goes
through :meth:`RuleSet.check_address`, which matches ``to`` by the name (domain patterns) or by the
address (networks). A request for an address is matched by the address only: domain patterns
never match an IP literal.

Local destinations (``protect_local``, on by default): for clients outside loopback, loopback,
link-local and unspecified addresses and the server host's own addresses (given by the server,
see :meth:`RuleSet.with_host_addresses`) are allowed only by an ``allow`` rule whose ``to`` lists
a network holding the address. Other allow rules (no ``to``, or a ``to`` that matched by name)
and a default of allow pass over such an address, and the request ends denied by
``protect_local`` if no later rule allows it. A rule without ``to`` therefore never opens the
proxy host to other machines by accident, and no DNS answer can point an allowed name at it.

Domain patterns: ``example.org`` is that name only; ``*.example.org`` is any name below it but not
``example.org`` itself; ``.example.org`` is the name and any name below it. Names compare without
case and without a trailing dot.

Matching costs a few set and bisect look-ups per rule: networks, ports and names are compiled
into sorted ranges and sets when the rules are loaded. The rules that can apply to a client
address (its ``clients`` match, or the rule has none) are remembered per address, so the
checkpoints of a session walk only those. A config without rules decides in a few attribute
checks.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6, inet_pton
from typing import Any

from socksd.protocol import Command

IP = tuple[int, int]
"""An address as (version, integer): IPv4-mapped IPv6 addresses are IPv4 (they reach IPv4)."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_MAPPED = 0xFFFF << 32
_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")

COMMAND_NAMES: dict[str, Command] = {
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp": Command.UDP_ASSOCIATE,
}
_COMMAND_TEXT = {command: name for name, command in COMMAND_NAMES.items()}

LOCAL_NETWORKS = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::/128",
    "::1/128",
    "fe80::/10",
)
"""Destinations ``protect_local`` guards besides the host's own addresses."""

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
"""Clients in these networks are on the proxy host itself: ``protect_local`` does not apply."""

CLIENT_CACHE_SIZE = 4096
"""Client addresses whose applicable rules are remembered (the table is emptied when full)."""

RULE_KEYS = ("action", "clients", "users", "commands", "to", "ports", "idle_timeout")


class RuleError(ValueError):
    """A rule, group or rule setting is wrong; the message names it and how to fix it."""


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


@dataclass(frozen=True, slots=True)
class NeedAddresses:
    """The request names a domain whose addresses can change the outcome: resolve it, then call
    :meth:`RuleSet.check_address` for each address. ``start`` is where evaluation resumes (the
    rules before it cannot match whatever the address is)."""

    start: int


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule; a field that is None matches anything."""

    number: int
    action: Action
    clients: NetworkSet | None = None
    users: frozenset[str] | None = None
    commands: frozenset[Command] | None = None
    to_networks: NetworkSet | None = None
    to_domains: DomainSet | None = None
    ports: PortSet | None = None
    idle_timeout: float | None = None
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

    def matches_request(self, user: str | None, command: int, port: int) -> bool:
        """The user, command and port fields (the client's and the destination's are apart)."""
        return (
            (self.users is None or (user is not None and user in self.users))
            and (self.commands is None or command in self.commands)
            and (self.ports is None or port in self.ports)
        )

    def describe(self) -> str:
        """One line: ``rule N: allow clients=... to=...``."""
        parts = [f"rule {self.number}: {self.action.value}"]
        parts += [f"{key}={','.join(values)}" for key, values in self.spec]
        if self.idle_timeout is not None:
            parts.append(f"idle_timeout={self.idle_timeout:g}")
        return " ".join(parts)


def _covered(network: Network, by: Sequence[Network]) -> bool:
    return any(
        network.version == other.version and network.subnet_of(other)  # type: ignore[arg-type]
        for other in by
    )


_LOOPBACK = NetworkSet(ipaddress.ip_network(n) for n in LOOPBACK_NETWORKS)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules in order, the default action, and the ``protect_local`` guard."""

    rules: tuple[Rule, ...] = ()
    default: Action = Action.ALLOW
    protect_local: bool = True
    host_addresses: tuple[Network, ...] = ()
    """The server host's own addresses (networks), guarded by ``protect_local``."""
    protected: NetworkSet = field(init=False, compare=False, repr=False)
    accept_all: bool = field(init=False, compare=False, repr=False)
    """No client can be refused at accept."""
    allow_all: bool = field(init=False, compare=False, repr=False)
    """Every request is allowed: nothing to check."""
    _default: Decision = field(init=False, compare=False, repr=False)
    _guard: Decision = field(init=False, compare=False, repr=False)
    _by_client: dict[IP, tuple[Rule, ...]] | None = field(init=False, compare=False, repr=False)
    """The rules whose ``clients`` hold a client address, per address (None: no rule has
    ``clients``, every rule applies to every client)."""

    def __post_init__(self) -> None:
        nets: list[Network] = [ipaddress.ip_network(n) for n in LOCAL_NETWORKS]
        nets += [h for h in self.host_addresses if not _covered(h, nets)]
        allow_default = self.default is Action.ALLOW
        fields = {
            "protected": NetworkSet(nets),
            "accept_all": allow_default
            and not any(r.client_only and r.action is Action.DENY for r in self.rules),
            "allow_all": allow_default and not self.rules and not self.protect_local,
            "_default": Decision(allow_default, "default"),
            "_guard": Decision(False, "protect_local"),
            "_by_client": {} if any(r.clients is not None for r in self.rules) else None,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def with_host_addresses(self, networks: Iterable[Network]) -> RuleSet:
        """This rule set guarding ``networks`` (the host's addresses) too."""
        return dataclasses.replace(self, host_addresses=tuple(networks))

    # -- checkpoints --------------------------------------------------------------------------

    def rules_for(self, client: IP) -> tuple[Rule, ...]:
        """The rules that can apply to ``client`` (in order): those whose ``clients`` hold it or
        that have no ``clients``. Remembered for the last ``CLIENT_CACHE_SIZE`` addresses, so a
        session's checkpoints walk only these rules and never test ``clients`` again."""
        cache = self._by_client
        if cache is None:
            return self.rules
        rules = cache.get(client)
        if rules is None:
            rules = tuple(r for r in self.rules if r.clients is None or client in r.clients)
            if len(cache) >= CLIENT_CACHE_SIZE:
                cache.clear()
            cache[client] = rules
        return rules

    def check_client(self, client: IP) -> Decision:
        """Accept checkpoint: refuse only a client all of whose requests would be denied."""
        if self.accept_all:
            return _ACCEPTED
        for rule in self.rules_for(client):
            if rule.client_only:
                return rule.decision
            if not rule.deny:
                return _ACCEPTED
        return self._default

    def check_request(
        self, client: IP, user: str | None, command: int, host: str, port: int
    ) -> Decision | NeedAddresses:
        """Request checkpoint for ``host`` (an IP literal or a domain name) and ``port``."""
        if self.allow_all:
            return self._default
        ip = parse_ip(host)
        if ip is not None:
            return self._decide(client, user, command, port, name=None, ip=ip, start=0)
        name = normalize_name(host)
        guard = self.protect_local and client not in _LOOPBACK
        rules = self.rules_for(client)
        for i, rule in enumerate(rules):
            if not rule.matches_request(user, command, port):
                continue
            if rule.has_to and not (rule.to_domains is not None and rule.to_domains.matches(name)):
                if rule.to_networks is not None:
                    return NeedAddresses(i)
                continue
            if rule.deny:
                return rule.decision
            return NeedAddresses(i) if guard else rule.decision
        if guard and self.default is Action.ALLOW:
            return NeedAddresses(len(rules))
        return self._default

    def check_address(
        self,
        client: IP,
        user: str | None,
        command: int,
        *,
        name: str,
        address: str,
        port: int,
        start: int = 0,
    ) -> Decision:
        """Request checkpoint for one address that the domain ``name`` resolved to."""
        ip = parse_ip(address)
        if ip is None:
            raise ValueError(f"not an IP address: {address!r}")
        return self._decide(
            client, user, command, port, name=normalize_name(name), ip=ip, start=start
        )

    def _decide(
        self,
        client: IP,
        user: str | None,
        command: int,
        port: int,
        *,
        name: str | None,
        ip: IP,
        start: int,
    ) -> Decision:
        guard = self.protect_local and ip in self.protected and client not in _LOOPBACK
        passed_over = False
        rules = self.rules_for(client)
        for i in range(start, len(rules)):
            rule = rules[i]
            if not rule.matches_request(user, command, port):
                continue
            by_network = False
            if rule.has_to:
                by_network = rule.to_networks is not None and ip in rule.to_networks
                if not by_network and not (
                    name is not None
                    and rule.to_domains is not None
                    and rule.to_domains.matches(name)
                ):
                    continue
            if rule.deny:
                return rule.decision
            if guard and not by_network:
                passed_over = True  # only an allow listing the address opens a local one
                continue
            return rule.decision
        if guard and (passed_over or self.default is Action.ALLOW):
            return self._guard
        return self._default

    # -- description --------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """The effective rules, one line each, in the order they apply."""
        lines = [rule.describe() for rule in self.rules]
        if self.protect_local:
            guarded = ", ".join(str(n) for n in self.protected.networks)
            loopback = ", ".join(LOOPBACK_NETWORKS)
            lines.append(
                f"protect_local: for clients outside {loopback}, deny {guarded} unless an "
                "allow rule lists the address in `to` (as a network)"
            )
        lines.append(f"default: {self.default.value}")
        return lines


_ACCEPTED = Decision(True, "")


# -- parsing -----------------------------------------------------------------------------------


def parse_groups(raw: Any) -> dict[str, tuple[str, ...]]:
    """``[groups]``: ``name = ["user", ...]``."""
    if not isinstance(raw, Mapping):
        raise RuleError('groups: expected a table of name = ["user", ...]')
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in raw.items():
        if not isinstance(name, str) or not _GROUP_NAME.fullmatch(name):
            raise RuleError(f"groups: {name!r} is not a group name (letters, digits, _ . -)")
        items = [members] if isinstance(members, str) else members
        if not isinstance(items, list | tuple) or not all(isinstance(m, str) and m for m in items):
            raise RuleError(f'groups.{name}: expected a list of user names, e.g. ["alice"]')
        groups[name] = tuple(items)
    return groups


def expand_users(
    names: Iterable[str], groups: Mapping[str, Sequence[str]], where: str
) -> frozenset[str]:
    """User names with each ``@group`` replaced by its members."""
    users: set[str] = set()
    for name in names:
        if name.startswith("@"):
            members = groups.get(name[1:])
            if members is None:
                known = ", ".join(f"@{g}" for g in groups) or "none"
                raise RuleError(f"{where}: {name!r} is not a group in [groups] (known: {known})")
            users.update(members)
        else:
            users.add(name)
    return frozenset(users)


def parse_action(value: Any, where: str) -> Action:
    """``"allow"`` or ``"deny"``."""
    if isinstance(value, str):
        try:
            return Action(value.lower())
        except ValueError:
            pass
    raise RuleError(f'{where}: expected "allow" or "deny", got {value!r}')


def parse_network(text: str, where: str) -> Network:
    """A CIDR or a single address (a /32 or /128); host bits must be zero."""
    if "%" in text:
        raise RuleError(f"{where}: {text!r}: scope ids are not supported in networks")
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RuleError(f"{where}: {text!r} is not an address or network (CIDR)") from None
    raise RuleError(f"{where}: {text!r} has host bits set; write {loose}")


def parse_domain(text: str, where: str) -> tuple[str, bool, bool]:
    """A domain pattern: (name, matches the name itself, matches names below it)."""
    pattern = normalize_name(text)
    if pattern.startswith("*."):
        name, exact, below = pattern[2:], False, True
    elif pattern.startswith("."):
        name, exact, below = pattern[1:], True, True
    else:
        name, exact, below = pattern, True, False
    if pattern == "*":
        raise RuleError(f"{where}: leave `to` out to match any destination, instead of '*'")
    if name.replace(".", "").isdigit():
        raise RuleError(f"{where}: {text!r} is neither an IP address nor a domain name")
    if not name.isascii() or not _DOMAIN.fullmatch(name):
        raise RuleError(
            f"{where}: {text!r} is not an address, network or domain pattern "
            "(example.org, *.example.org, .example.org; IDN names in punycode, xn--...)"
        )
    return name, exact, below


def parse_port_range(value: Any, where: str) -> tuple[int, int]:
    """``80``, ``"80"`` or ``"8000-8999"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str):
        first, dash, last = value.strip().partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise RuleError(f'{where}: {value!r} is not a port or range ("443", "8000-8999")')
        low = int(first)
        high = int(last) if dash else low
    else:
        raise RuleError(f'{where}: {value!r} is not a port or range ("443", "8000-8999")')
    if not 0 <= low <= high <= 65535:
        raise RuleError(f"{where}: {value!r}: ports are 0-65535, the range low to high")
    return low, high


def _items(raw: Mapping[str, Any], key: str, where: str, kinds: tuple[type, ...]) -> list[Any]:
    value = raw[key]
    items = [value] if isinstance(value, kinds) and not isinstance(value, list) else value
    if not isinstance(items, list) or not all(
        isinstance(v, kinds) and not isinstance(v, bool) for v in items
    ):
        raise RuleError(f"{where}.{key}: expected a list, e.g. {_EXAMPLES[key]}")
    if not items:
        raise RuleError(
            f"{where}.{key}: an empty list matches nothing; leave {key} out to match any"
        )
    return items


_EXAMPLES = {
    "clients": '["10.0.0.0/8", "2001:db8::/32"]',
    "users": '["alice", "@ops"]',
    "commands": '["connect", "bind", "udp"]',
    "to": '["192.168.0.0/16", "*.example.com", "example.org"]',
    "ports": '["80", "443", "8000-8999"]',
}


FieldParse = tuple[dict[str, Any], tuple[str, ...]]
"""A parsed rule field: the Rule's keyword arguments and the values as check-config shows them."""


def _clients(items: list[Any], where: str, groups: Mapping[str, Sequence[str]]) -> FieldParse:
    nets = [parse_network(v, where) for v in items]
    return {"clients": NetworkSet(nets)}, tuple(str(n) for n in nets)


def _users(items: list[Any], where: str, groups: Mapping[str, Sequence[str]]) -> FieldParse:
    if not all(items):
        raise RuleError(f"{where}: empty user name")
    return {"users": expand_users(items, groups, where)}, tuple(items)


def _commands(items: list[Any], where: str, groups: Mapping[str, Sequence[str]]) -> FieldParse:
    commands = []
    for item in items:
        command = COMMAND_NAMES.get(item.lower())
        if command is None:
            raise RuleError(f"{where}: {item!r} is not one of connect, bind, udp")
        commands.append(command)
    return {"commands": frozenset(commands)}, tuple(_COMMAND_TEXT[c] for c in commands)


def _to(items: list[Any], where: str, groups: Mapping[str, Sequence[str]]) -> FieldParse:
    nets: list[Network] = []
    exact: set[str] = set()
    parents: set[str] = set()
    shown: list[str] = []
    for item in items:
        if "/" in item or parse_ip(item) is not None:
            net = parse_network(item, where)
            nets.append(net)
            shown.append(str(net))
            continue
        name, is_exact, below = parse_domain(item, where)
        if is_exact:
            exact.add(name)
        if below:
            parents.add(name)
        shown.append(("." if is_exact else "*.") + name if below else name)
    fields: dict[str, Any] = {"to_networks": NetworkSet(nets) if nets else None}
    if exact or parents:
        fields["to_domains"] = DomainSet(frozenset(exact), frozenset(parents))
    return fields, tuple(shown)


def _ports(items: list[Any], where: str, groups: Mapping[str, Sequence[str]]) -> FieldParse:
    ranges = [parse_port_range(v, where) for v in items]
    return {"ports": PortSet(ranges)}, tuple(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


_FIELDS = {
    "clients": (_clients, (str,)),
    "users": (_users, (str,)),
    "commands": (_commands, (str,)),
    "to": (_to, (str,)),
    "ports": (_ports, (str, int)),
}


def parse_rule(raw: Any, number: int, groups: Mapping[str, Sequence[str]]) -> Rule:
    """One ``[[rules]]`` table; ``number`` is its 1-based position."""
    where = f"rule {number}"
    if not isinstance(raw, Mapping):
        raise RuleError(f"{where}: expected a table ([[rules]] with action = ...)")
    unknown = [k for k in raw if k not in RULE_KEYS]
    if unknown:
        raise RuleError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(RULE_KEYS)}")
    if "action" not in raw:
        raise RuleError(f'{where}: missing action = "allow" or "deny"')
    action = parse_action(raw["action"], f"{where}.action")
    spec: list[tuple[str, tuple[str, ...]]] = []
    fields: dict[str, Any] = {}
    for key, (parse, kinds) in _FIELDS.items():
        if key in raw:
            parsed, shown = parse(_items(raw, key, where, kinds), f"{where}.{key}", groups)
            fields.update(parsed)
            spec.append((key, shown))
    if "idle_timeout" in raw:
        value = raw["idle_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise RuleError(f"{where}.idle_timeout: expected seconds (0 = never), got {value!r}")
        if action is Action.DENY:
            raise RuleError(f"{where}.idle_timeout: only allow rules have sessions to time out")
        fields["idle_timeout"] = float(value)
    return Rule(number, action, spec=tuple(spec), **fields)


def parse_ruleset(
    raw_rules: Any,
    groups: Mapping[str, Sequence[str]] | None = None,
    default: Any = "allow",
    protect_local: Any = True,
) -> RuleSet:
    """Compile ``[[rules]]``, ``default`` and ``protect_local``; RuleError names what is wrong."""
    if not isinstance(raw_rules, list | tuple):
        raise RuleError("rules: expected [[rules]] tables (an array of tables)")
    if not isinstance(protect_local, bool):
        raise RuleError("protect_local: expected true or false")
    rules = tuple(parse_rule(raw, i, groups or {}) for i, raw in enumerate(raw_rules, start=1))
    return RuleSet(rules, parse_action(default, "default"), protect_local)
