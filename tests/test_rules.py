"""Access rules: parsing and its error messages, the matching matrix, and a naive reference.

The hypothesis tests compare :class:`RuleSet` against a deliberately simple reference written
with ``ipaddress`` and ``fnmatch``-free string checks, over random rule lists and requests: both
checkpoints must agree with it, for IPv4, IPv6, IPv4-mapped, names and resolved addresses.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from socksd.protocol import Command
from socksd.rules import (
    Action,
    Decision,
    NeedAddresses,
    NetworkSet,
    PortSet,
    RuleError,
    RuleSet,
    parse_groups,
    parse_ip,
    parse_ruleset,
)

CONNECT, BIND, UDP = Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE
LAN = parse_ip("10.1.2.3")
LAN6 = parse_ip("2001:db8::5")
LOOP = parse_ip("127.0.0.1")
assert LAN is not None and LAN6 is not None and LOOP is not None


def ruleset(
    *rules: dict[str, Any], default: str = "allow", protect: bool = False, **kw: Any
) -> RuleSet:
    return parse_ruleset(list(rules), kw.get("groups", {}), default, protect)


def request(
    rs: RuleSet,
    host: str,
    port: int = 80,
    *,
    client: str = "10.1.2.3",
    user: str | None = None,
    command: int = CONNECT,
) -> Decision | NeedAddresses:
    ip = parse_ip(client)
    assert ip is not None
    return rs.check_request(ip, user, command, host, port)


def resolved(
    rs: RuleSet,
    name: str,
    addresses: list[str],
    port: int = 80,
    *,
    client: str = "10.1.2.3",
    user: str | None = None,
    command: int = CONNECT,
) -> list[str]:
    """The labels deciding each address of ``name`` (``allow:rule 1`` / ``deny:default``)."""
    ip = parse_ip(client)
    assert ip is not None
    first = rs.check_request(ip, user, command, name, port)
    out = []
    for address in addresses:
        if isinstance(first, Decision):
            decision = first
        else:
            decision = rs.check_address(
                ip, user, command, name=name, address=address, port=port, start=first.start
            )
        out.append(f"{'allow' if decision.allowed else 'deny'}:{decision.label}")
    return out


def outcome(decision: Decision | NeedAddresses) -> str:
    assert isinstance(decision, Decision), decision
    return f"{'allow' if decision.allowed else 'deny'}:{decision.label}"


# -- parsing helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", (4, 0x01020304)),
        ("::1", (6, 1)),
        ("::ffff:127.0.0.1", (4, 0x7F000001)),
        ("fe80::1%eth0", (6, 0xFE80 << 112 | 1)),
        ("example.org", None),
        ("1.2.3", None),
        ("", None),
    ],
)
def test_parse_ip(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_ip(text) == expected


def test_network_set_bisect_and_merge() -> None:
    nets = NetworkSet(
        ipaddress.ip_network(n)
        for n in [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "11.0.0.0/8",
            "2001:db8::/32",
            "::ffff:192.168.0.0/112",
        ]
    )
    assert parse_ip("10.255.255.255") in nets
    assert parse_ip("11.0.0.0") in nets
    assert parse_ip("12.0.0.0") not in nets
    assert parse_ip("9.255.255.255") not in nets
    assert parse_ip("2001:db8:ffff::1") in nets
    assert parse_ip("2001:db9::") not in nets
    assert parse_ip("192.168.3.4") in nets  # the IPv4-mapped network holds the IPv4 address
    assert parse_ip("::ffff:10.9.9.9") in nets
    assert (4, 0) not in NetworkSet([])


def test_port_set() -> None:
    ports = PortSet([(80, 80), (8000, 8999), (443, 443), (8500, 9000)])
    assert [p in ports for p in (79, 80, 81, 443, 7999, 8000, 9000, 9001)] == [
        False,
        True,
        False,
        True,
        False,
        True,
        True,
        False,
    ]


# -- parse errors name the rule and the key -------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"clients": ["10.0.0.0/8"]}], r'^rule 1: missing action = "allow" or "deny"$'),
        ([{"action": "permit"}], r'^rule 1\.action: expected "allow" or "deny", got \'permit\'$'),
        (
            [{"action": "allow"}, {"action": "deny", "client": ["1.2.3.4"]}],
            r"^rule 2: unknown key 'client'; known keys: action, clients",
        ),
        (
            [{"action": "deny", "clients": ["10.0.0.1/8"]}],
            r"^rule 1\.clients: '10\.0\.0\.1/8' has host bits set; write 10\.0\.0\.0/8$",
        ),
        (
            [{"action": "deny", "clients": ["10.0.0.300"]}],
            r"^rule 1\.clients: '10\.0\.0\.300' is not an address or network",
        ),
        ([{"action": "deny", "clients": []}], r"^rule 1\.clients: an empty list matches nothing"),
        ([{"action": "deny", "clients": [1]}], r"^rule 1\.clients: expected a list"),
        (
            [{"action": "deny", "users": ["@nope"]}],
            r"^rule 1\.users: '@nope' is not a group in \[groups\]",
        ),
        ([{"action": "deny", "users": [""]}], r"^rule 1\.users: empty user name"),
        (
            [{"action": "deny", "commands": ["associate"]}],
            r"^rule 1\.commands: 'associate' is not one of connect, bind, udp$",
        ),
        (
            [{"action": "deny", "to": ["*"]}],
            r"^rule 1\.to: leave `to` out to match any destination",
        ),
        (
            [{"action": "deny", "to": ["ex ample.org"]}],
            r"^rule 1\.to: 'ex ample\.org' is not an address, network or domain pattern",
        ),
        ([{"action": "deny", "to": ["b\u00fccher.de"]}], r"punycode"),
        (
            [{"action": "deny", "to": ["10.0.0"]}],
            r"^rule 1\.to: '10\.0\.0' is neither an IP address nor a domain name$",
        ),
        ([{"action": "deny", "to": ["a.*.org"]}], r"^rule 1\.to: 'a\.\*\.org' is not"),
        ([{"action": "deny", "to": ["fe80::1%eth0"]}], r"scope ids are not supported"),
        ([{"action": "deny", "ports": ["80-"]}], r"^rule 1\.ports: '80-' is not a port or range"),
        ([{"action": "deny", "ports": ["90-80"]}], r"^rule 1\.ports: '90-80': ports are 0-65535"),
        ([{"action": "deny", "ports": [70000]}], r"^rule 1\.ports: 70000: ports are 0-65535"),
        ([{"action": "deny", "ports": [True]}], r"^rule 1\.ports: expected a list"),
        ([{"action": "deny", "idle_timeout": 5}], r"^rule 1\.idle_timeout: only allow rules"),
        ([{"action": "allow", "idle_timeout": -1}], r"^rule 1\.idle_timeout: expected seconds"),
        (["allow"], r"^rule 1: expected a table"),
    ],
)
def test_rule_errors(rules: list[Any], message: str) -> None:
    with pytest.raises(RuleError, match=message):
        parse_ruleset(rules, {})


def test_top_level_errors() -> None:
    with pytest.raises(RuleError, match=r"^rules: expected \[\[rules\]\] tables"):
        parse_ruleset({"action": "allow"})
    with pytest.raises(RuleError, match=r'^default: expected "allow" or "deny", got \'maybe\''):
        parse_ruleset([], {}, "maybe")
    with pytest.raises(RuleError, match=r"^protect_local: expected true or false"):
        parse_ruleset([], {}, "allow", "yes")
    with pytest.raises(RuleError, match=r"^groups: expected a table"):
        parse_groups(["ops"])
    with pytest.raises(RuleError, match=r"^groups: 'o ps' is not a group name"):
        parse_groups({"o ps": ["a"]})
    with pytest.raises(RuleError, match=r"^groups\.ops: expected a list of user names"):
        parse_groups({"ops": [1]})


def test_single_values_are_lists_of_one() -> None:
    rs = ruleset({"action": "deny", "clients": "10.0.0.0/8", "ports": 80, "to": "example.org"})
    assert rs.rules[0].describe() == "rule 1: deny clients=10.0.0.0/8 to=example.org ports=80"


def test_describe_shows_every_field_and_the_implicit_rules() -> None:
    rs = parse_ruleset(
        [
            {
                "action": "deny",
                "clients": ["10.0.0.0/8", "2001:db8::/32"],
                "users": ["alice", "@ops"],
                "commands": ["connect", "UDP"],
                "to": ["192.168.0.0/16", "*.Example.com.", ".example.net", "example.org"],
                "ports": ["80", 443, "8000-8999"],
            },
            {"action": "allow", "idle_timeout": 30},
        ],
        {"ops": ["bob"]},
        "deny",
        True,
    ).with_host_addresses([ipaddress.ip_network("192.0.2.2/32")])
    lines = rs.describe()
    assert (
        lines[0]
        == "rule 1: deny clients=10.0.0.0/8,2001:db8::/32 users=alice,@ops commands=connect,udp to=192.168.0.0/16,*.example.com,.example.net,example.org ports=80,443,8000-8999"
    )
    assert lines[1] == "rule 2: allow idle_timeout=30"
    assert lines[2].startswith(
        "protect_local: for clients outside 127.0.0.0/8, ::1/128, deny 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16"
    )
    assert "192.0.2.2/32" in lines[2]
    assert lines[3] == "default: deny"
    assert rs.rules[0].users == frozenset({"alice", "bob"})


# -- the matrix: each field, allow and deny --------------------------------------------------------


@pytest.mark.parametrize("action", ["allow", "deny"])
@pytest.mark.parametrize(
    ("field", "value", "hit", "miss"),
    [
        ("clients", ["10.0.0.0/8"], {"client": "10.9.9.9"}, {"client": "192.168.1.1"}),
        ("clients", ["2001:db8::/32"], {"client": "2001:db8::77"}, {"client": "2001:db9::1"}),
        ("clients", ["10.1.2.3"], {"client": "::ffff:10.1.2.3"}, {"client": "10.1.2.4"}),
        ("users", ["alice"], {"user": "alice"}, {"user": "bob"}),
        ("users", ["alice"], {"user": "alice"}, {"user": None}),
        ("users", ["@ops"], {"user": "carol"}, {"user": "alice"}),
        ("commands", ["bind", "udp"], {"command": BIND}, {"command": CONNECT}),
        ("commands", ["udp"], {"command": UDP}, {"command": BIND}),
        ("to", ["192.168.0.0/16"], {"host": "192.168.7.7"}, {"host": "192.169.0.1"}),
        ("to", ["2001:db8:1::/48"], {"host": "2001:db8:1::9"}, {"host": "2001:db8:2::9"}),
        ("to", ["example.org"], {"host": "EXAMPLE.org."}, {"host": "www.example.org"}),
        ("to", ["*.example.org"], {"host": "a.b.example.org"}, {"host": "example.org"}),
        ("to", [".example.org"], {"host": "example.org"}, {"host": "badexample.org"}),
        ("to", ["example.org"], {"host": "example.org"}, {"host": "example.org.evil"}),
        ("ports", ["8000-8999"], {"port": 8999}, {"port": 9000}),
        ("ports", [443, "80"], {"port": 80}, {"port": 8080}),
    ],
)
def test_each_field(
    action: str, field: str, value: list[str], hit: dict[str, Any], miss: dict[str, Any]
) -> None:
    other = "deny" if action == "allow" else "allow"
    rs = ruleset({"action": action, field: value}, default=other, groups={"ops": ["bob", "carol"]})
    base: dict[str, Any] = {
        "host": "203.0.113.9",
        "port": 80,
        "client": "10.1.2.3",
        "user": "alice",
        "command": CONNECT,
    }
    if field == "users" and "@ops" in value:
        base["user"] = "bob"
    for case, expected in ((hit, f"{action}:rule 1"), (miss, f"{other}:default")):
        args = {**base, **case}
        host = args.pop("host")
        decision = request(rs, host, **args)
        if isinstance(decision, NeedAddresses):  # a name against a network rule: decided by address
            decision = rs.check_address(
                parse_ip(args["client"]),
                args["user"],
                args["command"],
                name=host,
                address="203.0.113.9",
                port=args["port"],
                start=decision.start,
            )  # type: ignore[arg-type]
        assert outcome(decision) == expected, (case, decision)


def test_all_fields_must_match() -> None:
    rs = ruleset({"action": "deny", "clients": ["10.0.0.0/8"], "users": ["alice"], "ports": ["22"]})
    assert outcome(request(rs, "1.1.1.1", 22, user="alice")) == "deny:rule 1"
    assert outcome(request(rs, "1.1.1.1", 22, user="bob")) == "allow:default"
    assert outcome(request(rs, "1.1.1.1", 23, user="alice")) == "allow:default"
    assert outcome(request(rs, "1.1.1.1", 22, user="alice", client="11.0.0.1")) == "allow:default"


def test_first_match_wins() -> None:
    rs = ruleset(
        {"action": "allow", "to": ["10.0.0.1"]},
        {"action": "deny", "to": ["10.0.0.0/8"]},
        {"action": "allow", "to": ["10.0.0.2"]},
        default="allow",
    )
    assert outcome(request(rs, "10.0.0.1")) == "allow:rule 1"
    assert outcome(request(rs, "10.0.0.2")) == "deny:rule 2"
    assert outcome(request(rs, "11.0.0.2")) == "allow:default"


def test_ipv4_mapped_target_is_the_ipv4_address() -> None:
    rs = ruleset({"action": "deny", "to": ["10.0.0.0/8"]})
    assert outcome(request(rs, "::ffff:10.0.0.1")) == "deny:rule 1"


# -- names and the addresses they resolve to -------------------------------------------------------


def test_name_matched_by_resolved_address() -> None:
    rs = ruleset({"action": "deny", "to": ["10.0.0.0/8"]})
    first = request(rs, "intranet.example")
    assert first == NeedAddresses(0)
    assert resolved(rs, "intranet.example", ["10.0.0.5", "192.0.2.1"]) == [
        "deny:rule 1",
        "allow:default",
    ]


def test_allowed_network_reached_by_name() -> None:
    rs = ruleset({"action": "allow", "to": ["10.0.0.0/8"]}, default="deny")
    assert resolved(rs, "db.corp", ["10.0.0.5", "192.0.2.1"]) == ["allow:rule 1", "deny:default"]


def test_domain_allow_then_network_deny_cannot_be_tricked_by_an_earlier_network_rule() -> None:
    rs = ruleset(
        {"action": "deny", "to": ["10.0.0.0/8"]},
        {"action": "allow", "to": ["*.example.com"]},
        default="deny",
    )
    assert resolved(rs, "www.example.com", ["93.184.215.14", "10.0.0.5"]) == [
        "allow:rule 2",
        "deny:rule 1",
    ]
    assert resolved(rs, "www.example.org", ["93.184.215.14"]) == ["deny:default"]


def test_deny_by_name_decides_before_resolution() -> None:
    rs = ruleset(
        {"action": "deny", "to": ["*.bad.example"]}, {"action": "allow", "to": ["0.0.0.0/0"]}
    )
    assert outcome(request(rs, "x.bad.example")) == "deny:rule 1"


def test_domain_patterns_never_match_an_address() -> None:
    rs = ruleset({"action": "deny", "to": ["example.org", "*.example.org"]})
    assert outcome(request(rs, "93.184.215.14")) == "allow:default"


def test_name_that_is_an_ip_literal_is_an_address() -> None:
    rs = ruleset({"action": "deny", "to": ["10.0.0.0/8"]})
    assert outcome(request(rs, "10.1.1.1")) == "deny:rule 1"


def test_rules_without_to_decide_names_at_once() -> None:
    rs = ruleset(
        {"action": "deny", "users": ["mallory"]},
        {"action": "allow", "clients": ["10.0.0.0/8"]},
        default="deny",
    )
    assert outcome(request(rs, "example.org", user="mallory")) == "deny:rule 1"
    assert outcome(request(rs, "example.org", user="alice")) == "allow:rule 2"


# -- protect_local -------------------------------------------------------------------------------

HOST = [ipaddress.ip_network("192.0.2.2/32"), ipaddress.ip_network("2001:db8:ff::2/128")]


def protected(*rules: dict[str, Any], default: str = "allow") -> RuleSet:
    return parse_ruleset(list(rules), {}, default, True).with_host_addresses(HOST)


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "0.0.0.0",
        "::",
        "169.254.169.254",
        "fe80::1",
        "192.0.2.2",
        "2001:db8:ff::2",
        "::ffff:127.0.0.1",
    ],
)
def test_local_destinations_are_denied_to_other_machines(target: str) -> None:
    rs = protected()
    assert outcome(request(rs, target)) == "deny:protect_local"
    assert outcome(request(rs, target, client="2001:db8::5")) == "deny:protect_local"
    assert outcome(request(rs, target, client="127.0.0.1")) == "allow:default"
    assert outcome(request(rs, target, client="::1")) == "allow:default"


def test_other_destinations_pass() -> None:
    rs = protected()
    assert outcome(request(rs, "192.0.2.3")) == "allow:default"
    assert outcome(request(rs, "10.0.0.1")) == "allow:default"


def test_allow_without_to_does_not_open_local_destinations() -> None:
    rs = protected({"action": "allow", "clients": ["10.0.0.0/8"]}, default="deny")
    assert outcome(request(rs, "127.0.0.1")) == "deny:protect_local"
    assert outcome(request(rs, "8.8.8.8")) == "allow:rule 1"


def test_allow_listing_the_network_opens_it_and_later_rules_are_reached() -> None:
    rs = protected(
        {"action": "allow", "clients": ["10.0.0.0/8"]},
        {"action": "allow", "to": ["127.0.0.1/32"], "ports": ["3128"]},
        {"action": "deny", "to": ["169.254.0.0/16"]},
    )
    assert outcome(request(rs, "127.0.0.1", 3128)) == "allow:rule 2"
    assert outcome(request(rs, "127.0.0.1", 22)) == "deny:protect_local"
    assert outcome(request(rs, "169.254.169.254")) == "deny:rule 3"


def test_names_never_open_local_destinations() -> None:
    rs = protected({"action": "allow", "to": ["localhost", "*.example.com"]})
    assert request(rs, "localhost") == NeedAddresses(0)
    assert resolved(rs, "localhost", ["127.0.0.1", "::1"]) == ["deny:protect_local"] * 2
    assert resolved(rs, "rebind.example.com", ["93.184.215.14", "169.254.169.254"]) == [
        "allow:rule 1",
        "deny:protect_local",
    ]
    assert resolved(rs, "localhost", ["127.0.0.1"], client="127.0.0.1") == ["allow:rule 1"]


def test_protect_local_off() -> None:
    rs = parse_ruleset([], {}, "allow", False)
    assert rs.allow_all
    assert outcome(request(rs, "127.0.0.1")) == "allow:default"
    assert outcome(request(rs, "localhost")) == "allow:default"


def test_default_deny_with_protect_local_says_default() -> None:
    rs = protected(default="deny")
    assert outcome(request(rs, "127.0.0.1")) == "deny:default"
    assert outcome(request(rs, "localhost")) == "deny:default"


# -- accept checkpoint -----------------------------------------------------------------------------


def test_accept_checkpoint() -> None:
    rs = ruleset(
        {"action": "deny", "clients": ["10.66.0.0/16"]},
        {"action": "deny", "clients": ["10.0.0.0/8"], "ports": ["25"]},
        {"action": "allow", "clients": ["10.0.0.0/8"], "users": ["alice"]},
        {"action": "allow", "clients": ["192.168.0.0/16"]},
        default="deny",
    )

    def accept(client: str) -> tuple[bool, str]:
        ip = parse_ip(client)
        assert ip is not None
        d = rs.check_client(ip)
        return d.allowed, d.label

    assert accept("10.66.1.1") == (False, "rule 1")
    assert accept("10.1.1.1") == (True, "")  # rule 3 may allow alice: decided at the request
    assert accept("192.168.1.1") == (True, "rule 4")
    assert accept("172.16.0.1") == (False, "default")
    assert accept("2001:db8::1") == (False, "default")


def test_accept_all_fast_path() -> None:
    assert ruleset().accept_all
    assert ruleset({"action": "deny", "users": ["x"]}).accept_all
    assert not ruleset({"action": "deny", "clients": ["10.0.0.0/8"]}).accept_all
    assert not ruleset(default="deny").accept_all


# -- hypothesis: RuleSet against a naive reference -------------------------------------------------

CLIENTS = [
    "10.0.0.1",
    "10.1.0.1",
    "192.168.1.1",
    "127.0.0.1",
    "::1",
    "2001:db8::1",
    "2001:db8:1::1",
    "::ffff:10.0.0.1",
]
ADDRESSES = [
    "10.0.0.1",
    "10.1.0.7",
    "192.168.1.1",
    "8.8.8.8",
    "127.0.0.1",
    "169.254.169.254",
    "192.0.2.2",
    "2001:db8::9",
    "2001:db8:1::1",
    "::1",
    "fe80::1",
    "::ffff:10.1.0.7",
    "0.0.0.0",
]
NETWORKS = [
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.1.0.0/16",
    "192.168.0.0/16",
    "0.0.0.0/0",
    "127.0.0.0/8",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "::/0",
    "169.254.0.0/16",
    "192.0.2.2/32",
    "8.8.8.8/32",
]
NAMES = [
    "example.com",
    "a.example.com",
    "b.a.example.com",
    "example.org",
    "other.net",
    "EXAMPLE.com.",
    "localhost",
]
PATTERNS = [
    "example.com",
    "*.example.com",
    ".example.com",
    "example.org",
    "*.org",
    ".net",
    "localhost",
]
USERS = ["alice", "bob", "carol", "@ops"]
GROUPS = {"ops": ["bob", "carol"]}
PORT_SPECS = ["80", "443", "0-1023", "8000-8999", "22"]


@st.composite
def rule_tables(draw: st.DrawFn) -> dict[str, Any]:
    table: dict[str, Any] = {"action": draw(st.sampled_from(["allow", "deny"]))}
    if draw(st.booleans()):
        table["clients"] = draw(st.lists(st.sampled_from(NETWORKS), min_size=1, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        table["users"] = draw(st.lists(st.sampled_from(USERS), min_size=1, max_size=2))
    if draw(st.integers(0, 3)) == 0:
        table["commands"] = draw(
            st.lists(st.sampled_from(["connect", "bind", "udp"]), min_size=1, max_size=2)
        )
    if draw(st.booleans()):
        table["to"] = draw(st.lists(st.sampled_from(NETWORKS + PATTERNS), min_size=1, max_size=3))
    if draw(st.integers(0, 2)) == 0:
        table["ports"] = draw(st.lists(st.sampled_from(PORT_SPECS), min_size=1, max_size=2))
    return table


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _norm_net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it maps."""
    net = ipaddress.ip_network(text)
    mapped = ipaddress.ip_network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped):
        return ipaddress.ip_network(
            f"{ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)}/{net.prefixlen - 96}"
        )
    return net


