"""What every session of a server shares, and the one function that derives it from a config.

:func:`derive` turns a :class:`~socksd.config.Config` into everything a server runs with: the
authentication methods in order, the user file, the GSSAPI acceptor (the keytab read afresh), the
rules guarding this host's current addresses (and the check that ``bind_out`` and each rule's
``via`` are addresses of this host), the resolver, the access log, the load balancers
trusted to send a PROXY protocol header and the upstream proxies (their passwords read afresh). It
is the only
place that does so: :meth:`ServerContext.create` calls it at start-up, the reload
(``socksd.server.process.reload``) calls it on SIGHUP, and the supervisor of ``--workers N`` calls it to
check a new config before it signals the workers. So a reload yields the server a fresh start
would, except for the listeners (``listen``, ``workers``, ``loop`` need a restart) and for the
sessions already admitted, which keep what they were given.

:meth:`ServerContext.install` swaps derived parts in, without an await, so a session's next
checkpoint sees all old or all new parts. State that outlives a configuration stays in the
context: the open sessions, the limits' counters and buckets (``Limits.configure`` takes the new
settings), and the verified-login cache of the user store (entries of changed users stop
matching).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from socksd.accesslog import AccessLog
from socksd.auth.stores import UserStore, UserStoreError, open_user_store
from socksd.auth.userpass import UserPassAuthenticator
from socksd.config import Config, ConfigError
from socksd.limits import Limits
from socksd.limitstore import LimitStore, open_limit_store
from socksd.outgoing import check_own
from socksd.protocol import AuthMethod
from socksd.resolver import Resolver, make_resolver
from socksd.rules import RuleSet
from socksd.server.handshake.deadlines import DeadlineQueue, K
from socksd.server.handshake.proxied import TrustedProxies
from socksd.server.handshake.refusals import RefusalLog
from socksd.server.process.hostaddrs import effective_rules
from socksd.server.process.serverlog import check_log_file
from socksd.upstreams import UpstreamError

if TYPE_CHECKING:
    from socksd.auth.gssapi import GssapiAcceptor
    from socksd.client.proxy import Proxy
    from socksd.metrics import SessionMetrics
    from socksd.server.handshake.session import Session

METHOD_CODES = {
    "gssapi": AuthMethod.GSSAPI,
    "userpass": AuthMethod.USERNAME_PASSWORD,
    "none": AuthMethod.NO_AUTH,
}


@dataclass(slots=True)
class Derived:
    """Everything derived from one config, built before any of it is used."""

    config: Config
    methods: tuple[int, ...]
    """Authentication methods in the server's order of preference."""
    users: UserStore | None
    """The user store ``users`` names (an htpasswd file read, a PAM service checked)."""
    gssapi: GssapiAcceptor | None
    rules: RuleSet
    """``config.rules`` guarding this host's addresses too (``protect_local``)."""
    resolver: Resolver
    access_log: AccessLog
    proxy_from: TrustedProxies
    """The load balancers whose connections start with a PROXY header."""
    upstreams: dict[str, Proxy] = field(default_factory=dict)
    """``[upstreams]`` by name, their passwords read (from the file or the environment)."""

    def close(self) -> None:
        """Release what was opened (a check that is not installed)."""
        self.access_log.close()
        if self.gssapi is not None:
            self.gssapi.close()


def derive(config: Config, previous: ServerContext | None = None) -> Derived:
    """Build everything a server runs with from ``config``; ConfigError names what is wrong.

    ``previous`` (a running server) lends its resolver when the resolver settings are unchanged,
    so its caches survive a reload.
    """
    users = user_store(config)
    check_log_file(config.log_file)  # the server log itself is set up by run.setup_logging
    check_outgoing(config)
    if previous is not None and _resolver_settings(previous.config) == _resolver_settings(config):
        resolver = previous.resolver
    else:
        resolver = make_resolver(config.hosts or None, config.dns or None, config.resolve_timeout)
    try:
        upstreams = {name: spec.proxy() for name, spec in config.upstreams.items()}
    except UpstreamError as e:
        raise ConfigError(str(e)) from None
    gssapi = gssapi_acceptor(config) if "gssapi" in config.auth_methods else None
    try:
        access_log = AccessLog(config.access_log, config.log_format)
    except OSError as e:
        if gssapi is not None:
            gssapi.close()
        raise ConfigError(
            f"access_log: cannot open {config.access_log}: {e.strerror or e}"
        ) from None
    return Derived(
        config=config,
        methods=tuple(METHOD_CODES[name] for name in config.auth_methods),
        users=users,
        gssapi=gssapi,
        rules=effective_rules(config),
        resolver=resolver,
        access_log=access_log,
        proxy_from=TrustedProxies(config.proxy_protocol_from),
        upstreams=upstreams,
    )


def user_store(config: Config) -> UserStore | None:
    """The store of ``users`` (None: no users); ConfigError names the key otherwise. A check of
    a directory may take half the handshake timeout: the failure can still be answered."""
    if config.users is None:
        return None
    try:
        return open_user_store(
            config.users,
            cache_ttl=config.users_cache_ttl,
            timeout=config.handshake_timeout / 2,
            ldap=config.ldap,
        )
    except UserStoreError as e:
        raise ConfigError(str(e) if e.keyed else f"users: {e}") from None


def check_outgoing(config: Config) -> None:
    """``bind_out`` and every rule's ``via`` are addresses of this host (a bind probe each);
    ConfigError names the setting otherwise."""
    try:
        check_own(config.bind_out)
        for rule in config.rules.rules:
            check_own(rule.via)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _resolver_settings(config: Config) -> tuple[object, ...]:
    return (config.hosts, config.dns, config.resolve_timeout)


