"""The server's settings: defaults, the TOML file, and command-line overrides, validated in one place.

Every key of the TOML file has the name of its ``socksd serve`` flag (``--handshake-timeout`` is
``handshake_timeout``); a flag given on the command line wins over the file. Validation errors are
:class:`ConfigError` with a one-line message naming the key and how to fix it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from socksd.auth.ldapconfig import (
    LdapConfigError,
    LdapSettings,
    check_ldap,
    is_ldap_url,
    parse_ldap_settings,
    parse_ldap_url,
)
from socksd.auth.stores import is_directory
from socksd.fdlimit import DEFAULT_MAX_SESSIONS, default_max_sessions
from socksd.outgoing import SourceAddresses, parse_source_addresses
from socksd.protocol.constants import Command
from socksd.rules import (
    COMMAND_NAMES,
    RuleError,
    RuleSet,
    parse_action,
    parse_groups,
    parse_ruleset,
)
from socksd.upstreams import UpstreamError, UpstreamSpec, check_not_self, parse_upstreams

DEFAULT_LISTEN = "127.0.0.1:1080"


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A ``HOST:PORT`` to listen on; IPv6 hosts are written ``[::1]:1080``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str = "listen") -> ListenAddress:
        """Parse ``HOST:PORT`` / ``[V6]:PORT``; raise ConfigError naming ``key`` otherwise."""
        hint = f"{key}: {text!r} is not HOST:PORT (IPv6 as [::1]:1080)"
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ConfigError(hint)
        else:
            host, sep, port = text.rpartition(":")
            if not sep or ":" in host:
                raise ConfigError(hint)
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{key}: port in {text!r} must be a number from 0 to 65535")
        if not host:
            raise ConfigError(f"{key}: {text!r} has no host; use 0.0.0.0 or [::] for every address")
        return cls(host, int(port))

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the address."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_LOG_FORMATS = ("text", "json")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOOPS = ("auto", "uvloop", "asyncio")

PROTOCOLS = ("socks5", "socks4", "http")
"""Names of ``protocols``: SOCKS5, SOCKS4 and SOCKS4a, HTTP CONNECT (``socksd.protocol.sniff``)."""
METHODS = ("gssapi", "userpass", "none")
"""Authentication method names of ``methods``, for RFC 1961, RFC 1929 and no authentication."""
DEFAULT_GSSAPI_SERVICE = "rcmd"
DEFAULT_MAX_AUTH_DELAY = 5.0
"""Longest failed-login delay when ``max_auth_delay`` is not set (capped by the handshake timeout)."""


@dataclass(frozen=True, slots=True)
class Config:
    """All settings of ``socksd serve``; see the README for each key."""

    listen: tuple[ListenAddress, ...] = (ListenAddress.parse(DEFAULT_LISTEN),)
    users: Path | str | None = None
    """An htpasswd file (a Path), or a directory of users (a str: ``pam:SERVICE``,
    ``ldap[s]://...``)."""
    ldap: LdapSettings = field(default_factory=LdapSettings)
    """``[ldap]`` (file only): how the directory of ``users = "ldap://..."`` is used."""
    users_cache_ttl: float = 300.0
    """Seconds a login verified by a directory (PAM, LDAP) is trusted without a new check."""
    allow_open: bool = False
    log_format: str = "text"
    log_level: str = "info"
    access_log: str = "-"
    log_file: str = "-"
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0
    shutdown_timeout: float = 30.0
    resolve_timeout: float = 5.0
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_given: bool = field(default=False, metadata={"derived": True})
    """``max_sessions`` was set (file or flag), not the default sized from the open-files limit
    (derived by ``build_config``, not a key)."""
    relay_buffer: int = 256 * 1024
    splice: str = "auto"
    """``auto``/``on``: plain CONNECT and BIND sessions move to ``os.splice`` (Linux); ``off``."""
    dns: tuple[str, ...] = ()
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    loop: str = "auto"
    workers: int = 1
    rules: RuleSet = field(default_factory=RuleSet)
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default: str = "allow"
    protect_local: bool = True
    max_sessions_per_ip: int = 0
    max_sessions_per_user: int = 0
    max_auth_failures: int = 10
    auth_block_time: float = 60.0
    auth_delay: float = 0.5
    max_auth_delay: float | None = None
    """None: ``DEFAULT_MAX_AUTH_DELAY``, at most half the handshake timeout."""
    max_auth_checks_per_ip: int = 4
    auth_block: bool = False
    bandwidth: Mapping[str, int] = field(default_factory=dict)
    commands: tuple[Command, ...] = tuple(COMMAND_NAMES.values())
    protocols: tuple[str, ...] = ("socks5",)
    """The protocols the listeners speak, told apart by a connection's first byte
    (``PROTOCOLS``)."""
    bind_timeout: float = 60.0
    udp_idle_timeout: float = 300.0
    advertise: str | None = None
    """The address put in BND.ADDR of BIND and UDP ASSOCIATE replies (``external_address`` is
    its old name, still accepted)."""
    bind_out: SourceAddresses | None = None
    """The addresses connections and datagrams to targets leave from (one per family); None:
    the kernel picks. A rule's ``via`` replaces it for the sessions that rule allows."""
    proxy_protocol_from: tuple[str, ...] = ()
    """Networks (CIDR) whose connections must start with a PROXY protocol header."""
    methods: tuple[str, ...] = ()
    gssapi_keytab: Path | None = None
    gssapi_service: str | None = None
    gssapi_levels: tuple[int, ...] = (1, 2, 3)
    control_socket: str | None = None
    """The control socket's path, ``off``, or None: ``$RUNTIME_DIRECTORY/socksd.sock`` if set."""
    control_group: str | None = None
    """A group (name or id) that may use the control socket too (mode 0660)."""
    limits_store: str = "local"
    """Where the session limits and failed logins are shared: ``local`` (each process its own),
    ``host`` (the workers of this host), or a ``redis://`` URL (a fleet); ``socksd.limitstore``."""
    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)
    """``[upstreams]`` (file only): the proxies requests may be sent through."""
    upstream: str | None = None
    """The upstream every allowed request goes through unless its rule says (None: direct)."""
    metrics: ListenAddress | None = None
    """Where the Prometheus endpoint listens (``/metrics``); None: no metrics."""
    metrics_allow_remote: bool = False

    @property
    def auth_methods(self) -> tuple[str, ...]:
        """``methods``, or when not given: gssapi (keytab or service set), userpass (users set),
        else none."""
        if self.methods:
            return self.methods
        derived = []
        if self.gssapi_keytab is not None or self.gssapi_service is not None:
            derived.append("gssapi")
        if self.users is not None:
            derived.append("userpass")
        return tuple(derived) or ("none",)

    @property
    def shared_max_sessions(self) -> int:
        """``max_sessions`` as a total over every process sharing a ``limits_store`` (0: none).
        Only a value the admin set: the default is sized from one process's open files, so it
        stays a per-process guard (split between workers) and never caps a fleet."""
        return self.max_sessions if self.max_sessions_given else 0

    @property
    def effective_max_auth_delay(self) -> float:
        """The longest failed-login delay: ``max_auth_delay``, or by default
        ``DEFAULT_MAX_AUTH_DELAY`` but at most half the handshake timeout."""
        if self.max_auth_delay is not None:
            return self.max_auth_delay
        return min(DEFAULT_MAX_AUTH_DELAY, self.handshake_timeout / 2)

    @property
    def service(self) -> str:
        """The GSS-API service name (``gssapi_service`` or ``rcmd``)."""
        return self.gssapi_service or DEFAULT_GSSAPI_SERVICE

    @property
    def requires_auth(self) -> bool:
        """True when clients must authenticate."""
        return "none" not in self.auth_methods