def _in(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: list[str]) -> bool:
    for text in nets:
        net = ipaddress.ip_network(text)
        if net.version == ip.version and ip in net:
            return True
    return False


def _name_matches(name: str, patterns: list[str]) -> bool:
    name = name.lower().rstrip(".")
    for pattern in patterns:
        p = pattern.lower()
        if "/" in p or p[0].isdigit():
            continue
        if p.startswith("*."):
            if name.endswith(p[1:]):
                return True
        elif p.startswith("."):
            if name == p[1:] or name.endswith(p):
                return True
        elif name == p:
            return True
    return False


def _port_in(port: int, specs: list[str]) -> bool:
    for spec in specs:
        low, _, high = spec.partition("-")
        if int(low) <= port <= int(high or low):
            return True
    return False


def reference(
    tables: list[dict[str, Any]],
    default: str,
    protect: bool,
    client: str,
    user: str | None,
    command: str,
    port: int,
    name: str | None,
    address: str,
) -> str:
    """What the rules mean, written the slow obvious way."""
    c, ip = _ip(client), _ip(address)
    local = [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::/128",
        "::1/128",
        "fe80::/10",
        "192.0.2.2/32",
    ]
    guard = protect and _in(ip, local) and not _in(c, ["127.0.0.0/8", "::1/128"])
    passed_over = False
    for number, t in enumerate(tables, start=1):
        if "clients" in t and not _in(c, t["clients"]):
            continue
        if "users" in t:
            members = {m for u in t["users"] for m in (GROUPS[u[1:]] if u.startswith("@") else [u])}
            if user not in members:
                continue
        if "commands" in t and command not in t["commands"]:
            continue
        if "ports" in t and not _port_in(port, t["ports"]):
            continue
        by_net = False
        if "to" in t:
            nets = [x for x in t["to"] if "/" in x]
            by_net = _in(ip, nets)
            if not by_net and not (name is not None and _name_matches(name, t["to"])):
                continue
        if t["action"] == "deny":
            return f"deny:rule {number}"
        if guard and not by_net:
            passed_over = True
            continue
        return f"allow:rule {number}"
    if guard and (passed_over or default == "allow"):
        return "deny:protect_local"
    return f"{default}:default"


