"""The LDAP user store's settings, checked: the ``users = "ldap://..."`` URL and the ``[ldap]``
table. Pure parsing, no ldap3 (a config naming no directory loads without it).

The URL follows RFC 4516 as Apache's ``AuthLDAPURL`` uses it::

    ldap[s]://HOST[:PORT]/BASE[?ATTR[?SCOPE[?FILTER]]]

``BASE`` is the DN users are searched under (percent-encoded where needed, ``%20`` a space);
``ATTR`` the attribute holding the login name (default ``uid``); ``SCOPE`` ``sub`` (default),
``one`` or ``base``; ``FILTER`` an extra filter every user entry must match, such as
``(objectClass=posixAccount)``. ``ldaps://`` is TLS from the first byte (port 636); ``ldap://``
is plain (port 389) unless ``[ldap] starttls = true``. The URL holds no credentials: the search
bind's DN is ``[ldap] bind_dn`` and its password comes from a file or the environment, as for
upstream proxies (``socksd.upstreams``).

A password sent to a directory over plain LDAP crosses the network in clear, so plain ``ldap://``
without StartTLS is accepted for a loopback host only, unless ``[ldap] plaintext = true`` says the
network is trusted.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from socksd.secret import SecretError, read_secret

SCHEMES = ("ldap", "ldaps")
SCOPES = ("sub", "one", "base")
DEFAULT_PORTS = {"ldap": 389, "ldaps": 636}
DEFAULT_TIMEOUT = 5.0
DEFAULT_POOL_SIZE = 4

LDAP_KEYS = (
    "bind_dn",
    "bind_password_file",
    "bind_password_env",
    "starttls",
    "ca_file",
    "timeout",
    "pool_size",
    "group_attr",
    "group_base",
    "plaintext",
)
"""The keys of the ``[ldap]`` table."""

_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL_FORM = "ldap[s]://HOST[:PORT]/BASE[?ATTR[?SCOPE[?FILTER]]]"


class LdapConfigError(ValueError):
    """An LDAP setting is wrong; the message names the key and how to write it."""


def is_ldap_url(text: object) -> bool:
    """True when ``text`` names the LDAP user store (``ldap://`` or ``ldaps://``)."""
    return isinstance(text, str) and text.lower().startswith(("ldap://", "ldaps://"))


@dataclass(frozen=True, slots=True)
class LdapUrl:
    """``users = "ldap[s]://..."``: where the directory is and how users are found in it."""

    scheme: str
    host: str
    port: int
    base: str
    attr: str = "uid"
    scope: str = "sub"
    filter: str | None = None

    @property
    def tls(self) -> bool:
        """TLS from the first byte (``ldaps://``)."""
        return self.scheme == "ldaps"

    @property
    def where(self) -> str:
        """``ldap[s]://host:port`` (no base), for logs."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        text = f"{self.where}/{self.base}?{self.attr}?{self.scope}"
        return text + (f"?{self.filter}" if self.filter else "")


def parse_ldap_url(text: str, key: str = "users") -> LdapUrl:
    """Parse ``ldap[s]://HOST[:PORT]/BASE[?ATTR[?SCOPE[?FILTER]]]``; LdapConfigError if wrong."""
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise LdapConfigError(f"{key}: {text!r} is not an LDAP URL; write {_URL_FORM}")
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        raise LdapConfigError(
            f"{key}: the URL must hold no credentials; give [ldap] bind_dn and "
            "bind_password_file (or bind_password_env)"
        )
    host, port = _host_port(authority, scheme, key)
    dn, _, query = tail.partition("?")
    base = unquote(dn).strip()
    if not slash or not base or "=" not in base:
        raise LdapConfigError(
            f"{key}: no search base in {text!r}; write {_URL_FORM}, e.g. "
            "ldap://ldap.example.com/ou=people,dc=example,dc=com"
        )
    parts = query.split("?", 2) if query else []
    attr = unquote(parts[0]) if parts and parts[0] else "uid"
    if not _ATTR.fullmatch(attr):
        raise LdapConfigError(
            f"{key}: {attr!r} is not an attribute name (the user attribute, e.g. uid)"
        )
    scope = unquote(parts[1]).lower() if len(parts) > 1 and parts[1] else "sub"
    if scope not in SCOPES:
        raise LdapConfigError(f"{key}: scope {scope!r} is not one of {', '.join(SCOPES)}")
    user_filter = unquote(parts[2]).strip() if len(parts) > 2 and parts[2] else None
    if user_filter is not None:
        if "?" in user_filter:
            raise LdapConfigError(f"{key}: URL extensions are not supported; write {_URL_FORM}")
        check_filter(user_filter, key)
    return LdapUrl(scheme, host, port, base, attr, scope, user_filter)


def _host_port(authority: str, scheme: str, key: str) -> tuple[str, int]:
    if authority.startswith("["):
        host, sep, after = authority[1:].partition("]")
        if not sep or (after and not after.startswith(":")):
            raise LdapConfigError(f"{key}: {authority!r} is not HOST[:PORT] (IPv6 as [::1]:389)")
        port_text = after[1:]
    else:
        host, _, port_text = authority.partition(":")
    if not host:
        raise LdapConfigError(f"{key}: no directory host; write {_URL_FORM}")
    if not port_text:
        return host, DEFAULT_PORTS[scheme]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise LdapConfigError(f"{key}: port {port_text!r} must be a number from 1 to 65535")
    return host, int(port_text)


def check_filter(text: str, key: str) -> None:
    """A filter in parentheses with balanced ones (the directory checks the rest)."""
    depth = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0 or (depth == 0 and i != len(text) - 1):
                break
    else:
        if depth == 0 and text.startswith("("):
            return
    raise LdapConfigError(
        f"{key}: {text!r} is not an LDAP filter in parentheses, e.g. (objectClass=person)"
    )


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class LdapSettings:
    """The ``[ldap]`` table as configured (no password in it)."""

    bind_dn: str | None = None
    """The DN the user searches bind as (None: anonymous searches)."""
    bind_password_file: Path | None = None
    bind_password_env: str | None = None
    starttls: bool = False
    ca_file: Path | None = None
    """CA certificates (PEM) the directory's certificate is checked against (None: the
    system's)."""
    timeout: float = DEFAULT_TIMEOUT
    """The longest a login waits for the directory; also each connect and operation's bound."""
    pool_size: int = DEFAULT_POOL_SIZE
    """Threads checking logins, each with its pooled search connection."""
    group_attr: str | None = "memberOf"
    """The user entry's attribute listing the DNs of its groups (None: not read)."""
    group_base: str | None = None
    """Where groups are searched for ``member``/``uniqueMember`` = the user's DN or
    ``memberUid`` = the login name (None: no group search)."""
    plaintext: bool = False
    """Plain LDAP to a host that is not loopback is allowed (the network is trusted)."""

    def bind_password(self) -> str | None:
        """The search bind's password, read now; LdapConfigError if it cannot be."""
        try:
            return read_secret(
                "ldap.bind_password", self.bind_password_file, self.bind_password_env
            )
        except SecretError as e:
            raise LdapConfigError(str(e)) from None


def parse_ldap_settings(raw: Any) -> LdapSettings:
    """``[ldap]``; LdapConfigError names the key and how to write it."""
    if not isinstance(raw, Mapping):
        raise LdapConfigError('ldap: expected a table, e.g. [ldap] bind_dn = "cn=socksd,..."')
    unknown = [k for k in raw if k not in LDAP_KEYS]
    if unknown:
        raise LdapConfigError(
            f"ldap: unknown key {unknown[0]!r}; known keys: {', '.join(LDAP_KEYS)}"
        )
    fields = {key: _FIELD_PARSERS[key](value) for key, value in raw.items()}
    settings = LdapSettings(**fields)
    has_password = settings.bind_password_file is not None or settings.bind_password_env is not None
    if settings.bind_password_file is not None and settings.bind_password_env is not None:
        raise LdapConfigError("ldap: give bind_password_file or bind_password_env, not both")
    if settings.bind_dn is not None and not has_password:
        raise LdapConfigError(
            "ldap.bind_dn: needs its password: give bind_password_file or bind_password_env "
            "(never the password itself)"
        )
    if settings.bind_dn is None and has_password:
        raise LdapConfigError("ldap: a bind password is given without bind_dn; add bind_dn")
    return settings


def _dn(key: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or "=" not in value:
            raise LdapConfigError(f'ldap.{key}: expected a DN, e.g. "cn=socksd,dc=example,dc=com"')
        return value.strip()

    return parse


def _file(key: str) -> Callable[[Any], Path]:
    def parse(value: Any) -> Path:
        if not isinstance(value, str) or not value:
            raise LdapConfigError(f"ldap.{key}: expected the path of a file")
        return Path(value)

    return parse


def _flag(key: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise LdapConfigError(f"ldap.{key}: expected true or false")
        return value

    return parse


def _env(value: Any) -> str:
    if not isinstance(value, str) or not _ENV.fullmatch(value):
        raise LdapConfigError(
            f"ldap.bind_password_env: {value!r} is not an environment variable name"
        )
    return value


def _timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0.1:
        raise LdapConfigError(f"ldap.timeout: expected seconds (at least 0.1), got {value!r}")
    return float(value)


def _pool_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise LdapConfigError(f"ldap.pool_size: expected 1 to 64 connections, got {value!r}")
    return value


def _group_attr(value: Any) -> str | None:
    if value == "":
        return None
    if not isinstance(value, str) or not _ATTR.fullmatch(value):
        raise LdapConfigError(
            f'ldap.group_attr: {value!r} is not an attribute name (e.g. "memberOf"; "" reads none)'
        )
    return value


_FIELD_PARSERS: dict[str, Callable[[Any], Any]] = {
    "bind_dn": _dn("bind_dn"),
    "group_base": _dn("group_base"),
    "bind_password_file": _file("bind_password_file"),
    "ca_file": _file("ca_file"),
    "bind_password_env": _env,
    "starttls": _flag("starttls"),
    "plaintext": _flag("plaintext"),
    "timeout": _timeout,
    "pool_size": _pool_size,
    "group_attr": _group_attr,
}


def check_ldap(url: LdapUrl, settings: LdapSettings) -> None:
    """The URL and ``[ldap]`` fit together; LdapConfigError otherwise."""
    if url.tls and settings.starttls:
        raise LdapConfigError(
            "ldap.starttls: ldaps:// is TLS already; use ldap:// with starttls, or drop starttls"
        )
    encrypted = url.tls or settings.starttls
    if settings.ca_file is not None and not encrypted:
        raise LdapConfigError(
            "ldap.ca_file: used only with TLS; use ldaps:// or starttls = true, or drop ca_file"
        )
    if not encrypted and not settings.plaintext and not is_loopback(url.host):
        raise LdapConfigError(
            f"users: {url.where} would carry passwords in clear; use ldaps:// or "
            "[ldap] starttls = true (or plaintext = true if the network is trusted)"
        )