_FIELDS = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("derived")}

ALIASES = {"external_address": "advertise"}
"""Old key names still accepted, and the key each now is."""


def _number(key: str, value: Any, *, minimum: float = 0.0, integer: bool = False) -> float:
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected {kind} of seconds/bytes, got {value!r}")
    if integer and not isinstance(value, int):
        raise ConfigError(f"{key}: expected {kind}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key}: must be at least {minimum:g}, got {value!r}")
    return value


def _convert(key: str, value: Any) -> Any:
    """Check one key's value and turn it into the Config field's type."""
    converter = _CONVERTERS.get(key)
    if converter is not None:
        return converter(value)
    if key == "listen":
        items = [value] if isinstance(value, str) else value
        if (
            not isinstance(items, list | tuple)
            or not items
            or not all(isinstance(v, str) for v in items)
        ):
            raise ConfigError('listen: expected a list of "HOST:PORT" strings')
        return tuple(ListenAddress.parse(v) for v in items)
    if key == "gssapi_keytab":
        if value is None or value == "":
            return None
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key}: expected the path of a Kerberos keytab")
        return Path(value)
    if key == "allow_open":
        if not isinstance(value, bool):
            raise ConfigError("allow_open: expected true or false")
        return value
    if key in ("log_format", "log_level", "loop"):
        choices = {"log_format": _LOG_FORMATS, "log_level": _LOG_LEVELS, "loop": _LOOPS}[key]
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return value.lower()
    if key == "access_log":
        if not isinstance(value, str) or not value:
            raise ConfigError('access_log: expected "-" (stderr), "off" or a file path')
        return value
    if key == "log_file":
        if not isinstance(value, str) or not value or value == "off":
            raise ConfigError('log_file: expected "-" (stderr) or a file path')
        return value
    if key in (
        "handshake_timeout",
        "connect_timeout",
        "shutdown_timeout",
        "resolve_timeout",
        "bind_timeout",
    ):
        return float(_number(key, value, minimum=0.001))
    if key in ("idle_timeout", "udp_idle_timeout"):
        return float(_number(key, value))
    if key == "max_sessions":
        return int(_number(key, value, minimum=1, integer=True))
    if key == "workers":
        if value == "auto":
            return 0
        return int(_number(key, value, minimum=0, integer=True))
    if key == "relay_buffer":
        return int(_number(key, value, minimum=4096, integer=True))
    if key == "dns":
        return _dns(value)
    if key == "hosts":
        return _hosts(value)
    if key in ("rules", "groups", "default", "protect_local", "bandwidth"):
        return _convert_access(key, value)
    if key == "upstreams":
        try:
            return parse_upstreams(value)
        except UpstreamError as e:
            raise ConfigError(str(e)) from None
    if key == "upstream":
        if value is None or value in {"", "direct"}:
            return None
        if not isinstance(value, str):
            raise ConfigError('upstream: expected the name of an [upstreams] entry or "direct"')
        return value  # checked against [upstreams] with the rules
    if key in ("max_sessions_per_ip", "max_sessions_per_user", "max_auth_failures"):
        return int(_number(key, value, minimum=0, integer=True))
    if key == "auth_block_time":
        return float(_number(key, value, minimum=0.001))
    if key == "users_cache_ttl":
        return float(_number(key, value))
    if key in ("auth_delay", "max_auth_delay"):
        return float(_number(key, value))
    if key == "max_auth_checks_per_ip":
        return int(_number(key, value, minimum=0, integer=True))
    if key == "auth_block":
        if not isinstance(value, bool):
            raise ConfigError("auth_block: expected true or false")
        return value
    raise ConfigError(f"unknown key {key!r}")  # pragma: no cover - guarded by the caller