REQUEST = st.tuples(
    st.sampled_from(CLIENTS),
    st.sampled_from(["alice", "bob", "carol", None]),
    st.sampled_from(["connect", "bind", "udp"]),
    st.sampled_from([0, 22, 80, 443, 8080, 8500]),
)
COMMAND_OF = {"connect": CONNECT, "bind": BIND, "udp": UDP}


@settings(max_examples=400, deadline=None)
@given(
    tables=st.lists(rule_tables(), max_size=5),
    default=st.sampled_from(["allow", "deny"]),
    protect=st.booleans(),
    req=REQUEST,
    target=st.one_of(
        st.sampled_from(ADDRESSES),
        st.tuples(
            st.sampled_from(NAMES), st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3)
        ),
    ),
)
def test_ruleset_agrees_with_reference(
    tables: list[dict[str, Any]],
    default: str,
    protect: bool,
    req: tuple[str, str | None, str, int],
    target: str | tuple[str, list[str]],
) -> None:
    rs = parse_ruleset(tables, GROUPS, default, protect).with_host_addresses(
        [ipaddress.ip_network("192.0.2.2/32")]
    )
    client, user, command, port = req
    cip = parse_ip(client)
    assert cip is not None
    cmd = COMMAND_OF[command]
    if isinstance(target, str):
        got = rs.check_request(cip, user, cmd, target, port)
        assert outcome(got) == reference(
            tables, default, protect, client, user, command, port, None, target
        )
        return
    name, addresses = target
    first = rs.check_request(cip, user, cmd, name, port)
    for address in addresses:
        expected = reference(tables, default, protect, client, user, command, port, name, address)
        if isinstance(first, Decision):
            assert outcome(first) == expected, ("decided before resolution", address)
        else:
            got = rs.check_address(
                cip, user, cmd, name=name, address=address, port=port, start=first.start
            )
            assert outcome(got) == expected, address
            # resuming at ``start`` is the same as evaluating from the first rule
            assert (
                rs.check_address(cip, user, cmd, name=name, address=address, port=port, start=0)
                == got
            )


