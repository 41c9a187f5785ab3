"""Unit tests of the LDAP user store: the URL and ``[ldap]`` parsing (one-line errors naming the
key), the search filter's escaping, group names, ``@ldap:`` groups in rules, and the cache and
answers of :class:`~socksd.auth.ldap.LdapStore` that need no directory (the real directory is
in tests/e2e/test_ldap.py)."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from socksd.auth.ldapconfig import (
    LdapConfigError,
    check_ldap,
    parse_ldap_settings,
    parse_ldap_url,
)
from socksd.auth.stores import UserStoreError, is_directory, open_user_store
from socksd.auth.userpass import UserPassAuthenticator
from socksd.config import ConfigError, build_config, load_file
from socksd.protocol import Command
from socksd.rules import RuleError, parse_ruleset

ldap = pytest.importorskip("socksd.auth.ldap")  # needs ldap3

# -- the URL ------------------------------------------------------------------------------------


def test_url_defaults() -> None:
    url = parse_ldap_url("ldap://ldap.example.com/ou=people,dc=example,dc=com")
    assert (url.scheme, url.host, url.port, url.base) == (
        "ldap",
        "ldap.example.com",
        389,
        "ou=people,dc=example,dc=com",
    )
    assert (url.attr, url.scope, url.filter, url.tls) == ("uid", "sub", None, False)


def test_url_all_parts() -> None:
    url = parse_ldap_url(
        "LDAPS://[2001:db8::1]:1636/ou=My%20People,dc=ex?sAMAccountName?one?(objectClass=user)"
    )
    assert (url.host, url.port, url.tls) == ("2001:db8::1", 1636, True)
    assert (url.base, url.attr, url.scope, url.filter) == (
        "ou=My People,dc=ex",
        "sAMAccountName",
        "one",
        "(objectClass=user)",
    )
    assert url.where == "ldaps://[2001:db8::1]:1636"


def test_ldaps_default_port() -> None:
    assert parse_ldap_url("ldaps://h/dc=x").port == 636


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ldap://h", "users: no search base"),
        ("ldap://h/", "users: no search base"),
        ("ldap:///dc=x", "users: no directory host"),
        ("ldap://h:0/dc=x", "users: port '0' must be a number from 1 to 65535"),
        ("ldap://h:x/dc=x", "users: port 'x' must be"),
        ("ldap://cn=admin:pw@h/dc=x", "users: the URL must hold no credentials"),
        ("ldap://h/dc=x?u;id", "users: 'u;id' is not an attribute name"),
        ("ldap://h/dc=x?uid?deep", "users: scope 'deep' is not one of sub, one, base"),
        ("ldap://h/dc=x?uid?sub?objectClass=person", "is not an LDAP filter in parentheses"),
        ("ldap://h/dc=x?uid?sub?(a=b))(", "is not an LDAP filter in parentheses"),
        ("ldap://h/dc=x?uid?sub?(a=b)?ext", "users: URL extensions are not supported"),
        ("ldap://[::1/dc=x", "is not HOST[:PORT]"),
    ],
)
def test_url_errors_are_one_line(text: str, message: str) -> None:
    with pytest.raises(LdapConfigError) as info:
        parse_ldap_url(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# -- [ldap] -------------------------------------------------------------------------------------


def test_settings(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    settings = parse_ldap_settings(
        {
            "bind_dn": "cn=socksd,dc=ex",
            "bind_password_file": str(pw),
            "starttls": True,
            "timeout": 2,
            "pool_size": 8,
            "group_attr": "",
            "group_base": "ou=groups,dc=ex",
        }
    )
    assert settings.bind_password() == "s3cret"
    assert (settings.timeout, settings.pool_size, settings.group_attr) == (2.0, 8, None)
    assert "s3cret" not in repr(settings)


def test_bind_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = parse_ldap_settings({"bind_dn": "cn=s,dc=ex", "bind_password_env": "LDAP_PW"})
    monkeypatch.setenv("LDAP_PW", "from-env")
    assert settings.bind_password() == "from-env"
    monkeypatch.delenv("LDAP_PW")
    with pytest.raises(LdapConfigError, match=r"\$LDAP_PW is not set"):
        settings.bind_password()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("x", "ldap: expected a table"),
        ({"password": "x"}, "ldap: unknown key 'password'; known keys: bind_dn,"),
        ({"bind_dn": "admin"}, "ldap.bind_dn: expected a DN"),
        ({"bind_dn": "cn=a,dc=x"}, "ldap.bind_dn: needs its password"),
        ({"bind_password_file": "/p"}, "without bind_dn"),
        (
            {"bind_dn": "cn=a", "bind_password_file": "/p", "bind_password_env": "P"},
            "not both",
        ),
        ({"bind_password_env": "1X"}, "ldap.bind_password_env: '1X' is not"),
        ({"starttls": "yes"}, "ldap.starttls: expected true or false"),
        ({"timeout": 0}, "ldap.timeout: expected seconds (at least 0.1)"),
        ({"pool_size": 0}, "ldap.pool_size: expected 1 to 64"),
        ({"group_attr": "member of"}, "ldap.group_attr: 'member of' is not an attribute"),
    ],
)
def test_settings_errors_are_one_line(raw: object, message: str) -> None:
    with pytest.raises(LdapConfigError) as info:
        parse_ldap_settings(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_password_file(tmp_path: Path) -> None:
    settings = parse_ldap_settings(
        {"bind_dn": "cn=a,dc=x", "bind_password_file": str(tmp_path / "none")}
    )
    with pytest.raises(LdapConfigError, match=r"ldap\.bind_password_file: cannot read"):
        settings.bind_password()


@pytest.mark.parametrize(
    ("url", "settings", "message"),
    [
        ("ldaps://h/dc=x", {"starttls": True}, "ldap.starttls: ldaps:// is TLS already"),
        ("ldap://127.0.0.1/dc=x", {"ca_file": "/ca"}, "ldap.ca_file: used only with TLS"),
        ("ldap://ldap.example.com/dc=x", {}, "would carry passwords in clear"),
    ],
)
def test_url_and_settings_must_fit(url: str, settings: dict[str, object], message: str) -> None:
    with pytest.raises(LdapConfigError, match=message.replace(".", r"\.")):
        check_ldap(parse_ldap_url(url), parse_ldap_settings(settings))


@pytest.mark.parametrize(
    ("url", "settings"),
    [
        ("ldap://127.0.0.1/dc=x", {}),
        ("ldap://localhost/dc=x", {}),
        ("ldap://ldap.example.com/dc=x", {"starttls": True}),
        ("ldaps://ldap.example.com/dc=x", {"ca_file": "/ca"}),
        ("ldap://ldap.example.com/dc=x", {"plaintext": True}),
    ],
)
def test_url_and_settings_that_fit(url: str, settings: dict[str, object]) -> None:
    check_ldap(parse_ldap_url(url), parse_ldap_settings(settings))


# -- the config ---------------------------------------------------------------------------------


def test_config_keeps_the_url() -> None:
    config = build_config({"users": "ldap://127.0.0.1/dc=x", "users_cache_ttl": 5}, {})
    assert config.users == "ldap://127.0.0.1/dc=x"
    assert config.users_cache_ttl == 5.0
    assert config.auth_methods == ("userpass",)


def test_load_file_leaves_the_url_and_resolves_ldap_paths(tmp_path: Path) -> None:
    path = tmp_path / "socksd.toml"
    path.write_text(
        'users = "ldaps://127.0.0.1/dc=x"\n'
        '[ldap]\nbind_dn = "cn=a,dc=x"\nbind_password_file = "pw"\nca_file = "ca.pem"\n'
    )
    config = build_config(load_file(path), {})
    assert config.users == "ldaps://127.0.0.1/dc=x"
    assert config.ldap.bind_password_file == tmp_path / "pw"
    assert config.ldap.ca_file == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"users": "ldap://h"}, "users: no search base"),
        ({"ldap": {"starttls": True}}, "ldap: set but users is not an LDAP URL"),
        (
            {"users": "ldap://ldap.example.com/dc=x"},
            "users: ldap://ldap.example.com:389 would carry passwords in clear",
        ),
        (
            {"users": "ldap://127.0.0.1/dc=x", "ldap": {"timeout": 20}},
            "ldap.timeout: must be less than handshake_timeout (10s), got 20",
        ),
        (
            {"users": "/etc/users", "rules": [{"action": "allow", "users": ["@ldap:ops"]}]},
            "rule 1.users: @ldap:ops is a directory group, but users is not an LDAP directory",
        ),
        ({"users_cache_ttl": -1}, "users_cache_ttl: must be at least 0"),
    ],
)
def test_config_errors(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, {})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


# -- the filter and groups ----------------------------------------------------------------------


def test_user_filter_escapes_the_name() -> None:
    url = parse_ldap_url("ldap://h/dc=x")
    assert ldap.user_filter(url, "alice") == "(uid=alice)"
    assert ldap.user_filter(url, "*") == r"(uid=\2a)"
    assert ldap.user_filter(url, "a)(uid=*") == r"(uid=a\29\28uid=\2a)"
    assert ldap.user_filter(url, "back\\slash") == r"(uid=back\5cslash)"
    assert ldap.user_filter(url, "nul\0") == r"(uid=nul\00)"


def test_user_filter_with_the_url_filter() -> None:
    url = parse_ldap_url("ldap://h/dc=x?cn?sub?(objectClass=person)")
    assert ldap.user_filter(url, "a*") == r"(&(cn=a\2a)(objectClass=person))"


def test_group_filter_escapes_dn_and_name() -> None:
    assert ldap.group_filter("uid=a(b),dc=x", "a*") == (
        r"(|(member=uid=a\28b\29,dc=x)(uniqueMember=uid=a\28b\29,dc=x)(memberUid=a\2a))"
    )


@pytest.mark.parametrize(
    ("dn", "name"),
    [
        ("cn=Proxy-Users,ou=groups,dc=example,dc=test", "ldap:proxy-users"),
        ("CN=Staff,OU=Teams,DC=ex", "ldap:staff"),
        ("cn=a\\,b,dc=x", "ldap:a\\,b"),
        ("not a dn", None),
    ],
)
def test_group_name(dn: str, name: str | None) -> None:
    assert ldap.group_name(dn) == name


# -- @ldap: groups in rules ---------------------------------------------------------------------


def test_rule_matches_directory_groups() -> None:
    rules = parse_ruleset(
        [{"action": "allow", "users": ["carol", "@ldap:Proxy-Users"]}], {}, "deny", False
    )
    rule = rules.rules[0]
    assert rule.users == frozenset({"carol"})
    assert rule.user_groups == frozenset({"ldap:proxy-users"})
    client = (4, 0x7F000001)
    connect = Command.CONNECT

    def allowed(user: str | None, groups: frozenset[str] = frozenset()) -> bool:
        decision = rules.check_request(client, user, connect, "127.0.0.1", 80, groups=groups)
        return decision.allowed  # type: ignore[union-attr]

    assert allowed("alice", frozenset({"ldap:proxy-users"}))
    assert allowed("carol")
    assert not allowed("alice")
    assert not allowed("alice", frozenset({"ldap:other"}))
    assert not allowed(None, frozenset({"ldap:proxy-users"}))  # no user never matches users


def test_group_in_groups_table_may_name_a_directory_group() -> None:
    rules = parse_ruleset(
        [{"action": "allow", "users": ["@staff"]}], {"staff": ["bob", "@ldap:ops"]}, "deny", False
    )
    assert rules.rules[0].users == frozenset({"bob"})
    assert rules.rules[0].user_groups == frozenset({"ldap:ops"})


def test_directory_group_needs_a_name() -> None:
    with pytest.raises(RuleError, match=r"rule 1\.users: '@ldap:' names no group"):
        parse_ruleset([{"action": "allow", "users": ["@ldap:"]}], {}, "deny", False)


# -- the store (what the authenticator asks; its cache is tests/auth/test_stores.py's) ----------

CLOSED_PORT = 21199
"""A loopback port of this test's range where nothing listens: a directory that is down."""