def gssapi_acceptor(config: Config) -> GssapiAcceptor:
    """The GSSAPI credentials; ConfigError when the gssapi package or the keytab is missing."""
    try:
        from socksd.auth.gssapi import GssapiAcceptor, GssapiSetupError
    except ImportError as e:
        raise ConfigError(
            f"methods: gssapi needs the Python package 'gssapi' ({e}); install it with "
            "pip install 'socksd[gssapi]' (it builds against MIT Kerberos: libkrb5-dev)"
        ) from None
    key = "gssapi_keytab" if config.gssapi_keytab is not None else "gssapi_service"
    if config.gssapi_keytab is not None and not config.gssapi_keytab.is_file():
        raise ConfigError(f"gssapi_keytab: {config.gssapi_keytab} is not a readable file")
    try:
        return GssapiAcceptor(config.service, config.gssapi_keytab)
    except GssapiSetupError as e:
        raise ConfigError(f"{key}: {e}") from None


@dataclass(slots=True)
class ServerContext:
    """Shared state of one server process; sessions read it at each checkpoint."""

    config: Config
    resolver: Resolver
    access_log: AccessLog
    rules: RuleSet
    methods: tuple[int, ...]
    authenticator: UserPassAuthenticator | None = None
    gssapi: GssapiAcceptor | None = None
    sessions: set[Session] = field(default_factory=set)
    refused_sessions: int = 0
    limits: Limits = field(default_factory=Limits)
    proxy_from: TrustedProxies = field(default_factory=TrustedProxies)
    worker: int = 0
    """This process's worker index (0 in a single-process server)."""
    worker_label: str = "0"
    """The ``W`` of session ids ``W-N``: the worker index, ``index.G`` after its G-th start."""
    opened: int = 0
    """Connections accepted so far: the ``N`` of the last session id."""
    upstreams: dict[str, Proxy] = field(default_factory=dict)
    """``[upstreams]`` by name (``Derived.upstreams``)."""
    metrics: SessionMetrics | None = None
    """Prometheus metrics the sessions update (``socksd.metrics``); None: metrics are off. Set by
    what runs the server (``run``, or a worker), which also serves or exports them."""
    refusals: RefusalLog = field(default_factory=RefusalLog)
    """The log lines of refused connections and logins, bounded under a storm (one per
    process; it outlives reloads)."""
    _deadlines: dict[tuple[object, float], DeadlineQueue[Any]] = field(default_factory=dict)

    def deadlines(self, timeout: float, expire: Callable[[K], None]) -> DeadlineQueue[K]:
        """The shared queue of ``timeout``-second deadlines that end in ``expire(key)`` (the
        handshake timeout, the connect timeout). A reload that changes a timeout starts a new
        queue; the old one keeps the deadlines it holds until they end."""
        key = (expire, timeout)
        queue = self._deadlines.get(key)
        if queue is None:
            for old in [k for k, q in self._deadlines.items() if k[0] == expire and not q]:
                del self._deadlines[old]  # an earlier timeout's queue, empty now
            queue = self._deadlines[key] = DeadlineQueue(timeout, expire)
        return queue

    @classmethod
    def create(cls, config: Config, store: LimitStore | None = None) -> ServerContext:
        """A server's context at start-up (reads the user file and the keytab). ``store``: the
        shared limit store a supervisor made; else the one ``limits_store`` names."""
        parts = derive(config)
        if store is None:
            store = open_limit_store(config.limits_store)
        ctx = cls(
            config=parts.config,
            resolver=parts.resolver,
            access_log=parts.access_log,
            rules=parts.rules,
            methods=parts.methods,
            limits=Limits(parts.config, store),
        )
        ctx.install(parts)
        return ctx

    def install(self, parts: Derived) -> None:
        """Use ``parts`` from now on (no await: sessions see all old or all new parts); open
        sessions are told (``Session.reloaded``).

        Parts replaced here that sessions in the middle of a handshake may still hold (the
        password checker's pool, the GSSAPI acceptor) are closed a handshake timeout later.
        """
        retired: list[Callable[[], None]] = []
        old_auth = self.authenticator
        if parts.users is None:
            self.authenticator = None
        elif old_auth is not None and old_auth.fits(parts.users):
            old_store = old_auth.replace_users(parts.users)
            if old_store is not parts.users:
                retired.append(old_store.close)
        else:  # a first store, or one of another kind or pool size: its own pool
            self.authenticator = UserPassAuthenticator(parts.users)
        if old_auth is not None and self.authenticator is not old_auth:
            retired.append(old_auth.close)
        if self.gssapi is not None and self.gssapi is not parts.gssapi:
            retired.append(self.gssapi.close)
        self.gssapi = parts.gssapi
        if self.access_log is not parts.access_log:
            self.access_log.close()
            self.access_log = parts.access_log
        self.resolver = parts.resolver
        self.rules = parts.rules
        self.methods = parts.methods
        self.proxy_from = parts.proxy_from
        self.upstreams = parts.upstreams
        self.limits.configure(parts.config, time.monotonic())
        self.config = parts.config
        for session in list(self.sessions):
            session.reloaded()  # what outlives a handshake drops what it derived from the old parts
        if retired:
            loop = asyncio.get_running_loop()
            for close in retired:
                loop.call_later(self.config.handshake_timeout + 1, close)