@settings(max_examples=300, deadline=None)
@given(
    tables=st.lists(rule_tables(), max_size=5),
    default=st.sampled_from(["allow", "deny"]),
    client=st.sampled_from(CLIENTS),
    requests=st.lists(
        st.tuples(REQUEST, st.sampled_from(ADDRESSES + NAMES)), min_size=1, max_size=20
    ),
)
def test_accept_checkpoint_refuses_only_clients_with_nothing_allowed(
    tables: list[dict[str, Any]], default: str, client: str, requests: list[Any]
) -> None:
    rs = parse_ruleset(tables, GROUPS, default, False)
    cip = parse_ip(client)
    assert cip is not None
    if rs.check_client(cip).allowed:
        return
    for (_, user, command, port), target in requests:
        for address in ADDRESSES:
            name = None if parse_ip(target) else target
            result = reference(
                tables,
                default,
                False,
                client,
                user,
                command,
                port,
                name,
                target if name is None else address,
            )
            assert result.startswith("deny"), (target, address, result)


@settings(max_examples=300, deadline=None)
@given(
    nets=st.lists(st.sampled_from([*NETWORKS, "::ffff:10.0.0.0/104", "10.0.0.128/25"]), max_size=6),
    address=st.sampled_from(ADDRESSES + CLIENTS),
)
def test_network_set_agrees_with_ipaddress(nets: list[str], address: str) -> None:
    ip = parse_ip(address)
    assert ip is not None
    target = _ip(address)
    expected = any(target.version == net.version and target in net for net in map(_norm_net, nets))
    assert (ip in NetworkSet(ipaddress.ip_network(n) for n in nets)) == expected


