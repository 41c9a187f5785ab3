"""The outgoing address (``socksd.outgoing``): ``bind_out`` and a rule's ``via`` parsed, checked
against this host, chosen per session, and used by CONNECT's connection (on loopback: any
127.0.0.0/8 address is this host's)."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

from socksd.accesslog import SessionRecord
from socksd.config import ConfigError, build_config
from socksd.limits import Limits
from socksd.outgoing import NoSourceAddress, SourceAddresses, parse_source_addresses
from socksd.protocol import Address, Command, ReplyCode, Request
from socksd.rules import RuleError, parse_ip, parse_ruleset
from socksd.server.commands.connect import open_target
from socksd.server.commands.replycodes import reply_for_error
from socksd.server.handshake.admission import Admission
from socksd.server.handshake.refusals import RefusalLog
from socksd.server.process.context import check_outgoing

NOT_OURS = "192.0.2.99"
"""TEST-NET-1: on no test machine's interfaces."""


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "v4", "v6"),
    [
        ("192.0.2.1", "192.0.2.1", None),
        (["2001:DB8::1"], None, "2001:db8::1"),
        (["[2001:db8::1]", "192.0.2.1"], "192.0.2.1", "2001:db8::1"),
    ],
)
def test_one_address_per_family(value: Any, v4: str | None, v6: str | None) -> None:
    parsed = parse_source_addresses(value, "bind_out")
    assert parsed is not None
    assert (parsed.v4, parsed.v6, parsed.where) == (v4, v6, "bind_out")


@pytest.mark.parametrize("value", ["", [], [""]])
def test_nothing_given_is_unset(value: Any) -> None:
    assert parse_source_addresses(value, "bind_out") is None
    assert build_config({"bind_out": value}, {}).bind_out is None


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("proxy.example", "no names, no port"),
        ("192.0.2.1:1080", "no names, no port"),
        (5, "expected this host's IP addresses"),
        (["192.0.2.1", "192.0.2.2"], "192.0.2.1 and 192.0.2.2 are both IPv4"),
        ("0.0.0.0", "not an address to send from"),
        ("ff02::1", "not an address to send from"),
        ("fe80::1%eth0", "scope ids are not supported"),
        ("::ffff:192.0.2.1", "write 192.0.2.1"),
    ],
)
def test_bind_out_errors_name_the_key(value: Any, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"bind_out": value}, {})
    message = str(err.value)
    assert message.startswith("bind_out: ") and says in message and "\n" not in message


def test_the_flag_is_repeatable() -> None:
    from socksd.cli import config_from_args, make_parser

    args = make_parser().parse_args(["serve", "--bind-out", "127.0.0.1", "--bind-out", "::1"])
    assert config_from_args(args).bind_out == SourceAddresses("127.0.0.1", "::1")


def test_a_rule_via() -> None:
    rules = parse_ruleset(
        [{"action": "allow", "clients": ["10.0.0.0/8"], "via": ["192.0.2.1", "2001:db8::1"]}]
    )
    via = rules.rules[0].via
    assert via == SourceAddresses("192.0.2.1", "2001:db8::1")
    assert via is not None and via.where == "rule 1.via"
    assert rules.rules[0].describe() == (
        "rule 1: allow clients=10.0.0.0/8 via=192.0.2.1,2001:db8::1"
    )


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ({"action": "deny", "via": "192.0.2.1"}, "rule 1.via: only allow rules"),
        ({"action": "allow", "via": ""}, "rule 1.via: no address given"),
        ({"action": "allow", "via": "gateway"}, "rule 1.via: expected this host's IP"),
        ({"action": "allow", "via": ["::1", "::2"]}, "rule 1.via: ::1 and ::2 are both IPv6"),
    ],
)
def test_rule_via_errors(rule: dict[str, Any], says: str) -> None:
    with pytest.raises(RuleError, match=f"^{says}"):
        parse_ruleset([rule])
    with pytest.raises(ConfigError, match=f"^{says}"):
        build_config({"rules": [rule]}, {})


def test_via_with_an_upstream_is_accepted() -> None:
    """``via`` on a rule with ``upstream``: the address the upstream is reached from."""
    config = build_config(
        {
            "upstreams": {"up": {"proxy": "socks5://192.0.2.50:1080"}},
            "rules": [{"action": "allow", "upstream": "up", "via": "127.0.0.1"}],
        },
        {},
    )
    assert config.rules.rules[0].via == SourceAddresses("127.0.0.1")


# -- this host's addresses (derive) ------------------------------------------------------------