def _dns(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError('dns: expected a list of "IP" or "IP:PORT" strings')
    from socksd.resolver import parse_dns_server

    for item in items:
        try:
            parse_dns_server(item)
        except ValueError as e:
            raise ConfigError(f"dns: {e}") from None
    return tuple(items)


def _hosts(value: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, Mapping):
        raise ConfigError('hosts: expected a table of name = ["IP", ...]')
    hosts: dict[str, tuple[str, ...]] = {}
    for name, ips in value.items():
        items = [ips] if isinstance(ips, str) else ips
        if (
            not isinstance(items, list | tuple)
            or not items
            or not all(isinstance(v, str) for v in items)
        ):
            raise ConfigError(f'hosts.{name}: expected a list of IP strings, e.g. ["127.0.0.1"]')
        for ip in items:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"hosts.{name}: {ip!r} is not an IP address") from None
        hosts[name] = tuple(items)
    return hosts


def _convert_access(key: str, value: Any) -> Any:
    """Access rules and bandwidth: checked here one by one, compiled in ``build_config``."""
    try:
        if key == "rules":
            if not isinstance(value, list | tuple):
                raise ConfigError("rules: expected [[rules]] tables (an array of tables)")
            return value  # compiled once groups, default and protect_local are known
        if key == "groups":
            return parse_groups(value)
        if key == "default":
            return parse_action(value, "default").value
        if key == "protect_local":
            if not isinstance(value, bool):
                raise ConfigError("protect_local: expected true or false")
            return value
    except RuleError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(value, Mapping):
        raise ConfigError(
            "bandwidth: expected a table of user = bytes per second, e.g. alice = 1000000"
        )
    for user, rate in value.items():
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
            raise ConfigError(
                f"bandwidth.{user}: expected bytes per second (a whole number, 0 = unlimited), "
                f"got {rate!r}"
            )
    return dict(value)