def test_action_enum_values() -> None:
    assert [a.value for a in Action] == ["allow", "deny"]


def test_rules_per_client_are_remembered_within_a_bound() -> None:
    from socksd.rules import CLIENT_CACHE_SIZE

    rs = ruleset(
        {"action": "deny", "clients": ["10.0.0.0/8"], "ports": ["22"]},
        {"action": "allow", "users": ["alice"]},
        {"action": "deny", "clients": ["10.1.0.0/16"]},
    )
    assert [r.number for r in rs.rules_for((4, 0x0A010203))] == [1, 2, 3]
    assert [r.number for r in rs.rules_for((4, 0x0B000001))] == [2]
    assert rs.rules_for((4, 0x0B000001)) is rs.rules_for((4, 0x0B000001))
    for i in range(CLIENT_CACHE_SIZE + 10):
        rs.rules_for((6, i))
    assert len(rs._by_client or {}) <= CLIENT_CACHE_SIZE
    assert outcome(request(rs, "1.1.1.1", 22, client="10.1.2.3")) == "deny:rule 1"
    assert outcome(request(rs, "1.1.1.1", 23, client="10.1.2.3")) == "deny:rule 3"
    assert ruleset({"action": "deny", "ports": ["1"]})._by_client is None  # nothing to remember


