"""Config: defaults, TOML + flag merging, validation messages, the open-proxy guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from socksd.config import Config, ConfigError, ListenAddress, build_config, load_file


def test_defaults_are_safe() -> None:
    config = build_config({}, {})
    assert config == Config()
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
