"""Upstream proxies: the ``[upstreams]`` table, ``upstream`` (global and per rule), validation,
passwords read at derive (file or environment, never in the config), and routing by the rules."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from socksd.config import ConfigError, build_config, load_file
from socksd.protocol import Command
from socksd.rules import Decision, NeedAddresses, parse_ruleset
from socksd.server.process.context import derive
from socksd.upstreams import UpstreamSpec

CLIENT = (4, int(ipaddress.ip_address("10.1.2.3")))
"""A client outside loopback: protect_local applies to it."""


def upstreams(**extra: Any) -> dict[str, Any]:
    return {"corp": {"proxy": "socks5://10.0.0.1:1080", **extra}}


def test_table_and_global_upstream() -> None:
    config = build_config({"upstreams": upstreams(), "upstream": "corp"}, {})
    assert config.upstreams == {"corp": UpstreamSpec("corp", "10.0.0.1", 1080)}
    assert config.upstream == "corp"
    assert config.rules.upstream == "corp"


def test_flag_overrides_the_global_upstream() -> None:
    config = build_config({"upstreams": upstreams(), "upstream": "corp"}, {"upstream": "direct"})
    assert config.upstream is None and config.rules.upstream is None


def test_upstream_flag() -> None:
    from socksd.cli import config_from_args, make_parser

    args = make_parser().parse_args(["serve", "--upstream", "direct"])
    assert config_from_args(args).upstream is None
    args = make_parser().parse_args(["serve", "--upstream", "corp"])
    with pytest.raises(ConfigError, match=r"upstream: 'corp' is not in \[upstreams\]"):
        config_from_args(args)


def test_ipv6_and_default_port() -> None:
    config = build_config({"upstreams": {"v6": {"proxy": "socks5://[2001:db8::1]"}}}, {})
    spec = config.upstreams["v6"]
    assert (spec.host, spec.port, spec.where) == ("2001:db8::1", 1080, "[2001:db8::1]:1080")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"upstream": "corp"}, "upstream: 'corp' is not in [upstreams] (known: direct)"),
        (
            {"upstreams": upstreams(), "upstream": "crop"},
            "upstream: 'crop' is not in [upstreams] (known: corp, direct)",
        ),
        (
            {"upstreams": upstreams(), "rules": [{"action": "allow", "upstream": "crop"}]},
            "rule 1.upstream: 'crop' is not in [upstreams] (known: corp, direct)",
        ),
        (
            {"upstreams": upstreams(), "rules": [{"action": "deny", "upstream": "corp"}]},
            "rule 1.upstream: only allow rules send requests anywhere",
        ),
        (
            {"rules": [{"action": "allow", "upstream": 3}]},
            'rule 1.upstream: expected the name of an [upstreams] entry or "direct"',
        ),
        ({"upstreams": {"direct": {"proxy": "h:1"}}}, 'upstreams.direct: "direct" means'),
        ({"upstreams": {"a b": {"proxy": "h:1"}}}, "upstreams: 'a b' is not an upstream name"),
        ({"upstreams": {"corp": {}}}, 'upstreams.corp.proxy: expected "socks5://'),
        ({"upstreams": {"corp": {"proxy": "http://h:1"}}}, "upstreams.corp.proxy: not a socks5"),
        ({"upstreams": {"corp": {"proxy": "socks5://h:99999"}}}, "upstreams.corp.proxy: Port"),
        (
            {"upstreams": {"corp": {"proxy": "socks5://u:secret@h:1"}}},
            "upstreams.corp.proxy: no password in the URL",
        ),
        (
            {"upstreams": {"corp": {"proxy": "socks5://u@h:1"}}},
            "upstreams.corp: user 'u' needs a password: password_file or password_env",
        ),
        (
            {"upstreams": upstreams(password_env="PW")},
            "upstreams.corp.proxy: a password is given but no user",
        ),
        (
            {
                "upstreams": {
                    "corp": {
                        "proxy": "socks5://u@h:1",
                        "password_env": "PW",
                        "password_file": "/p",
                    }
                }
            },
            "upstreams.corp: give password_file or password_env, not both",
        ),
        (
            {"upstreams": {"corp": {"proxy": "socks5://u@h:1", "password_env": "1X"}}},
            "upstreams.corp.password_env: expected an environment variable name",
        ),
        ({"upstreams": upstreams(user="u")}, "upstreams.corp: unknown key 'user'"),
        ({"upstreams": upstreams(gssapi_service="a@b")}, "upstreams.corp.gssapi_service:"),
        (
            {"upstreams": upstreams(gssapi_service="rcmd", gssapi_level=3)},
            "upstreams.corp.gssapi_level: expected 1 (integrity) or 2",
        ),
        ({"upstreams": upstreams(gssapi_level=1)}, "upstreams.corp.gssapi_level: set gssapi_"),
        ({"upstreams": ["corp"]}, "upstreams: expected a table"),
    ],
)
def test_errors_name_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, {})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("listen", "proxy"),
    [
        ("127.0.0.1:1080", "socks5://127.0.0.1:1080"),
        ("0.0.0.0:1080", "socks5://localhost:1080"),
        ("[::]:1080", "socks5://[::1]:1080"),
    ],
)
def test_an_upstream_that_is_this_server_is_refused(listen: str, proxy: str) -> None:
    values = {"listen": [listen], "allow_open": True, "upstreams": {"me": {"proxy": proxy}}}
    with pytest.raises(ConfigError, match=r"upstreams\.me\.proxy: .* this server's own listen"):
        build_config(values, {})
    values["upstreams"] = {"me": {"proxy": proxy.replace("1080", "1081")}}
    build_config(values, {})


def test_password_from_a_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "corp.pass").write_text("pa ss\nignored second line\n")
    conf = tmp_path / "socksd.toml"
    conf.write_text(
        '[upstreams.corp]\nproxy = "socks5://bob@10.0.0.1:1080"\npassword_file = "corp.pass"\n'
    )
    config = build_config(load_file(conf), {})
    spec = config.upstreams["corp"]
    assert spec.password_file == tmp_path / "corp.pass"
    assert "pa ss" not in repr(config)  # the config never holds it
    parts = derive(config)
    parts.close()
    proxy = parts.upstreams["corp"]
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        "10.0.0.1",
        1080,
        "bob",
        "pa ss",
    )
    assert "pa ss" not in repr(proxy)
    assert "corp.pass" in spec.describe() and "pa ss" not in spec.describe()


def test_password_file_problems_are_config_errors(tmp_path: Path) -> None:
    values = {
        "upstreams": {
            "corp": {"proxy": "socks5://bob@h:1", "password_file": str(tmp_path / "nope")}
        }
    }
    with pytest.raises(ConfigError, match=r"upstreams.corp.password_file: cannot read .*nope"):
        derive(build_config(values, {}))
    (tmp_path / "nope").write_text("\n")
    with pytest.raises(ConfigError, match=r"upstreams\.corp\.password_file: the first line"):
        derive(build_config(values, {}))


def test_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"upstreams": {"corp": {"proxy": "socks5://bob@h:1", "password_env": "CORP_PW"}}}
    config = build_config(values, {})
    monkeypatch.delenv("CORP_PW", raising=False)
    with pytest.raises(ConfigError, match=r"upstreams.corp.password_env: \$CORP_PW is not set"):
        derive(config)
    monkeypatch.setenv("CORP_PW", "from-env")
    parts = derive(config)
    parts.close()
    assert parts.upstreams["corp"].password == "from-env"


def test_gssapi_options() -> None:
    config = build_config({"upstreams": upstreams(gssapi_service="socks", gssapi_level=1)}, {})
    parts = derive(config)
    parts.close()
    gssapi = parts.upstreams["corp"].gssapi
    assert gssapi is not None and (gssapi.service, gssapi.level) == ("socks", 1)


# -- routing by the rules ------------------------------------------------------------------------


def routed(rules: list[dict[str, Any]], upstream: str | None, host: str) -> str | None:
    """The route of a CONNECT to host:443 from CLIENT: the upstream name, or None (direct);
    a name whose addresses the rules need resolves to 192.0.2.1."""
    ruleset = parse_ruleset(rules, upstreams=("corp", "lab"), upstream=upstream)
    decision = ruleset.check_request(CLIENT, None, Command.CONNECT, host, 443)
    if isinstance(decision, NeedAddresses):  # a direct name: its addresses are checked
        decision = ruleset.check_address(
            CLIENT, None, Command.CONNECT, name=host, address="192.0.2.1", port=443
        )
    assert isinstance(decision, Decision) and decision.allowed
    return ruleset.route(decision)


def test_global_upstream_routes_everything() -> None:
    assert routed([], "corp", "example.org") == "corp"
    assert routed([], "corp", "192.0.2.1") == "corp"


def test_rule_upstream_wins_over_the_global_one() -> None:
    rules = [
        {"action": "allow", "to": ["*.lab.example"], "upstream": "lab"},
        {"action": "allow", "to": ["intranet.example"], "upstream": "direct"},
        {"action": "allow", "ports": [22], "upstream": "direct"},
    ]
    assert routed(rules, "corp", "www.lab.example") == "lab"
    assert routed(rules, "corp", "intranet.example") is None
    assert routed(rules, "corp", "other.example") == "corp"
    assert routed(rules, None, "other.example") is None  # no global: direct
    assert routed(rules[:1], "corp", "192.0.2.7") == "corp"


def test_a_name_sent_upstream_is_not_resolved_here() -> None:
    """protect_local needs the addresses of a name connected to directly; a name the upstream
    resolves is decided by the rules by name."""
    ruleset = parse_ruleset(
        [{"action": "allow", "to": ["*.corp.example"], "upstream": "corp"}],
        upstreams=("corp",),
    )
    decision = ruleset.check_request(CLIENT, None, Command.CONNECT, "git.corp.example", 22)
    assert isinstance(decision, Decision) and ruleset.route(decision) == "corp"
    # connected to directly: the addresses are needed (protect_local)
    direct = ruleset.check_request(CLIENT, None, Command.CONNECT, "www.example", 443)
    assert isinstance(direct, NeedAddresses)


def test_a_network_rule_still_needs_the_addresses() -> None:
    """A rule with `to` networks matches a name by its addresses, so the name is resolved here
    even when the request ends up going upstream."""
    ruleset = parse_ruleset(
        [{"action": "deny", "to": ["10.0.0.0/8"]}], upstreams=("corp",), upstream="corp"
    )
    decision = ruleset.check_request(CLIENT, None, Command.CONNECT, "a.example", 443)
    assert isinstance(decision, NeedAddresses)
    allowed = ruleset.check_address(
        CLIENT, None, Command.CONNECT, name="a.example", address="192.0.2.1", port=443
    )
    assert allowed.allowed and ruleset.route(allowed) == "corp"
    denied = ruleset.check_address(
        CLIENT, None, Command.CONNECT, name="a.example", address="10.1.1.1", port=443
    )
    assert not denied.allowed


def test_describe_shows_the_routes() -> None:
    ruleset = parse_ruleset(
        [{"action": "allow", "ports": [22], "upstream": "direct"}],
        upstreams=("corp",),
        upstream="corp",
    )
    lines = ruleset.describe()
    assert lines[0] == "rule 1: allow ports=22 upstream=direct"
    assert lines[-1].startswith("upstream: corp")


def test_requests_without_a_destination_take_the_route_of_a_rule_without_one() -> None:
    """UDP ASSOCIATE and a BIND for any peer: a rule with `to` may let them through, but their
    route is that of the first allow rule for the command that names no destination."""
    ruleset = parse_ruleset(
        [
            {"action": "allow", "to": ["10.0.0.0/8"], "upstream": "corp"},
            {"action": "allow", "commands": ["udp"], "upstream": "direct"},
            {"action": "allow", "commands": ["bind"], "upstream": "lab"},
        ],
        upstreams=("corp", "lab"),
        upstream="corp",
    )
    decision = ruleset.check_open_request(CLIENT, None, Command.UDP_ASSOCIATE)
    assert decision.allowed and decision.label == "rule 1"
    assert ruleset.open_route(CLIENT, None, Command.UDP_ASSOCIATE) is None
    assert ruleset.open_route(CLIENT, None, Command.BIND) == "lab"
    only_to = parse_ruleset(
        [{"action": "allow", "to": ["10.0.0.0/8"], "upstream": "direct"}],
        upstreams=("corp",),
        upstream="corp",
    )
    assert only_to.open_route(CLIENT, None, Command.BIND) == "corp"  # the global one