def store(url: str = "ldap://127.0.0.1/dc=x", **settings: object) -> ldap.LdapStore:
    return ldap.LdapStore(parse_ldap_url(url), parse_ldap_settings(settings), cache_ttl=300)


def test_open_user_store_picks_ldap_for_an_ldap_url() -> None:
    opened = open_user_store(
        "ldaps://127.0.0.1/dc=x",
        cache_ttl=60,
        timeout=99,
        ldap=parse_ldap_settings({"timeout": 2, "pool_size": 3}),
    )
    assert isinstance(opened, ldap.LdapStore)
    assert (opened.kind, opened.threads, opened.timeout, opened.cache_ttl) == ("ldap", 3, 2, 60)
    assert opened.describe() == (
        "users from ldaps://127.0.0.1:636/dc=x?uid?sub (ldaps, searched as anonymous, groups "
        "from memberOf)"
    )
    assert is_directory("ldap://h/dc=x") and is_directory("LDAPS://h/dc=x")


def test_open_user_store_names_the_ldap_key_at_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOCKSD_TEST_LDAP_PW", raising=False)
    settings = parse_ldap_settings(
        {"bind_dn": "cn=socksd,dc=x", "bind_password_env": "SOCKSD_TEST_LDAP_PW"}
    )
    with pytest.raises(UserStoreError) as e:
        open_user_store("ldap://127.0.0.1/dc=x", cache_ttl=60, timeout=5, ldap=settings)
    assert e.value.keyed
    assert str(e.value).startswith("ldap.bind_password_env: $SOCKSD_TEST_LDAP_PW is not set")


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"", b"pw"),
        (b"alice", b""),  # an unauthenticated bind: many directories answer success
        (b"\xff", b"pw"),
        (b"al\0ice", b"pw"),
        (b"alice", b"p\0w"),
        (b"a" * 256, b"pw"),
        (b"alice", b"p" * 256),
    ],
)
def test_impossible_logins_never_reach_the_directory(username: bytes, password: bytes) -> None:
    assert store().refuse(username, password)
    assert not store().refuse(b"alice", b"pw")