def test_open_request_is_decided_by_rules_that_hold_for_any_destination() -> None:
    """UDP ASSOCIATE and BIND for any peer: destinations come later (issue 11, defect 2)."""
    udp = Command.UDP_ASSOCIATE
    client = parse_ip("192.0.2.10")
    assert client is not None

    def open_request(rs: RuleSet, user: str | None = None) -> str:
        return outcome(rs.check_open_request(client, user, udp))

    # protect_local and deny rules with a destination only restrict destinations
    guarded = ruleset({"action": "deny", "to": ["10.0.0.0/8"]}, protect=True)
    assert open_request(guarded) == "allow:default"
    # an allow with a destination lets it through, even under default deny
    dns_only = ruleset(
        {"action": "allow", "to": ["198.51.100.53"], "ports": ["53"]}, default="deny"
    )
    assert open_request(dns_only) == "allow:rule 1"
    assert open_request(ruleset(default="deny")) == "deny:default"
    # a rule that holds whatever the destination decides
    no_udp = ruleset({"action": "deny", "users": ["guest"], "commands": ["udp"]})
    assert open_request(no_udp, "guest") == "deny:rule 1"
    assert open_request(no_udp, "alice") == "allow:default"
    assert open_request(ruleset({"action": "deny", "commands": ["connect"]})) == "allow:default"