def test_addresses_of_this_host_pass() -> None:
    check_outgoing(
        build_config(
            {"bind_out": "127.0.0.2", "rules": [{"action": "allow", "via": "127.0.0.3"}]}, {}
        )
    )


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"bind_out": [NOT_OURS]}, "bind_out"),
        ({"rules": [{"action": "deny"}, {"action": "allow", "via": NOT_OURS}]}, "rule 2.via"),
    ],
)
def test_an_address_not_on_this_host_is_refused(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_outgoing(build_config(values, {}))
    assert str(err.value).startswith(f"{key}: {NOT_OURS} is not an address of this host (")


# -- the addresses of each family ---------------------------------------------------------------


def _info(ip: str, port: int = 80) -> tuple[Any, ...]:
    if ":" in ip:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))


def test_targets_of_a_family_without_an_address_are_left_out() -> None:
    only_v4 = SourceAddresses("192.0.2.1")
    both = [_info("2001:db8::7"), _info("198.51.100.7")]
    assert only_v4.usable(both) == [both[1]]
    assert only_v4.for_ip("198.51.100.7") == "192.0.2.1"
    assert only_v4.for_ip("2001:db8::7", any_family=True) == "192.0.2.1"
    with pytest.raises(NoSourceAddress) as err:
        only_v4.usable([both[0]])
    assert err.value.errno == errno.ENETUNREACH
    assert reply_for_error(err.value) == ReplyCode.NETWORK_UNREACHABLE
    assert str(err.value) == (
        "2001:db8::7 is IPv6 and bind_out has no IPv6 address (192.0.2.1 only)"
    )
    with pytest.raises(NoSourceAddress):
        only_v4.for_ip("2001:db8::7")


# -- which addresses a session gets (admission) -------------------------------------------------


def _admission(rules: Any, command: Command, host: str) -> Admission:
    ip = parse_ip("10.1.1.1") or (4, 0)
    admission = Admission(Limits(), "10.1.1.1", ip, "10.1.1.1:5", RefusalLog())
    assert admission.authorize(rules, None, Request(command, Address.of(host, 0))) is None
    return admission


def test_the_allow_rule_gives_its_via() -> None:
    """CONNECT takes the via of the rule that allowed it; a request with no destination yet
    (UDP, BIND for any peer) the one of the rule naming no destination, as for ``upstream``;
    none (the default) means ``bind_out``."""
    rules = parse_ruleset(
        [
            {"action": "allow", "to": ["10.0.0.0/8"], "via": "192.0.2.1"},
            {"action": "allow", "commands": ["udp", "bind"], "via": "192.0.2.2"},
        ]
    )
    assert _admission(rules, Command.CONNECT, "10.2.3.4").via == SourceAddresses("192.0.2.1")
    assert _admission(rules, Command.CONNECT, "198.51.100.7").via is None
    for command in (Command.UDP_ASSOCIATE, Command.BIND):
        assert _admission(rules, command, "0.0.0.0").via == SourceAddresses("192.0.2.2")


# -- CONNECT's connection ------------------------------------------------------------------------


def test_open_target_leaves_from_the_address_of_the_family() -> None:
    """The connection to the target comes from the source address, one target or several
    (Happy Eyeballs); a target of another family is not tried."""

    async def main() -> list[str]:
        seen: list[str] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("peername")[0])
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for source, infos in (
            (SourceAddresses("127.0.0.2"), [_info("127.0.0.1", port)]),
            (SourceAddresses("127.0.0.3", "::1"), [_info("127.0.0.1", port)] * 2),
        ):
            held = await open_target(infos, 5, SessionRecord("c", 0.0), source=source)
            assert held.transport is not None
            held.transport.close()
        with pytest.raises(NoSourceAddress):
            await open_target(
                [_info("127.0.0.1", port)],
                5,
                SessionRecord("c", 0.0),
                source=SourceAddresses(None, "::1"),
            )
        for _ in range(500):  # the accept callbacks run on the loop: wait for both
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        server.close()
        return seen

    assert sorted(asyncio.run(asyncio.wait_for(main(), 30))) == ["127.0.0.2", "127.0.0.3"]


def test_a_bound_source_socket_takes_its_port_at_connect() -> None:
    """The socket CONNECT binds to a source address gets no port at bind (so its port is
    chosen per target at connect, not from one range shared by every target)."""
    from socksd.outgoing import unbound_port_socket

    with unbound_port_socket(_info("127.0.0.1")) as sock:
        sock.bind(("127.0.0.2", 0))
        assert sock.getsockname() == ("127.0.0.2", 0)