def test_the_token_is_the_directory_so_a_changed_one_starts_afresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload keeps the verified logins when nothing about the directory changed, including
    the search bind's password read afresh."""
    monkeypatch.setenv("SOCKSD_TEST_LDAP_PW", "one")
    bound = {"bind_dn": "cn=socksd,dc=x", "bind_password_env": "SOCKSD_TEST_LDAP_PW"}
    first = store(**bound).token("alice")
    assert store(**bound).token("bob") == first
    monkeypatch.setenv("SOCKSD_TEST_LDAP_PW", "two")
    assert store(**bound).token("alice") != first
    assert store().token("alice") != store("ldap://127.0.0.1/dc=y").token("alice")


def test_a_directory_that_is_down_is_unavailable_not_a_wrong_password() -> None:
    down = store(f"ldap://127.0.0.1:{CLOSED_PORT}/dc=x", timeout=1)
    try:
        verdict = down.check("alice", down.token("alice"), b"pw", "192.0.2.1")
    finally:
        down.close()
    assert not verdict.ok
    assert verdict.unavailable is not None
    assert verdict.unavailable.startswith(f"ldap://127.0.0.1:{CLOSED_PORT}: cannot connect")


def test_an_unexpected_error_is_unavailability(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug or a surprise of the client library refuses the login, it does not stall it."""
    broken = store()

    def fail(name: str, password: bytes) -> None:
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(broken, "_check", fail)
    verdict = broken.check("alice", broken.token("alice"), b"pw", None)
    assert not verdict.ok
    assert verdict.unavailable is not None and "unexpected error" in verdict.unavailable


def test_the_authenticator_passes_groups_and_unavailability_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the one authenticator every store has: groups reach the verdict and stay with
    the cached login; an outage is an answer of its own, never cached."""
    directory = store()
    answers = [None, frozenset({"ldap:ops"})]

    def check(name: str, password: bytes) -> frozenset[str] | None:
        if not answers:
            raise ldap.UserStoreUnavailable("ldap://127.0.0.1:389: search failed: down")
        return answers.pop(0)

    monkeypatch.setattr(directory, "_check", check)
    auth = UserPassAuthenticator(directory)

    async def main() -> None:
        assert not (await auth.verify(b"alice", b"bad")).ok
        verdict = await auth.verify(b"alice", b"pw")
        assert verdict.ok and verdict.groups == {"ldap:ops"}
        cached = auth.cached(b"alice", b"pw")
        assert cached is not None and cached.groups == {"ldap:ops"}
        down = await auth.verify(b"bob", b"pw")
        assert (down.ok, down.unavailable) == (False, "ldap://127.0.0.1:389: search failed: down")

    try:
        asyncio.run(main())
    finally:
        auth.close()
