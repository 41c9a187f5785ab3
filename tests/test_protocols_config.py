"""``protocols`` (``--protocols``) and the rules' ``socks4`` key: values, defaults, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from socksd.config import ConfigError, build_config
from socksd.rules import RuleError, parse_ip, parse_ruleset


def test_protocols_default_to_socks5() -> None:
    assert build_config({}, {}).protocols == ("socks5",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["socks5", "socks4", "http"], ("socks5", "socks4", "http")),
        ("http,SOCKS4", ("http", "socks4")),  # the flag's form
        (["http", "http"], ("http",)),
    ],
)
def test_protocols(value: object, expected: tuple[str, ...]) -> None:
    assert build_config({"protocols": value}, {}).protocols == expected
    assert build_config({}, {"protocols": value}).protocols == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["socks5", "gopher"], "protocols: 'gopher' is not one of socks5, socks4, http"),
        ([], "protocols: serve at least one of socks5, socks4, http"),
        ("", "protocols: '' is not one of"),
        (5, "protocols: expected a list of protocol names"),
    ],
)
def test_protocols_errors_name_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"protocols": value}, {})
    text = str(info.value)
    assert text.startswith(message) and "\n" not in text


def test_the_flag_error_is_one_line() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "socksd",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--protocols",
            "socks5,socks6",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "protocols: 'socks6' is not one of" in lines[0], result.stderr


def test_socks4_rule_holds_its_clients_only() -> None:
    rules = parse_ruleset(
        [
            {"action": "allow", "clients": ["10.0.0.0/8"]},
            {"action": "allow", "clients": ["192.0.2.0/24"], "socks4": True},
        ]
    )
    inside, outside, other = (parse_ip(a) for a in ("192.0.2.7", "198.51.100.1", "10.1.1.1"))
    assert inside is not None and outside is not None and other is not None
    rule = rules.socks4_rule(inside)
    assert rule is not None and rule.number == 2
    assert rules.socks4_rule(outside) is None
    assert rules.socks4_rule(other) is None  # rule 1 lets it in, but not for SOCKS4
    assert "socks4=true" in rules.describe()[1]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"action": "allow", "clients": ["10.0.0.0/8"], "socks4": 1}, "expected true"),
        ({"action": "allow", "socks4": True}, "with clients and without users"),
        ({"action": "deny", "clients": ["10.0.0.0/8"], "socks4": True}, "only an allow rule"),
        (
            {"action": "allow", "clients": ["10.0.0.0/8"], "users": ["a"], "socks4": True},
            "without users",
        ),
    ],
)
def test_socks4_rule_errors(rule: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_ruleset([rule])
    assert str(info.value).startswith("rule 1.socks4: ") and message in str(info.value)
