"""Upstream proxies (chaining): the ``[upstreams]`` table, checked; the passwords read at derive.

``[upstreams.NAME]`` names another SOCKS5 proxy that requests can be sent through: a global
``upstream = "NAME"`` sends every request there, a rule's ``upstream = "NAME"`` the requests it
allows (``"direct"``: none, also over a global one). The table holds no secret: a password comes
from ``password_file`` or ``password_env`` and is read by :meth:`UpstreamSpec.proxy`, which
``derive()`` calls at start-up and on every reload (a changed password file takes effect on
SIGHUP). The result is the client library's :class:`~socksd.client.proxy.Proxy` (its repr hides
the password); the server talks to the upstream with the client library's own handshake.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from socksd.client.gssapi import GssapiOptions
from socksd.client.proxy import Proxy
from socksd.secret import SecretError, read_secret

DIRECT = "direct"
"""The upstream name that means "no upstream": connect to the target directly."""

UPSTREAM_KEYS = (
    "proxy",
    "password_file",
    "password_env",
    "gssapi_service",
    "gssapi_hostname",
    "gssapi_level",
)

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UpstreamError(ValueError):
    """An upstream setting is wrong; the message names ``upstreams.NAME.key`` and the fix."""


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """One ``[upstreams.NAME]`` table as configured (no password in it)."""

    name: str
    host: str
    port: int
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    gssapi_service: str | None = None
    gssapi_hostname: str | None = None
    """The host part of the upstream's service name (default: its host as given; an IP
    literal's reverse DNS name)."""
    gssapi_level: int = 2

    @property
    def where(self) -> str:
        """``host:port`` (IPv6 in brackets), for logs."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def describe(self) -> str:
        """One line for ``check-config``: where, who, how (never the password)."""
        how = []
        if self.username is not None:
            source = (
                f"password from {self.password_file}"
                if self.password_file is not None
                else f"password from ${self.password_env}"
            )
            how.append(f"username/password as {self.username!r} ({source})")
        if self.gssapi_service is not None:
            host = self.gssapi_hostname or self.host
            how.append(f"GSSAPI as {self.gssapi_service}@{host}, level {self.gssapi_level}")
        return f"upstream {self.name}: socks5 {self.where}, " + (
            "; ".join(how) or "no authentication"
        )

    def proxy(self) -> Proxy:
        """The client library's Proxy, with the password read now; UpstreamError if it cannot be."""
        try:
            password = read_secret(
                f"upstreams.{self.name}.password", self.password_file, self.password_env
            )
        except SecretError as e:
            raise UpstreamError(str(e)) from None
        gssapi = None
        if self.gssapi_service is not None:
            try:
                import socksd.auth.gssapi  # noqa: F401 (here, not at each request)
            except ImportError as e:
                raise UpstreamError(
                    f"upstreams.{self.name}.gssapi_service: GSSAPI needs the Python package "
                    f"'gssapi' ({e}): pip install 'socksd[gssapi]'"
                ) from None
            gssapi = GssapiOptions(
                service=self.gssapi_service, hostname=self.gssapi_hostname, level=self.gssapi_level
            )
        return Proxy(self.host, self.port, self.username, password, gssapi)


def parse_upstreams(raw: Any) -> dict[str, UpstreamSpec]:
    """``[upstreams]``: ``NAME = { proxy = "socks5://user@host:port", password_file = ... }``."""
    if not isinstance(raw, Mapping):
        raise UpstreamError(
            'upstreams: expected a table of NAME = { proxy = "socks5://host:port" }'
        )
    return {name: parse_upstream(name, value) for name, value in raw.items()}


def parse_upstream(name: Any, raw: Any) -> UpstreamSpec:
    """One upstream; UpstreamError names the key and how to write it instead."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UpstreamError(f"upstreams: {name!r} is not an upstream name (letters, digits, _ . -)")
    where = f"upstreams.{name}"
    if name == DIRECT:
        raise UpstreamError(f'{where}: "{DIRECT}" means no upstream; choose another name')
    if not isinstance(raw, Mapping):
        raise UpstreamError(f'{where}: expected a table with proxy = "socks5://host:port"')
    unknown = [k for k in raw if k not in UPSTREAM_KEYS]
    if unknown:
        raise UpstreamError(
            f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(UPSTREAM_KEYS)}"
        )
    url = raw.get("proxy")
    if not isinstance(url, str) or not url:
        raise UpstreamError(f'{where}.proxy: expected "socks5://[user@]host:port"')
    try:
        parsed = Proxy.parse(url)
        port = parsed.port
    except ValueError as e:
        raise UpstreamError(f"{where}.proxy: {e}; write socks5://[user@]host:port") from None
    if parsed.password is not None:
        raise UpstreamError(
            f"{where}.proxy: no password in the URL (it would sit in the config and in logs); "
            "put it in password_file or password_env"
        )
    username = parsed.username if isinstance(parsed.username, str) else None  # parse: str
    password_file = raw.get("password_file")
    password_env = raw.get("password_env")
    if password_file is not None and (
        not isinstance(password_file, str | Path) or not password_file
    ):
        raise UpstreamError(f"{where}.password_file: expected the path of a file")
    if password_env is not None and (
        not isinstance(password_env, str) or not _ENV.fullmatch(password_env)
    ):
        raise UpstreamError(f"{where}.password_env: expected an environment variable name")
    if password_file is not None and password_env is not None:
        raise UpstreamError(f"{where}: give password_file or password_env, not both")
    if username is None and (password_file is not None or password_env is not None):
        raise UpstreamError(
            f"{where}.proxy: a password is given but no user; write socks5://USER@host:port"
        )
    if username is not None and password_file is None and password_env is None:
        raise UpstreamError(
            f"{where}: user {username!r} needs a password: password_file or password_env"
        )
    service = raw.get("gssapi_service")
    if service is not None and (
        not isinstance(service, str) or not service or any(c in service for c in "@/ \t")
    ):
        raise UpstreamError(
            f"{where}.gssapi_service: {service!r} is not a service name (like rcmd or socks)"
        )
    hostname = raw.get("gssapi_hostname")
    if hostname is not None and (not isinstance(hostname, str) or not hostname):
        raise UpstreamError(f"{where}.gssapi_hostname: expected a host name")
    level = raw.get("gssapi_level", 2)
    if isinstance(level, bool) or level not in (1, 2):
        raise UpstreamError(f"{where}.gssapi_level: expected 1 (integrity) or 2 (confidentiality)")
    for key in ("gssapi_level", "gssapi_hostname"):
        if key in raw and service is None:
            raise UpstreamError(f"{where}.{key}: set gssapi_service to use GSSAPI")
    return UpstreamSpec(
        name,
        parsed.host,
        port,
        username,
        Path(password_file) if password_file is not None else None,
        password_env,
        service,
        hostname,
        level,
    )


_WILDCARDS = ("0.0.0.0", "::")
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def check_not_self(
    upstreams: Mapping[str, UpstreamSpec], listen: Iterable[tuple[str, int]]
) -> None:
    """An upstream must not be this server's own listen address: every request through it would
    come back as a new request, and again (UpstreamError naming the entry)."""
    for spec in upstreams.values():
        for host, port in listen:
            same_host = spec.host == host or (host in _WILDCARDS and spec.host in _LOCAL_NAMES)
            if port and spec.port == port and same_host:
                raise UpstreamError(
                    f"upstreams.{spec.name}.proxy: {spec.where} is this server's own listen "
                    "address; requests through it would loop back into socksd"
                )