def _commands(value: Any) -> tuple[Command, ...]:
    known = ", ".join(COMMAND_NAMES)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f'commands: expected a list of command names ({known}), e.g. ["connect"]')
    commands: list[Command] = []
    for item in items:
        name = item.strip().lower()
        if name not in COMMAND_NAMES:
            raise ConfigError(f"commands: {item!r} is not one of {known}")
        if COMMAND_NAMES[name] not in commands:
            commands.append(COMMAND_NAMES[name])
    if not commands:
        raise ConfigError(f"commands: serve at least one of {known}")
    return tuple(commands)


def _protocols(value: Any) -> tuple[str, ...]:
    known = ", ".join(PROTOCOLS)
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(
            f'protocols: expected a list of protocol names ({known}), e.g. ["socks5"]'
        )
    protocols: list[str] = []
    for item in items:
        name = item.strip().lower()
        if name not in PROTOCOLS:
            raise ConfigError(f"protocols: {item!r} is not one of {known}")
        if name not in protocols:
            protocols.append(name)
    if not protocols:
        raise ConfigError(f"protocols: serve at least one of {known}")
    return tuple(protocols)


def _advertise(value: Any) -> str | None:
    if value is None or value == "":
        return None
    hint = "advertise: expected the IP address clients should use to reach this server"
    if not isinstance(value, str):
        raise ConfigError(hint)
    try:
        ip = ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        raise ConfigError(f"{hint}, got {value!r} (no names, no port)") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ConfigError(f"{hint}, got {value!r}, which no client can reach")
    return str(ip)


def _bind_out(value: Any) -> SourceAddresses | None:
    if value is None:
        return None
    try:
        return parse_source_addresses(value, "bind_out")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _proxy_protocol_from(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(
            'proxy_protocol_from: expected a list of networks, e.g. ["10.0.0.0/24", "127.0.0.1"]'
        )
    networks: list[str] = []
    for item in items:
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"proxy_protocol_from: {item!r} is not an address or network (CIDR such as "
                "10.0.0.0/24): give the load balancers' addresses"
            ) from None
        if network.prefixlen == 0:
            raise ConfigError(
                f"proxy_protocol_from: {item!r} is every address: anyone could claim any client "
                "address; list the load balancers"
            )
        if str(network) not in networks:
            networks.append(str(network))
    return tuple(networks)


def _control(key: str, value: Any) -> str | None:
    if key == "control_group":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return str(value)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError('control_group: expected a group name or id, e.g. "socksd-admin"')
        return value.strip()
    if not isinstance(value, str | Path):
        raise ConfigError('control_socket: expected the path of a Unix socket, or "off"')
    text = str(value)
    return "off" if text in ("", "off") else text


