"""Config: defaults, TOML + flag merging, validation messages, the open-proxy guard."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from socksd.config import Config, ConfigError, ListenAddress, build_config, load_file
from socksd.fdlimit import default_max_sessions


def test_defaults_are_safe() -> None:
    config = build_config({}, {})
    # max_sessions: the default, or what this machine's open-files limit holds (tests/test_fdlimit)
    assert config.max_sessions == default_max_sessions(1)
    assert dataclasses.replace(config, max_sessions=Config().max_sessions) == Config()
    assert [str(a) for a in config.listen] == ["127.0.0.1:1080"]
    assert config.users is None and not config.allow_open


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:1080", "127.0.0.1", 1080),
        ("[::1]:0", "::1", 0),
        ("localhost:9", "localhost", 9),
        ("0.0.0.0:65535", "0.0.0.0", 65535),
    ],
)
def test_listen_address_parse(text: str, host: str, port: int) -> None:
    address = ListenAddress.parse(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text


@pytest.mark.parametrize("text", ["1080", "::1:1080", "[::1]1080", "host:port", "h:70000", ":1080"])
def test_listen_address_errors_name_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^listen: "):
        ListenAddress.parse(text)


def test_flags_override_file() -> None:
    config = build_config(
        {"listen": ["127.0.0.1:1"], "connect_timeout": 3, "idle_timeout": 7},
        {"connect_timeout": 1.5, "listen": None, "idle_timeout": None},
    )
    assert config.connect_timeout == 1.5
    assert config.idle_timeout == 7.0
    assert str(config.listen[0]) == "127.0.0.1:1"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nope": 1}, "unknown key 'nope'"),
        ({"handshake_timeout": "10"}, "handshake_timeout: expected a number"),
        ({"handshake_timeout": -1}, "handshake_timeout: must be at least"),
        ({"max_sessions": 1.5}, "max_sessions: expected a whole number"),
        ({"allow_open": "yes"}, "allow_open: expected true or false"),
        ({"log_format": "xml"}, "log_format: 'xml' is not one of text, json"),
        ({"listen": []}, "listen: expected a list"),
        ({"hosts": {"a": ["not-an-ip"]}}, "hosts.a: 'not-an-ip' is not an IP address"),
        ({"workers": -1}, "workers: must be at least 0"),
    ],
)
def test_errors_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, {})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("listen", ["0.0.0.0:1080", "[::]:1080", "192.0.2.1:1080"])
def test_open_proxy_refused_on_reachable_address(listen: str) -> None:
    with pytest.raises(ConfigError, match="--allow-open"):
        build_config({"listen": [listen]}, {})
    assert build_config({"listen": [listen], "allow_open": True}, {}).allow_open
    assert build_config({"listen": [listen], "users": "/x"}, {}).requires_auth


@pytest.mark.parametrize("listen", ["127.0.0.1:1080", "127.9.9.9:1", "[::1]:1080", "localhost:1"])
def test_loopback_needs_no_auth(listen: str) -> None:
    assert build_config({"listen": [listen]}, {}).listen[0].is_loopback


def test_workers_auto_is_zero() -> None:
    assert build_config({"workers": "auto"}, {}).workers == 0


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "socksd.toml"
    path.write_text(
        'listen = ["127.0.0.1:0"]\nusers = "users.htpasswd"\n[hosts]\n"a.test" = ["127.0.0.1"]\n'
    )
    values = load_file(path)
    config = build_config(values, {})
    assert config.users == tmp_path / "users.htpasswd"
    assert config.hosts == {"a.test": ("127.0.0.1",)}


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_file(bad)


# -- BIND and UDP ASSOCIATE settings (issue 3) -----------------------------------------------------


def test_bind_udp_defaults() -> None:
    from socksd.protocol import Command

    config = Config()
    assert config.commands == (Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE)
    assert config.bind_timeout == 60.0
    assert config.udp_idle_timeout == 300.0
    assert config.advertise is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["connect"], (1,)),
        (["udp", "BIND"], (3, 2)),
        ("connect,udp", (1, 3)),  # the flag's form
        (["bind", "bind"], (2,)),
    ],
)
def test_commands(value: object, expected: tuple[int, ...]) -> None:
    assert build_config({"commands": value}, {}).commands == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"commands": ["connect", "associate"]},
            "commands: 'associate' is not one of connect, bind, udp",
        ),
        ({"commands": []}, "commands: serve at least one of"),
        ({"commands": 3}, "commands: expected a list"),
        ({"bind_timeout": 0}, "bind_timeout: must be at least 0.001"),
        ({"udp_idle_timeout": -1}, "udp_idle_timeout: must be at least 0"),
        ({"external_address": "nat.example"}, "external_address: expected the IP address"),
        ({"external_address": "1.2.3.4:1080"}, "external_address: expected the IP address"),
        ({"external_address": "0.0.0.0"}, "which no client can reach"),
        ({"external_address": 5}, "external_address: expected the IP address"),
    ],
)
def test_bind_udp_errors_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, {})
    assert message in str(info.value)
    assert str(info.value).startswith(next(iter(values)) + ": ")


def test_external_address_normalized() -> None:
    assert build_config({"external_address": "[2001:DB8::1]"}, {}).advertise == "2001:db8::1"
    assert build_config({"external_address": ""}, {}).advertise is None


def test_bind_udp_flags_mirror_keys() -> None:
    from socksd.cli import config_from_args, make_parser

    args = make_parser().parse_args(
        [
            "serve",
            "--commands",
            "connect,udp",
            "--bind-timeout",
            "5",
            "--udp-idle-timeout",
            "0",
            "--external-address",
            "192.0.2.1",
        ]
    )
    config = config_from_args(args)
    assert config.commands == (1, 3)
    assert config.bind_timeout == 5.0
    assert config.udp_idle_timeout == 0.0
    assert config.advertise == "192.0.2.1"


# -- authentication methods and GSSAPI keys ----------------------------------------------------


@pytest.mark.parametrize(
    ("values", "methods"),
    [
        ({}, ("none",)),
        ({"users": "u"}, ("userpass",)),
        ({"gssapi_keytab": "k"}, ("gssapi",)),
        ({"gssapi_service": "socks"}, ("gssapi",)),
        ({"gssapi_keytab": "k", "users": "u"}, ("gssapi", "userpass")),
        ({"methods": "userpass,gssapi", "users": "u"}, ("userpass", "gssapi")),
        ({"methods": ["gssapi", "none"]}, ("gssapi", "none")),
        ({"methods": " GSSAPI , None "}, ("gssapi", "none")),
    ],
)
def test_methods_derived_or_given(values: dict[str, object], methods: tuple[str, ...]) -> None:
    config = build_config(values, {})
    assert config.auth_methods == methods
    assert config.requires_auth is ("none" not in methods)


def test_gssapi_defaults_and_values() -> None:
    config = build_config({}, {})
    assert config.service == "rcmd"
    assert config.gssapi_levels == (1, 2, 3)
    config = build_config({"gssapi_levels": [2, 1, 2]}, {"gssapi_levels": None})
    assert config.gssapi_levels == (2, 1)
    config = build_config({"gssapi_levels": [1]}, {"gssapi_levels": "3, 2"})
    assert config.gssapi_levels == (3, 2)
    assert build_config({"gssapi_service": "socks"}, {}).service == "socks"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"methods": "kerberos"}, "methods: 'kerberos' is not one of gssapi, userpass, none"),
        ({"methods": []}, "methods: give each method once"),
        ({"methods": "none,none"}, "methods: give each method once"),
        ({"methods": 3}, "methods: expected a list"),
        ({"methods": "userpass"}, "methods: userpass needs a user file"),
        ({"methods": "none", "users": "u"}, "users: a user file is given but methods"),
        ({"methods": "userpass", "users": "u", "gssapi_keytab": "k"}, "gssapi_keytab/"),
        ({"gssapi_levels": []}, "gssapi_levels: expected a list"),
        ({"gssapi_levels": [0]}, "gssapi_levels: 0 is not a protection level"),
        ({"gssapi_levels": [True]}, "gssapi_levels: True is not a protection level"),
        ({"gssapi_levels": "1,x"}, "gssapi_levels: 'x' is not a protection level"),
        ({"gssapi_service": "rcmd/host"}, "gssapi_service: 'rcmd/host' is not a service name"),
        ({"gssapi_service": ""}, "gssapi_service: '' is not a service name"),
        ({"gssapi_keytab": 5}, "gssapi_keytab: expected the path of a Kerberos keytab"),
    ],
)
def test_method_errors_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message[:20]}") as info:
        build_config(values, {})
    assert message in str(info.value)


def test_open_proxy_guard_counts_none_among_methods() -> None:
    exposed = {"listen": ["0.0.0.0:1080"]}
    build_config({**exposed, "gssapi_keytab": "k"}, {})
    build_config({**exposed, "methods": "gssapi,userpass", "users": "u", "gssapi_keytab": "k"}, {})
    with pytest.raises(ConfigError, match="open proxy"):
        build_config({**exposed, "methods": "gssapi,none", "gssapi_keytab": "k"}, {})
    build_config({**exposed, "methods": "gssapi,none", "allow_open": True}, {})


def test_keytab_path_relative_to_config_file(tmp_path: Path) -> None:
    path = tmp_path / "socksd.toml"
    path.write_text('gssapi_keytab = "krb/socksd.keytab"\n')
    assert load_file(path)["gssapi_keytab"] == str(tmp_path / "krb" / "socksd.keytab")


# -- login throttle ------------------------------------------------------------------------------


def test_login_throttle_defaults_and_flags() -> None:
    from socksd.cli import config_from_args, make_parser

    config = build_config({}, {})
    assert (config.auth_delay, config.effective_max_auth_delay) == (0.5, 5.0)
    assert (config.max_auth_checks_per_ip, config.auth_block) == (4, False)
    # the default cap stays below a short handshake timeout; an explicit one is taken as is
    assert build_config({"handshake_timeout": 2}, {}).effective_max_auth_delay == 1.0
    assert build_config({"max_auth_delay": 8}, {}).effective_max_auth_delay == 8.0
    args = make_parser().parse_args(
        [
            "serve",
            "--auth-delay",
            "0.1",
            "--max-auth-delay",
            "2",
            "--max-auth-checks-per-ip",
            "1",
            "--auth-block",
        ]
    )
    config = config_from_args(args)
    assert (config.auth_delay, config.max_auth_delay) == (0.1, 2.0)
    assert (config.max_auth_checks_per_ip, config.auth_block) == (1, True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"auth_delay": -1}, "auth_delay: must be at least 0"),
        ({"auth_delay": "1s"}, "auth_delay: expected a number"),
        ({"max_auth_delay": 10}, "max_auth_delay: must be less than handshake_timeout (10s)"),
        (
            {"max_auth_delay": 3, "handshake_timeout": 2},
            "max_auth_delay: must be less than handshake_timeout (2s), got 3",
        ),
        ({"max_auth_checks_per_ip": 1.5}, "max_auth_checks_per_ip: expected a whole number"),
        ({"max_auth_checks_per_ip": -1}, "max_auth_checks_per_ip: must be at least 0"),
        ({"auth_block": "on"}, "auth_block: expected true or false"),
    ],
)
def test_login_throttle_errors_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, {})
    assert message in str(info.value)
    assert "\n" not in str(info.value)
