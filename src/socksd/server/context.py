"""What every session of a server shares: settings, resolver, authenticator, access log, rules,
limits, counters. A reload (SIGHUP, ``socksd.server.reload``) replaces the parts in place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from socksd.accesslog import AccessLog
from socksd.auth.userpass import UserPassAuthenticator
from socksd.config import Config
from socksd.limits import Limits
from socksd.protocol import AuthMethod
from socksd.resolver import Resolver
from socksd.rules import RuleSet

if TYPE_CHECKING:
    from socksd.auth.gssapi import GssapiAcceptor
    from socksd.server.session import Session

_METHOD_CODES = {
    "gssapi": AuthMethod.GSSAPI,
    "userpass": AuthMethod.USERNAME_PASSWORD,
    "none": AuthMethod.NO_AUTH,
}


@dataclass(slots=True)
class ServerContext:
    """Shared state of one server process; sessions read it, the listener owns it."""

    config: Config
    resolver: Resolver
    access_log: AccessLog
    authenticator: UserPassAuthenticator | None = None
    gssapi: GssapiAcceptor | None = None
    sessions: set[Session] = field(default_factory=set)
    refused_sessions: int = 0
    rules: RuleSet = field(default_factory=RuleSet)
    """``config.rules`` guarding this host's addresses too (``protect_local``)."""
    limits: Limits = field(default_factory=Limits)
    methods: tuple[int, ...] = field(init=False)
    """Authentication methods in the server's order of preference (``methods``)."""

    def __post_init__(self) -> None:
        self.methods = tuple(_METHOD_CODES[name] for name in self.config.auth_methods)