def _methods(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError('methods: expected a list such as ["gssapi", "userpass", "none"]')
    names = [v.strip().lower() for v in items]
    for name in names:
        if name not in METHODS:
            raise ConfigError(f"methods: {name!r} is not one of {', '.join(METHODS)}")
    if not names or len(set(names)) != len(names):
        raise ConfigError("methods: give each method once, in the order of preference")
    return tuple(names)


def _service(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "@/ \t"):
        raise ConfigError(
            f"gssapi_service: {value!r} is not a service name (like rcmd or socks; "
            "the host part comes from the keytab)"
        )
    return value


def _levels(value: Any) -> tuple[int, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError("gssapi_levels: expected a list of protection levels such as [1, 2, 3]")
    levels: list[int] = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if isinstance(text, bool) or text not in (1, 2, 3, "1", "2", "3"):
            raise ConfigError(
                f"gssapi_levels: {item!r} is not a protection level (1 integrity, "
                "2 confidentiality, 3 selective)"
            )
        if int(text) not in levels:
            levels.append(int(text))
    return tuple(levels)


def _metrics(value: Any) -> ListenAddress | None:
    if value is None or value in ("", "off"):
        return None
    if not isinstance(value, str):
        raise ConfigError('metrics: expected "HOST:PORT" (e.g. "127.0.0.1:9464") or "off"')
    return ListenAddress.parse(value, "metrics")


def _splice(value: Any) -> str:
    choice = ("on" if value else "off") if isinstance(value, bool) else value
    if not isinstance(choice, str) or choice.lower() not in ("auto", "on", "off"):
        raise ConfigError(f"splice: {value!r} is not one of auto, on, off")
    choice = choice.lower()
    if choice == "on" and not hasattr(os, "splice"):
        raise ConfigError("splice: on needs os.splice (Linux); use auto or off")
    return choice


LIMITS_STORE_FIX = (
    'give "local", "host" or redis://HOST:PORT/DB (rediss:// with TLS, unix:///PATH?db=N; '
    "?lease=S) in limits_store or --limits-store"
)


def _redis_url_error(url: str) -> str | None:
    """What is wrong with a Redis URL of ``limits_store`` (its scheme already checked), or
    None. Checked here, not left to the client: it would take a bad port or database as the
    default and count in another Redis than meant."""
    from socksd.limitstore import split_lease

    try:
        url, _ = split_lease(url)
    except ValueError as e:
        return str(e) if str(e).startswith("lease=") else "lease: expected a number of seconds"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs the socket's path (unix:///PATH)"
    if not parts.hostname:
        return "no host in the URL"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return f"port {parts.netloc.rpartition(':')[2]!r} is not a number from 1 to 65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"database {db!r} is not a number (redis://HOST:PORT/0)"
    return None


def _limits_store(value: Any) -> str:
    """``limits_store`` (the file key and ``--limits-store``): local, host or a Redis URL."""
    if not isinstance(value, str) or not (
        value in ("local", "host") or value.startswith(("redis://", "rediss://", "unix://"))
    ):
        raise ConfigError(
            f'limits_store: {value!r} is not "local", "host" or a Redis URL; ' + LIMITS_STORE_FIX
        )
    if value in ("local", "host"):
        return value
    error = _redis_url_error(value)
    if error is not None:
        raise ConfigError(f"limits_store: {error}; {LIMITS_STORE_FIX}")
    if importlib.util.find_spec("redis") is None:
        raise ConfigError(
            "limits_store: a Redis store needs the Python package 'redis' (>=5); install it "
            "with pip install 'socksd[redis]'"
        )
    return value


def _flag(key: str) -> Callable[[Any], bool]:
    def convert(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false")
        return value

    return convert


def _users(value: Any) -> Path | str | None:
    """``users``: an htpasswd file's path, ``pam:SERVICE`` or ``ldap[s]://...``."""
    if value is None or value == "":
        return None
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ConfigError(
            'users: expected the path of an htpasswd file, "pam:SERVICE" or "ldap[s]://..."'
        )
    if is_ldap_url(value):
        try:
            parse_ldap_url(value)
        except LdapConfigError as e:
            raise ConfigError(str(e)) from None
        return value
    if value.startswith("pam:"):
        from socksd.auth.pam import service_error

        error = service_error(value.removeprefix("pam:"))
        if error is not None:
            raise ConfigError(f"users: {error}")
        return value
    return Path(value)


def _ldap(value: Any) -> LdapSettings:
    """``[ldap]``."""
    try:
        return parse_ldap_settings(value)
    except LdapConfigError as e:
        raise ConfigError(str(e)) from None


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "ldap": _ldap,
    "metrics": _metrics,
    "splice": _splice,
    "limits_store": _limits_store,
    "metrics_allow_remote": _flag("metrics_allow_remote"),
    "methods": _methods,
    "users": _users,
    "gssapi_service": _service,
    "gssapi_levels": _levels,
    "commands": _commands,
    "protocols": _protocols,
    "advertise": _advertise,
    "bind_out": _bind_out,
    "proxy_protocol_from": _proxy_protocol_from,
    "control_socket": lambda value: _control("control_socket", value),
    "control_group": lambda value: _control("control_group", value),
}


def check_methods(config: Config) -> None:
    """Each method has what it needs, and nothing configured is left unused."""
    methods = config.auth_methods
    if "userpass" in methods and config.users is None:
        raise ConfigError(
            "methods: userpass needs a user file or directory; give users (--users FILE, "
            "pam:SERVICE or ldap://...)"
        )
    if config.methods:
        if config.users is not None and "userpass" not in methods:
            raise ConfigError(
                f"users: a user file is given but methods ({','.join(methods)}) has no userpass; "
                "add userpass to methods or drop users"
            )
        gssapi_set = config.gssapi_keytab is not None or config.gssapi_service is not None
        if gssapi_set and "gssapi" not in methods:
            raise ConfigError(
                f"gssapi_keytab/gssapi_service: set but methods ({','.join(methods)}) has no "
                "gssapi; add gssapi to methods or drop them"
            )


def build_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> Config:
    """Merge the file's values with command-line overrides (which win) and validate them all."""
    merged: dict[str, Any] = {}
    for source in (file_values, overrides):
        renamed: set[str] = set()
        for key, value in source.items():
            if value is None and source is overrides:
                continue
            name = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            if name in renamed:
                old = next(k for k, v in ALIASES.items() if v == name)
                raise ConfigError(f"{name}: given twice (as {name} and {old}); keep {name} only")
            renamed.add(name)
            if name not in _FIELDS:
                known = ", ".join(sorted(_FIELDS))
                raise ConfigError(f"unknown key {key!r}; known keys: {known}")
            try:
                merged[name] = _convert(name, value)
            except ConfigError as e:
                given = key.replace("-", "_")
                if given == name:
                    raise
                reason = str(e).removeprefix(f"{name}: ")
                raise ConfigError(
                    f"{given}: {reason} ({given} is the old name of {name})"
                ) from None
    _compile_access(merged)
    config = Config(**merged)
    if "max_sessions" in merged:
        config = dataclasses.replace(config, max_sessions_given=True)
    else:  # the default, lowered to what the open-files limit holds
        from socksd.server.process.workers import sessions_split

        config = dataclasses.replace(
            config, max_sessions=default_max_sessions(sessions_split(config))
        )
    check_methods(config)
    check_safety(config)
    check_metrics(config)
    check_auth_delay(config)
    check_user_store(config)
    try:
        check_not_self(config.upstreams, ((a.host, a.port) for a in config.listen))
    except UpstreamError as e:
        raise ConfigError(str(e)) from None
    return config


def check_user_store(config: Config) -> None:
    """``[ldap]`` and ``@ldap:NAME`` rules go with ``users = "ldap://..."``, and fit its URL."""
    if not is_ldap_url(config.users):
        for rule in config.rules.rules:
            if rule.user_groups:
                group = sorted(rule.user_groups)[0]
                raise ConfigError(
                    f"rule {rule.number}.users: @{group} is a directory group, but users is "
                    'not an LDAP directory; give users = "ldap://..." or drop it'
                )
        if config.ldap != LdapSettings():
            raise ConfigError('ldap: set but users is not an LDAP URL ("ldap://..."); drop [ldap]')
        return
    try:
        check_ldap(parse_ldap_url(str(config.users)), config.ldap)
    except LdapConfigError as e:
        raise ConfigError(str(e)) from None
    if config.ldap.timeout >= config.handshake_timeout:
        raise ConfigError(
            f"ldap.timeout: must be less than handshake_timeout ({config.handshake_timeout:g}s), "
            f"got {config.ldap.timeout:g}"
        )


def check_auth_delay(config: Config) -> None:
    """A failed login's reply must come well within the handshake timeout."""
    if config.max_auth_delay is not None and config.max_auth_delay >= config.handshake_timeout:
        raise ConfigError(
            f"max_auth_delay: must be less than handshake_timeout "
            f"({config.handshake_timeout:g}s), got {config.max_auth_delay:g}"
        )


def _compile_access(merged: dict[str, Any]) -> None:
    """Compile ``rules`` with ``groups``, ``default`` and ``protect_local``; check ``bandwidth``."""
    groups = merged.get("groups", {})
    try:
        merged["rules"] = parse_ruleset(
            merged.get("rules", []),
            groups,
            merged.get("default", "allow"),
            merged.get("protect_local", True),
            upstreams=tuple(merged.get("upstreams", {})),
            upstream=merged.get("upstream"),
        )
    except RuleError as e:
        raise ConfigError(str(e)) from None
    for user in merged.get("bandwidth", {}):
        if user.startswith("@") and user[1:] not in groups:
            known = ", ".join(f"@{g}" for g in groups) or "none"
            raise ConfigError(f"bandwidth: {user!r} is not a group in [groups] (known: {known})")


def check_safety(config: Config) -> None:
    """Refuse an open proxy on an address other machines can reach, unless allowed explicitly."""
    if config.requires_auth or config.allow_open:
        return
    exposed = [str(a) for a in config.listen if not a.is_loopback]
    if exposed:
        raise ConfigError(
            f"listen: {', '.join(exposed)} is reachable from other machines and no authentication "
            "is required (methods include none); this would be an open proxy. Add users "
            "(--users FILE) or a Kerberos keytab (--gssapi-keytab FILE), or, if you really mean "
            "it, --allow-open (allow_open = true)"
        )


def check_metrics(config: Config) -> None:
    """Refuse a metrics endpoint other machines can reach, unless allowed explicitly."""
    address = config.metrics
    if address is not None and not address.is_loopback and not config.metrics_allow_remote:
        raise ConfigError(
            f"metrics: {address} is reachable from other machines and the endpoint has no "
            "authentication; use a loopback address (127.0.0.1:9464) behind your scraper's "
            "tunnel or proxy, or, if you mean it, --metrics-allow-remote "
            "(metrics_allow_remote = true)"
        )


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file; ConfigError with the file and the reason when it is unreadable."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: {path} does not exist; give the path of a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    for key in ("users", "gssapi_keytab", "control_socket"):
        value = data.get(key)
        if key == "users" and isinstance(value, str) and is_directory(value):
            continue
        if isinstance(value, str) and value not in ("", "off") and not Path(value).is_absolute():
            data[key] = str(path.parent / value)
    ldap = data.get("ldap")
    if isinstance(ldap, dict):
        for key in ("bind_password_file", "ca_file"):
            value = ldap.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                ldap[key] = str(path.parent / value)
    upstreams = data.get("upstreams")
    if isinstance(upstreams, dict):
        for entry in upstreams.values():
            value = entry.get("password_file") if isinstance(entry, dict) else None
            if isinstance(value, str) and value and not Path(value).is_absolute():
                entry["password_file"] = str(path.parent / value)
    return data
