"""Loading: the ``[[rules]]``, ``[groups]``, ``default`` and ``protect_local`` settings, checked
and compiled into a :class:`RuleSet`. No I/O: the caller hands over the parsed TOML values.

Each rule key has a parser in ``_FIELDS`` that turns its values into the :class:`Rule` fields
(``socksd.rules.match``) and into the text ``check-config`` shows; ``@group`` names in ``users``
are expanded here, so matching never sees a ``[groups]`` group. A directory group
(``@ldap:NAME``) cannot be expanded before a login brings the user's groups: it goes to the
rule's ``user_groups``, matched against them. Every mistake is a :class:`RuleError` whose
message names the rule and key (``rule 3.ports``) and says how to write it instead.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from socksd.outgoing import parse_source_addresses
from socksd.protocol import Command
from socksd.rules.evaluate import RuleSet
from socksd.rules.match import (
    DIRECT,
    DIRECTORY_GROUP_PREFIXES,
    Action,
    DomainSet,
    Network,
    NetworkSet,
    PortSet,
    Rule,
    normalize_name,
    parse_ip,
)

_GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_DIRECTORY_GROUPS = tuple("@" + p for p in DIRECTORY_GROUP_PREFIXES)
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")

COMMAND_NAMES: dict[str, Command] = {
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp": Command.UDP_ASSOCIATE,
}
"""Names of the SOCKS commands in a rule's ``commands``, in the ``commands`` setting and in
``--commands``."""
_COMMAND_TEXT = {command: name for name, command in COMMAND_NAMES.items()}

RULE_KEYS = (
    "action",
    "clients",
    "users",
    "commands",
    "to",
    "ports",
    "idle_timeout",
    "upstream",
    "socks4",
    "via",
)


class RuleError(ValueError):
    """A rule, group or rule setting is wrong; the message names it and how to fix it."""


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
    """User names with each ``@group`` replaced by its members; a directory group
    (``@ldap:NAME``, see ``DIRECTORY_GROUP_PREFIXES``) stays as written, lower-cased."""
    users: set[str] = set()
    for name in names:
        if name.lower().startswith(_DIRECTORY_GROUPS):
            if ":" not in name or not name.partition(":")[2].strip():
                raise RuleError(f"{where}: {name!r} names no group; write @ldap:GROUP")
            users.add(name.lower())
        elif name.startswith("@"):
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
    users = expand_users(items, groups, where)
    directory = frozenset(u for u in users if u.lower().startswith(_DIRECTORY_GROUPS))
    fields: dict[str, Any] = {"users": users - directory}
    if directory:  # a [groups] member may name one too
        fields["user_groups"] = frozenset(g[1:].lower() for g in directory)
    return fields, tuple(items)


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


def parse_rule(
    raw: Any,
    number: int,
    groups: Mapping[str, Sequence[str]],
    upstreams: Collection[str] = (),
) -> Rule:
    """One ``[[rules]]`` table; ``number`` is its 1-based position; ``upstreams`` the names of
    ``[upstreams]`` its ``upstream`` may use."""
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
    if "upstream" in raw:
        name = parse_upstream_name(raw["upstream"], upstreams, f"{where}.upstream")
        if action is Action.DENY:
            raise RuleError(f"{where}.upstream: only allow rules send requests anywhere")
        fields["upstream"] = name
        spec.append(("upstream", (name,)))
    if "socks4" in raw:
        if raw["socks4"] is not True:
            raise RuleError(f"{where}.socks4: expected true (leave it out for false)")
        if action is Action.DENY or "clients" not in raw or "users" in raw:
            raise RuleError(
                f"{where}.socks4: only an allow rule with clients and without users can let "
                "SOCKS4 (which has no password) in by the client's address"
            )
        fields["socks4"] = True
        spec.append(("socks4", ("true",)))
    if "via" in raw:
        try:
            via = parse_source_addresses(raw["via"], f"{where}.via")
        except ValueError as e:
            raise RuleError(str(e)) from None
        if via is None:
            raise RuleError(f"{where}.via: no address given; leave via out to use bind_out")
        if action is Action.DENY:
            raise RuleError(f"{where}.via: only allow rules send requests anywhere")
        fields["via"] = via
        spec.append(("via", via.addresses))
    return Rule(number, action, spec=tuple(spec), **fields)


def parse_upstream_name(value: Any, upstreams: Collection[str], where: str) -> str:
    """An upstream name (a key of ``[upstreams]``) or ``"direct"``."""
    if not isinstance(value, str) or not value:
        raise RuleError(f'{where}: expected the name of an [upstreams] entry or "{DIRECT}"')
    if value != DIRECT and value not in upstreams:
        names = ", ".join([*upstreams, DIRECT])
        raise RuleError(f"{where}: {value!r} is not in [upstreams] (known: {names})")
    return value


def parse_ruleset(
    raw_rules: Any,
    groups: Mapping[str, Sequence[str]] | None = None,
    default: Any = "allow",
    protect_local: Any = True,
    *,
    upstreams: Collection[str] = (),
    upstream: str | None = None,
) -> RuleSet:
    """Compile ``[[rules]]``, ``default`` and ``protect_local``; RuleError names what is wrong.

    ``upstreams``: the names rules may send requests to; ``upstream``: the global one (None or
    ``"direct"``: none)."""
    if not isinstance(raw_rules, list | tuple):
        raise RuleError("rules: expected [[rules]] tables (an array of tables)")
    if not isinstance(protect_local, bool):
        raise RuleError("protect_local: expected true or false")
    rules = tuple(
        parse_rule(raw, i, groups or {}, upstreams) for i, raw in enumerate(raw_rules, start=1)
    )
    if upstream is not None:
        upstream = parse_upstream_name(upstream, upstreams, "upstream")
    return RuleSet(
        rules,
        parse_action(default, "default"),
        protect_local,
        upstream=None if upstream == DIRECT else upstream,
    )
